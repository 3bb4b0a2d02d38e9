"""The eager reference: sections 3 and 4 of ../shared/method.md written literally in PyTorch.

Every similarity, softmax and logit tensor is materialised in the input dtype, and autograd
saves all of them. This is the ground truth that every other backend is tested and benchmarked
against; it is deliberately simple, not fast or lean.

The functions take validated inputs with bool masks already built (see the public API in
`mulclip_kernels` for argument documentation). Masked inputs are replaced by zeros first, so
that padding, even NaN padding, never reaches an output or a gradient.
"""
import torch

EPS = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and loss dtype: float32 for 16-bit inputs, float32/float64 kept as they are."""
    return torch.promote_types(dtype, torch.float32)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """`x / max(||x||_2, eps)` along the last dimension, `eps = 1e-6`."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _calibrate(x: torch.Tensor, mask: torch.Tensor, normalize_inputs: bool) -> torch.Tensor:
    x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return normalize(x) if normalize_inputs else x


def _softmax_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask for a softmax over the last axis, opened fully on rows with no valid entry.

    A row with nothing valid would be all -inf and give NaN; its result is discarded later, but
    a NaN forward value would still turn its zero gradient into NaN.
    """
    return mask | ~mask.any(dim=-1, keepdim=True)


def masked_diagonal_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per group: mean over valid rows i of CE(logits[i, valid], target i); logits (G,n,n), mask (G,n).

    Returns (G,) in float32 (float64 for float64 logits), 0 for a group with no valid row.
    """
    col_mask = _softmax_mask(mask)[:, None, :]
    logits = logits.masked_fill(~col_mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # (B,n)
    ce = lse - torch.diagonal(logits, dim1=-2, dim2=-1)
    ce = torch.where(mask, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    count = mask.sum(dim=-1).clamp_min(1)
    return ce.to(compute_dtype(ce.dtype)).sum(dim=-1) / count


def word_patch_reconstruction(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    patch_mask: torch.Tensor,
    recon_temperature: float,
    contrast_temperature: float,
    normalize_inputs: bool,
) -> torch.Tensor:
    """Per-sample WPR loss (B,) in float32, float64 for float64 inputs (method section 3).

    0 for a sample with no valid word.
    """
    t = _calibrate(words, word_mask, normalize_inputs)  # (B,K,d)
    v = _calibrate(patches, patch_mask, normalize_inputs)  # (B,P,d)
    sim = t @ v.transpose(1, 2)  # (B,K,P)

    # Text side: each word is rebuilt from the patches and must pick itself out among the words.
    attn = torch.softmax(
        (sim / recon_temperature).masked_fill(~_softmax_mask(patch_mask)[:, None, :], float("-inf")), dim=-1
    )
    recon_words = normalize(attn @ v)  # (B,K,d)
    word_logits = recon_words @ t.transpose(1, 2) / contrast_temperature  # (B,K,K)
    loss_text = masked_diagonal_cross_entropy(word_logits, word_mask)

    # Image side: each patch is rebuilt from the words and must pick itself out among the patches.
    attn_t = torch.softmax(
        (sim.transpose(1, 2) / recon_temperature).masked_fill(~_softmax_mask(word_mask)[:, None, :], float("-inf")),
        dim=-1,
    )
    recon_patches = normalize(attn_t @ t)  # (B,P,d)
    patch_logits = recon_patches @ v.transpose(1, 2) / contrast_temperature  # (B,P,P)
    loss_image = masked_diagonal_cross_entropy(patch_logits, patch_mask)

    loss = (loss_text + loss_image) / 2
    return torch.where(word_mask.any(dim=-1), loss, torch.zeros_like(loss))


def topk_lower_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last axis, ties to the lower index.

    A stable descending sort keeps equal entries in index order, which is the tie rule.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def _aggregate(sigma: torch.Tensor, patch_mask: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Dense aggregation weights (..., P): softmax over the top-k of sigma, zero elsewhere."""
    sigma = sigma.masked_fill(~patch_mask, float("-inf"))
    index = topk_lower_index(sigma.detach(), k)
    weights = torch.softmax(torch.gather(sigma, -1, index) / temperature, dim=-1)
    return torch.zeros_like(sigma).scatter(-1, index, weights)


def subcaption_patch_align(
    subcaptions: torch.Tensor,
    patches: torch.Tensor,
    k: int,
    subcaption_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    temperature: float,
    normalize_inputs: bool,
) -> torch.Tensor:
    """Regions (B,M,d) in the input dtype (method section 4, paired); zero for masked subcaptions."""
    u = _calibrate(subcaptions, subcaption_mask, normalize_inputs)  # (B,M,d)
    v = _calibrate(patches, patch_mask, normalize_inputs)  # (B,P,d)
    sigma = u @ v.transpose(1, 2)  # (B,M,P)
    weights = _aggregate(sigma, patch_mask[:, None, :], k, temperature)
    regions = weights @ v  # (B,M,d)
    return torch.where(subcaption_mask[..., None], regions, torch.zeros((), dtype=regions.dtype, device=regions.device))


def subcaption_patch_scores(
    subcaptions: torch.Tensor,
    patches: torch.Tensor,
    k: int,
    patch_mask: torch.Tensor,
    temperature: float,
    normalize_inputs: bool,
) -> torch.Tensor:
    """Scores (N,B): `u_n . norm(r(u_n, image_b))` (method section 4, cross), input dtype."""
    u = normalize(subcaptions) if normalize_inputs else subcaptions  # (N,d)
    v = _calibrate(patches, patch_mask, normalize_inputs)  # (B,P,d)
    sigma = torch.einsum("nd,bpd->nbp", u, v)  # (N,B,P)
    weights = _aggregate(sigma, patch_mask[None], k, temperature)
    regions = torch.einsum("nbp,bpd->nbd", weights, v)  # (N,B,d)
    return (u[:, None, :] * normalize(regions)).sum(dim=-1)
