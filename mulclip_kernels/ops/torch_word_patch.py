"""Lean PyTorch path of the word-patch reconstruction (WPR) loss.

The batch is processed in chunks of samples, in float32 (float64 stays float64). Forward runs without autograd and
saves only the inputs; backward recomputes each chunk with autograd and discards it before the
next, so nothing of size B*K*P or B*K*K is ever saved, and the live intermediates are bounded
by one chunk (`chunking.DEFAULT_CHUNK_ELEMENTS`).
"""
import torch

from .. import reference
from ..reference import compute_dtype
from .chunking import chunk_slices


def _per_row_elements(words: torch.Tensor, patches: torch.Tensor) -> int:
    K, P = words.shape[1], patches.shape[1]
    return K * P + K * K + P * P


def _chunk_loss(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs):
    dtype = compute_dtype(words.dtype)
    return reference.word_patch_reconstruction(
        words.to(dtype), word_mask, patches.to(dtype), patch_mask, recon_temperature, contrast_temperature, normalize_inputs
    )


class WordPatchReconstructionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs):
        slices = chunk_slices(words.shape[0], _per_row_elements(words, patches))
        losses = [
            _chunk_loss(words[s], word_mask[s], patches[s], patch_mask[s],
                        recon_temperature, contrast_temperature, normalize_inputs)
            for s in slices
        ]
        ctx.save_for_backward(words, word_mask, patches, patch_mask)
        ctx.options = (recon_temperature, contrast_temperature, normalize_inputs)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_loss):
        words, word_mask, patches, patch_mask = ctx.saved_tensors
        need_words, need_patches = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_words = torch.zeros_like(words) if need_words else None
        grad_patches = torch.zeros_like(patches) if need_patches else None
        grad_loss = grad_loss.contiguous()
        for s in chunk_slices(words.shape[0], _per_row_elements(words, patches)):
            with torch.enable_grad():
                w = words[s].detach().requires_grad_(need_words)
                p = patches[s].detach().requires_grad_(need_patches)
                loss = _chunk_loss(w, word_mask[s], p, patch_mask[s], *ctx.options)
                inputs = [x for x in (w, p) if x.requires_grad]
                grads = list(torch.autograd.grad(loss, inputs, grad_loss[s]))
            if need_words:
                grad_words[s] = grads.pop(0)
            if need_patches:
                grad_patches[s] = grads.pop(0)
        return grad_words, None, grad_patches, None, None, None, None


def word_patch_reconstruction(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature,
                              normalize_inputs):
    """Per-sample WPR loss (B,); same contract as `reference.word_patch_reconstruction`."""
    return WordPatchReconstructionFunction.apply(
        words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs
    )
