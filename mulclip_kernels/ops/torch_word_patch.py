"""Lean PyTorch path of the word-patch reconstruction (WPR) loss.

The batch is processed in chunks of samples, in float32 (float64 stays float64). Forward saves
only its inputs; backward recomputes each chunk and applies the analytic gradient, so nothing of
size B*K*P, B*K*K or B*P*P is saved and the live intermediates are bounded by one chunk
(`chunking.DEFAULT_CHUNK_ELEMENTS`). Both directions are `torch.library` custom ops, so
`torch.compile(fullgraph=True)` sees one opaque node per direction.

Gradient of one side (words rebuilt from patches; the image side swaps the roles), per sample,
a = calibrated rows, b = calibrated columns, S = a b^T:
    A = softmax_b(S / tau_r), y = A b, r = y / max(|y|, eps), G = r a^T / tau_c,
    L = mean over valid rows i of (lse_j G_ij - G_ii)
    dG = g / n_valid * (softmax(G) - I) on valid rows;  dr = dG a / tau_c;  da = dG^T r / tau_c
    dy = (dr - r (r . dr)) / |y|;  dA = dy b^T;  db = A^T dy
    dS = A * (dA - (dy . y)) / tau_r;  da += dS b;  db += dS^T a
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference import EPS, compute_dtype
from .chunking import chunk_slices


def _per_row_elements(K: int, P: int) -> int:
    return K * P + K * K + P * P


def calibrate(x: Tensor, mask: Tensor, normalize_inputs: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Masked rows zeroed, then L2-normalised; returns the rows and their norms (None if not normalised)."""
    x = torch.where(mask[..., None], x.to(compute_dtype(x.dtype)), torch.zeros((), device=x.device))
    if not normalize_inputs:
        return x, None
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(EPS), norm


def normalize_backward(grad: Tensor, y: Tensor, norm: Tensor) -> Tensor:
    """Gradient through y = x / max(|x|, eps), given y and |x|."""
    projected = grad - y * (y * grad).sum(dim=-1, keepdim=True)
    return torch.where(norm > EPS, projected / norm.clamp_min(EPS), grad / EPS)


def calibrate_backward(grad: Tensor, y: Tensor, norm: Optional[Tensor], mask: Tensor, dtype: torch.dtype) -> Tensor:
    if norm is not None:
        grad = normalize_backward(grad, y, norm)
    return torch.where(mask[..., None], grad, torch.zeros((), device=grad.device)).to(dtype)


