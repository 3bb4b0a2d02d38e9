"""Public entry points of subcaption top-k patch aggregation (SAP), method section 4."""
from typing import Optional

import torch

from . import validation
from .dispatch import resolve


def subcaption_patch_align(
    subcaptions: torch.Tensor,
    patches: torch.Tensor,
    k: int,
    *,
    subcaption_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.05,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Aggregate, for every subcaption, its k most similar patches of its own image into a region.

    With `u = norm(subcaption)` and `v' = norm(patch)`: `sigma_p = u . v'_p` over valid patches,
    `I` = the k largest (ties to the lower patch index), `w = softmax_I(sigma / temperature)`,
    `region = sum_{p in I} w_p v'_p` (not normalised). Gradients flow through w into u and v'
    and through the chosen v'_p; the choice of I has no gradient.

    Args:
        subcaptions: (B, M, d) sentence embeddings; float16, bfloat16, float32 or float64.
        patches: (B, P, d) patch embeddings, same dtype and device.
        k: number of patches per region, 1 <= k <= valid patches of every image that has a
            valid subcaption (ValueError otherwise).
        subcaption_mask: (B, M) bool, True for real subcaptions; None means all. A masked
            subcaption gives an exactly zero region and receives zero gradient.
        patch_mask: (B, P) bool, True for valid patches; None means all.
        temperature: tau_a of the softmax over the chosen patches (default 0.05).
        normalize: L2-normalise subcaptions and patches first; False uses them as given.
        backend: "auto", "reference" (materialises (B,M,P)), "torch" (chunked), or a fused
            backend when installed.

    Returns:
        regions (B, M, d) in the input dtype. Backward state: the inputs and the chosen
        indices, O(B M k), for every backend but "reference".
    """
    validation.check_float_tensor("subcaptions", subcaptions, 3, "(B, M, d)")
    validation.check_float_tensor("patches", patches, 3, "(B, P, d)")
    validation.check_same_dtype_device(subcaptions=subcaptions, patches=patches)
    validation.check_batch("patches", patches, "subcaptions", subcaptions)
    validation.check_width("patches", patches, "subcaptions", subcaptions)
    B, M, _ = subcaptions.shape
    P = patches.shape[1]
    device = subcaptions.device
    subcaption_mask = validation.check_mask("subcaption_mask", subcaption_mask, (B, M), "(B, M)", device)
    patch_mask = validation.check_mask("patch_mask", patch_mask, (B, P), "(B, P)", device)
    temperature = validation.check_temperature("temperature", temperature)
    k = validation.check_k(k, patch_mask, rows=subcaption_mask.any(dim=-1))
    impl = resolve("subcaption_patch_align", backend, device)
    return impl(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, bool(normalize))


def subcaption_patch_scores(
    subcaptions: torch.Tensor,
    patches: torch.Tensor,
    k: int,
    *,
    patch_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.05,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Score every subcaption against every image through its top-k region in that image.

    `s(n, b) = u_n . norm(r(u_n, image_b))` with the region r of `subcaption_patch_align`
    built in image b. With b the subcaption's own image this is the cosine of the paired
    alignment.

    Args:
        subcaptions: (N, d) sentence embeddings; float16, bfloat16, float32 or float64.
        patches: (B, P, d) patch embeddings, same dtype and device.
        k: 1 <= k <= valid patches of every image (ValueError otherwise).
        patch_mask: (B, P) bool, True for valid patches; None means all.
        temperature: tau_a of the softmax over the chosen patches (default 0.05).
        normalize: L2-normalise subcaptions and patches first; False uses them as given.
        backend: "auto", "reference" (materialises (N,B,P)), "torch" (chunked over N), or a
            fused backend when installed.

    Returns:
        scores (N, B) in the input dtype. Backward state: the inputs and the chosen indices,
        O(N B k), for every backend but "reference".
    """
    validation.check_float_tensor("subcaptions", subcaptions, 2, "(N, d)")
    validation.check_float_tensor("patches", patches, 3, "(B, P, d)")
    validation.check_same_dtype_device(subcaptions=subcaptions, patches=patches)
    validation.check_width("patches", patches, "subcaptions", subcaptions)
    B, P, _ = patches.shape
    patch_mask = validation.check_mask("patch_mask", patch_mask, (B, P), "(B, P)", subcaptions.device)
    temperature = validation.check_temperature("temperature", temperature)
    k = validation.check_k(k, patch_mask)
    impl = resolve("subcaption_patch_scores", backend, subcaptions.device)
    return impl(subcaptions, patches, k, patch_mask, temperature, bool(normalize))
