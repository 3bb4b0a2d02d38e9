"""SAP as torch.library custom ops over a compiled extension (backends "cpp" and "cuda").

`define_ops` registers, for one backend, the four ops
`mulclip::subcaption_patch_{align,scores}_<backend>_{forward,backward}`. A forward op returns the
output and the residuals of backward: the chosen indices (int32) and their similarities sigma
(float32, float64 for float64 inputs), and for the cross scores also rho = r . v' of the chosen
patches, so O(B M k) / O(N B k) beyond the inputs. A backward op returns the input gradients
from those, without autograd (none runs inside a custom op). Fake implementations and
`register_autograd` make `torch.compile(fullgraph=True)` trace each direction as one opaque
node. The extension module is fetched through `load()` only when an op runs, so importing a
backend builds nothing.
"""
from types import SimpleNamespace
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..reference import compute_dtype


def define_ops(backend: str, device_type: str, load: Callable[[], object],
               check: Optional[Callable[[Tensor, Tensor, int], None]] = None) -> SimpleNamespace:
    """Register the SAP custom ops of `backend` (running on `device_type`) and return the backend
    functions `subcaption_patch_align` and `subcaption_patch_scores` (reference argument order)
    together with the four ops.

    `check(subcaptions, patches, k)` may raise ValueError/TypeError for inputs the backend
    cannot take; it runs before the forward op, on static shapes, so it also works when compiled.
    """
    name = f"mulclip::subcaption_patch_{{op}}_{backend}_{{direction}}"

    # -- paired --------------------------------------------------------------------------------
    @torch.library.custom_op(name.format(op="align", direction="forward"), mutates_args=(),
                             device_types=device_type)
    def align_forward(subcaptions: Tensor, patches: Tensor, k: int, subcaption_mask: Tensor, patch_mask: Tensor,
                      temperature: float, normalize_inputs: bool) -> Tuple[Tensor, Tensor, Tensor]:
        regions, index, sigma = load().align_forward(subcaptions, patches, k, subcaption_mask, patch_mask,
                                                     temperature, normalize_inputs)
        return regions, index, sigma

    @align_forward.register_fake
    def _(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
        B, M, _ = subcaptions.shape
        return (subcaptions.new_empty(subcaptions.shape), subcaptions.new_empty((B, M, k), dtype=torch.int32),
                subcaptions.new_empty((B, M, k), dtype=compute_dtype(subcaptions.dtype)))

    @torch.library.custom_op(name.format(op="align", direction="backward"), mutates_args=(),
                             device_types=device_type)
    def align_backward(grad_regions: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor, sigma: Tensor,
                       subcaption_mask: Tensor, patch_mask: Tensor, temperature: float,
                       normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
        grad_sub, grad_patches = load().align_backward(grad_regions, subcaptions, patches, index, sigma,
                                                       subcaption_mask, patch_mask, temperature, normalize_inputs)
        return grad_sub, grad_patches

    @align_backward.register_fake
    def _(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask, temperature,
          normalize_inputs):
        return subcaptions.new_empty(subcaptions.shape), patches.new_empty(patches.shape)

    def align_setup_context(ctx, inputs, output):
        subcaptions, patches, _, subcaption_mask, patch_mask, temperature, normalize_inputs = inputs
        ctx.save_for_backward(subcaptions, patches, output[1], output[2], subcaption_mask, patch_mask)
        ctx.options = (temperature, normalize_inputs)

    def align_autograd(ctx, grad_regions, *_):
        subcaptions, patches, index, sigma, subcaption_mask, patch_mask = ctx.saved_tensors
        grad_sub, grad_patches = align_backward(grad_regions.contiguous(), subcaptions, patches, index, sigma,
                                                subcaption_mask, patch_mask, *ctx.options)
        return grad_sub, grad_patches, None, None, None, None, None

    align_forward.register_autograd(align_autograd, setup_context=align_setup_context)

    # -- cross ---------------------------------------------------------------------------------
    @torch.library.custom_op(name.format(op="scores", direction="forward"), mutates_args=(),
                             device_types=device_type)
    def scores_forward(subcaptions: Tensor, patches: Tensor, k: int, patch_mask: Tensor, temperature: float,
                       normalize_inputs: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        scores, index, sigma, rho = load().scores_forward(subcaptions, patches, k, patch_mask, temperature,
                                                          normalize_inputs)
        return scores, index, sigma, rho

    @scores_forward.register_fake
    def _(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
        N, B = subcaptions.shape[0], patches.shape[0]
        stats = compute_dtype(subcaptions.dtype)
        return (subcaptions.new_empty((N, B)), subcaptions.new_empty((N, B, k), dtype=torch.int32),
                subcaptions.new_empty((N, B, k), dtype=stats), subcaptions.new_empty((N, B, k), dtype=stats))

    @torch.library.custom_op(name.format(op="scores", direction="backward"), mutates_args=(),
                             device_types=device_type)
    def scores_backward(grad_scores: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor, sigma: Tensor,
                        rho: Tensor, patch_mask: Tensor, temperature: float,
                        normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
        grad_sub, grad_patches = load().scores_backward(grad_scores, subcaptions, patches, index, sigma, rho,
                                                        patch_mask, temperature, normalize_inputs)
        return grad_sub, grad_patches

    @scores_backward.register_fake
    def _(grad_scores, subcaptions, patches, index, sigma, rho, patch_mask, temperature, normalize_inputs):
        return subcaptions.new_empty(subcaptions.shape), patches.new_empty(patches.shape)

    def scores_setup_context(ctx, inputs, output):
        subcaptions, patches, _, patch_mask, temperature, normalize_inputs = inputs
        ctx.save_for_backward(subcaptions, patches, output[1], output[2], output[3], patch_mask)
        ctx.options = (temperature, normalize_inputs)

    def scores_autograd(ctx, grad_scores, *_):
        subcaptions, patches, index, sigma, rho, patch_mask = ctx.saved_tensors
        grad_sub, grad_patches = scores_backward(grad_scores.contiguous(), subcaptions, patches, index, sigma, rho,
                                                 patch_mask, *ctx.options)
        return grad_sub, grad_patches, None, None, None, None

    scores_forward.register_autograd(scores_autograd, setup_context=scores_setup_context)

    # -- backend functions ---------------------------------------------------------------------
    def subcaption_patch_align(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
        """Regions (B,M,d); same contract as `reference.subcaption_patch_align`."""
        if check is not None:
            check(subcaptions, patches, k)
        return align_forward(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs)[0]

    def subcaption_patch_scores(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
        """Scores (N,B); same contract as `reference.subcaption_patch_scores`."""
        if check is not None:
            check(subcaptions, patches, k)
        return scores_forward(subcaptions, patches, k, patch_mask, temperature, normalize_inputs)[0]

    return SimpleNamespace(
        subcaption_patch_align=subcaption_patch_align, subcaption_patch_scores=subcaption_patch_scores,
        align_forward=align_forward, align_backward=align_backward,
        scores_forward=scores_forward, scores_backward=scores_backward,
    )