def _open(mask: Tensor) -> Tensor:
    """Softmax mask over the last axis, opened fully on rows with no valid entry (finite, discarded)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def _side(a, a_mask, b, b_mask, sim, recon_temperature, contrast_temperature, grad=None):
    """One side of WPR: the loss per sample (grad None), or (da, db) for the per-sample grad."""
    attn = torch.softmax((sim / recon_temperature).masked_fill(~_open(b_mask)[:, None, :], float("-inf")), dim=-1)
    recon = attn @ b
    recon_norm = recon.norm(dim=-1, keepdim=True)
    r = recon / recon_norm.clamp_min(EPS)
    logits = (r @ a.transpose(1, 2) / contrast_temperature).masked_fill(~_open(a_mask)[:, None, :], float("-inf"))
    count = a_mask.sum(dim=-1).clamp_min(1)
    if grad is None:
        ce = torch.logsumexp(logits, dim=-1) - torch.diagonal(logits, dim1=-2, dim2=-1)
        return torch.where(a_mask, ce, torch.zeros((), dtype=ce.dtype, device=ce.device)).sum(dim=-1) / count
    d_logits = torch.softmax(logits, dim=-1)
    d_logits.diagonal(dim1=-2, dim2=-1).sub_(1)
    d_logits *= (grad / count)[:, None, None] * a_mask[..., None]
    d_r = d_logits @ a / contrast_temperature
    d_a = d_logits.transpose(1, 2) @ r / contrast_temperature
    d_recon = normalize_backward(d_r, r, recon_norm)
    d_b = attn.transpose(1, 2) @ d_recon
    d_sim = attn * (d_recon @ b.transpose(1, 2) - (d_recon * recon).sum(dim=-1, keepdim=True)) / recon_temperature
    return d_a + d_sim @ b, d_b + d_sim.transpose(1, 2) @ a


def _chunk(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs,
           grad=None):
    t, t_norm = calibrate(words, word_mask, normalize_inputs)
    v, v_norm = calibrate(patches, patch_mask, normalize_inputs)
    sim = t @ v.transpose(1, 2)
    temperatures = (recon_temperature, contrast_temperature)
    has_word = word_mask.any(dim=-1)
    if grad is None:
        loss = (_side(t, word_mask, v, patch_mask, sim, *temperatures)
                + _side(v, patch_mask, t, word_mask, sim.transpose(1, 2), *temperatures)) / 2
        return torch.where(has_word, loss, torch.zeros_like(loss))
    half = torch.where(has_word, grad.to(sim.dtype) / 2, torch.zeros((), dtype=sim.dtype, device=sim.device))
    d_t, d_v = _side(t, word_mask, v, patch_mask, sim, *temperatures, grad=half)
    d_v2, d_t2 = _side(v, patch_mask, t, word_mask, sim.transpose(1, 2), *temperatures, grad=half)
    return (calibrate_backward(d_t + d_t2, t, t_norm, word_mask, words.dtype),
            calibrate_backward(d_v + d_v2, v, v_norm, patch_mask, patches.dtype))


@torch.library.custom_op("mulclip::word_patch_reconstruction_torch_forward", mutates_args=())
def word_patch_reconstruction_forward(words: Tensor, word_mask: Tensor, patches: Tensor, patch_mask: Tensor,
                                      recon_temperature: float, contrast_temperature: float,
                                      normalize_inputs: bool) -> Tensor:
    """Per-sample loss (B,), chunk by chunk, without autograd."""
    options = (recon_temperature, contrast_temperature, normalize_inputs)
    slices = chunk_slices(words.shape[0], _per_row_elements(words.shape[1], patches.shape[1]))
    return torch.cat([_chunk(words[s], word_mask[s], patches[s], patch_mask[s], *options) for s in slices])


@word_patch_reconstruction_forward.register_fake
def _(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs):
    return words.new_empty(words.shape[0], dtype=compute_dtype(words.dtype))


@torch.library.custom_op("mulclip::word_patch_reconstruction_torch_backward", mutates_args=())
def word_patch_reconstruction_backward(grad_loss: Tensor, words: Tensor, word_mask: Tensor, patches: Tensor,
                                       patch_mask: Tensor, recon_temperature: float, contrast_temperature: float,
                                       normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients of sum(grad_loss * loss) for words and patches, recomputing chunk by chunk."""
    grad_words, grad_patches = torch.empty_like(words), torch.empty_like(patches)
    options = (recon_temperature, contrast_temperature, normalize_inputs)
    for s in chunk_slices(words.shape[0], _per_row_elements(words.shape[1], patches.shape[1])):
        grad_words[s], grad_patches[s] = _chunk(words[s], word_mask[s], patches[s], patch_mask[s], *options,
                                                grad=grad_loss[s])
    return grad_words, grad_patches


@word_patch_reconstruction_backward.register_fake
def _(grad_loss, words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs):
    return torch.empty_like(words), torch.empty_like(patches)


def _setup_context(ctx, inputs, output):
    words, word_mask, patches, patch_mask, *options = inputs
    ctx.save_for_backward(words, word_mask, patches, patch_mask)
    ctx.options = options


def _backward(ctx, grad_loss):
    words, word_mask, patches, patch_mask = ctx.saved_tensors
    grad_words, grad_patches = word_patch_reconstruction_backward(
        grad_loss.contiguous(), words, word_mask, patches, patch_mask, *ctx.options
    )
    return grad_words, None, grad_patches, None, None, None, None


word_patch_reconstruction_forward.register_autograd(_backward, setup_context=_setup_context)


def word_patch_reconstruction(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature,
                              normalize_inputs):
    """Per-sample WPR loss (B,); same contract as `reference.word_patch_reconstruction`."""
    return word_patch_reconstruction_forward(
        words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs
    )
