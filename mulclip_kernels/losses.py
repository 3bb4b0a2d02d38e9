"""Batch contrastive losses of method section 5: the CLIP loss and the subcaption alignment loss."""
from typing import Optional

import torch
import torch.nn.functional as F

from . import validation
from .reference import compute_dtype, masked_diagonal_cross_entropy, normalize as l2_normalize
from .subcaption_patch import subcaption_patch_align, subcaption_patch_scores

SAP_MODES = ("slot", "all", "cross")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient and keeps this rank's slice.

    Every rank computes the whole contrastive loss over the gathered batch, so the gradient of
    this rank's rows is the sum over ranks (open_clip's gather-with-grad). The incoming gradient is
    made contiguous first: torch.distributed.nn's all_gather backward scatters a transposed
    gradient as if it were contiguous and returns it scrambled.
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over the data-parallel ranks along dim 0, gradient flowing back to each rank.

    Every rank must pass the same shape. Without an initialised process group (or with one rank)
    returns `x` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(x)


def _symmetric_masked_contrast(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, logit_scale) -> torch.Tensor:
    """Per group (G,): symmetric InfoNCE between matching rows of x and y (G,n,d), masked rows out."""
    dtype = compute_dtype(x.dtype)
    logits = logit_scale * (x.to(dtype) @ y.to(dtype).transpose(-1, -2))
    return (masked_diagonal_cross_entropy(logits, mask) + masked_diagonal_cross_entropy(logits.transpose(-1, -2), mask)) / 2


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    *,
    normalize: bool = True,
    gather_with_grad: bool = False,
) -> torch.Tensor:
    """Symmetric CLIP (InfoNCE) loss over the batch, `L_batch` of method section 5.

    Args:
        image_features, text_features: (B, d) matching rows.
        logit_scale: the multiplier of the cosine logits (open_clip passes `logit_scale.exp()`),
            a float or a scalar tensor (learnable).
        normalize: L2-normalise both first.
        gather_with_grad: under torch.distributed, contrast against the features of every rank
            (open_clip's gather-with-grad), gradients flowing back to their ranks.

    Returns:
        float32 scalar (float64 for float64 inputs).
    """
    validation.check_float_tensor("image_features", image_features, 2, "(B, d)")
    validation.check_float_tensor("text_features", text_features, 2, "(B, d)")
    validation.check_batch("text_features", text_features, "image_features", image_features)
    validation.check_width("text_features", text_features, "image_features", image_features)
    if normalize:
        image_features, text_features = l2_normalize(image_features), l2_normalize(text_features)
    if gather_with_grad:
        image_features, text_features = gather_batch(image_features), gather_batch(text_features)
    dtype = compute_dtype(image_features.dtype)
    logits = logit_scale * (image_features.to(dtype) @ text_features.to(dtype).t())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def subcaption_alignment_loss(
    subcaptions: torch.Tensor,
    patches: torch.Tensor,
    logit_scale,
    k: int = 16,
    *,
    subcaption_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    mode: str = "slot",
    temperature: float = 0.05,
    normalize: bool = True,
    gather_with_grad: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Subcaption-region alignment loss `L_SAP` of method section 5.

    Modes:
        "slot" (paper): `1/M sum_i L_batch(norm(r_{.,i}), u_{.,i})`, slot i restricted to the
            samples that have subcaption i; a slot with fewer than 2 samples adds 0.
        "all": one symmetric contrast of every valid region against every valid subcaption.
        "cross": for each valid subcaption, cross-entropy over the images of
            `logit_scale * subcaption_patch_scores(...)`, its own image the target; mean over
            subcaptions. Contrasts against the local batch only.

    Args:
        subcaptions: (B, M, d) sentence embeddings; patches: (B, P, d) patch embeddings.
        logit_scale: multiplier of the logits (float or scalar tensor).
        k, subcaption_mask, patch_mask, temperature, normalize, backend: as in
            `subcaption_patch_align`.
        gather_with_grad: "slot" and "all" contrast against every rank's samples.

    Returns:
        float32 scalar (float64 for float64 inputs).
    """
    validation.check_choice("mode", mode, SAP_MODES)
    validation.check_float_tensor("subcaptions", subcaptions, 3, "(B, M, d)")
    B, M, _ = subcaptions.shape
    subcaption_mask = validation.check_mask("subcaption_mask", subcaption_mask, (B, M), "(B, M)", subcaptions.device)
    zero = torch.zeros((), dtype=subcaptions.dtype, device=subcaptions.device)
    subcaptions = torch.where(subcaption_mask[..., None], subcaptions, zero)

    if mode == "cross":
        scores = subcaption_patch_scores(
            subcaptions.reshape(B * M, -1), patches, k, patch_mask=patch_mask,
            temperature=temperature, normalize=normalize, backend=backend,
        )
        logits = logit_scale * scores.to(compute_dtype(scores.dtype))
        targets = torch.arange(B, device=logits.device).repeat_interleave(M)
        ce = F.cross_entropy(logits, targets, reduction="none")
        valid = subcaption_mask.reshape(-1)
        return torch.where(valid, ce, torch.zeros_like(ce)).sum() / valid.sum().clamp_min(1)

    regions = subcaption_patch_align(
        subcaptions, patches, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
        temperature=temperature, normalize=normalize, backend=backend,
    )
    regions = l2_normalize(regions)
    u = l2_normalize(subcaptions) if normalize else subcaptions
    if gather_with_grad:
        regions, u, subcaption_mask = gather_batch(regions), gather_batch(u), gather_batch(subcaption_mask)
    if mode == "all":
        return _symmetric_masked_contrast(
            regions.reshape(1, -1, regions.shape[-1]), u.reshape(1, -1, u.shape[-1]), subcaption_mask.reshape(1, -1),
            logit_scale,
        )[0]
    per_slot = _symmetric_masked_contrast(regions.transpose(0, 1), u.transpose(0, 1), subcaption_mask.t(), logit_scale)
    enough = subcaption_mask.sum(dim=0) >= 2
    return torch.where(enough, per_slot, torch.zeros_like(per_slot)).sum() / M
