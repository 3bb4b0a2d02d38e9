"""Lean PyTorch path of subcaption top-k patch aggregation (SAP), paired and cross.

Forward runs in chunks without autograd, in float32 (float64 stays float64): similarity, top-k (ties to the lower
index), softmax over the k chosen patches, aggregation. It saves the inputs and the chosen
indices only (int32: O(B M k) paired, O(N B k) cross); backward gathers the k chosen patches
again and recomputes the rest of the chunk with autograd. The full similarity tensor exists one
chunk at a time in forward and never in backward.
"""
import torch

from ..reference import compute_dtype, normalize
from .chunking import chunk_slices


def topk_lower_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k largest entries along the last axis, ties to the lower index.

    `torch.topk` gives the right k-th value but no tie rule: every entry above the k-th value is
    taken, then entries equal to it in index order until k are taken. Each row holds exactly k
    selected entries, so `nonzero` returns them row by row.
    """
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(dim=-1, keepdim=True)
    selected = greater | (equal & (torch.cumsum(equal, dim=-1) <= need))
    return selected.nonzero()[:, -1].view(*scores.shape[:-1], k)


def _calibrate(x: torch.Tensor, mask: torch.Tensor, normalize_inputs: bool) -> torch.Tensor:
    x = torch.where(mask[..., None], x.to(compute_dtype(x.dtype)), torch.zeros((), device=x.device))
    return normalize(x) if normalize_inputs else x


def _calibrate_rows(x: torch.Tensor, normalize_inputs: bool) -> torch.Tensor:
    x = x.to(compute_dtype(x.dtype))
    return normalize(x) if normalize_inputs else x


def _aggregate(u: torch.Tensor, chosen: torch.Tensor, temperature: float) -> torch.Tensor:
    """Region from u (..., d) and its k chosen patches (..., k, d): softmax-weighted sum."""
    weights = torch.softmax(torch.einsum("...d,...kd->...k", u, chosen) / temperature, dim=-1)
    return torch.einsum("...k,...kd->...d", weights, chosen)


# ---------------------------------------------------------------------------------------------
# Paired: each sample's subcaptions against its own image.
# ---------------------------------------------------------------------------------------------

def _gather_own(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v (b,P,d), index (b,M,k) -> the chosen patches (b,M,k,d)."""
    rows = torch.arange(v.shape[0], device=v.device)[:, None, None]
    return v[rows, index]


def _paired_regions(subcaptions, patches, index, subcaption_mask, patch_mask, temperature, normalize_inputs):
    u = _calibrate(subcaptions, subcaption_mask, normalize_inputs)
    v = _calibrate(patches, patch_mask, normalize_inputs)
    regions = _aggregate(u, _gather_own(v, index), temperature)
    return torch.where(subcaption_mask[..., None], regions, torch.zeros((), device=regions.device))


class SubcaptionPatchAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
        B, M, d = subcaptions.shape
        P = patches.shape[1]
        regions = torch.empty_like(subcaptions)
        index = torch.empty((B, M, k), dtype=torch.int32, device=subcaptions.device)
        for s in chunk_slices(B, M * max(P, k * d)):
            u = _calibrate(subcaptions[s], subcaption_mask[s], normalize_inputs)
            v = _calibrate(patches[s], patch_mask[s], normalize_inputs)
            sigma = (u @ v.transpose(1, 2)).masked_fill(~patch_mask[s, None, :], float("-inf"))
            chunk_index = topk_lower_index(sigma, k)
            index[s] = chunk_index.int()
            chunk = _aggregate(u, _gather_own(v, chunk_index), temperature)
            regions[s] = torch.where(subcaption_mask[s, :, None], chunk, torch.zeros((), device=chunk.device))
        ctx.save_for_backward(subcaptions, patches, index, subcaption_mask, patch_mask)
        ctx.options = (temperature, normalize_inputs)
        return regions

    @staticmethod
    def backward(ctx, grad_regions):
        subcaptions, patches, index, subcaption_mask, patch_mask = ctx.saved_tensors
        temperature, normalize_inputs = ctx.options
        need_sub, need_patch = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_sub = torch.zeros_like(subcaptions) if need_sub else None
        grad_patch = torch.zeros_like(patches) if need_patch else None
        grad_regions = grad_regions.to(compute_dtype(grad_regions.dtype)).contiguous()
        B, M, d = subcaptions.shape
        for s in chunk_slices(B, M * max(patches.shape[1], index.shape[-1] * d)):
            with torch.enable_grad():
                sub = subcaptions[s].detach().requires_grad_(need_sub)
                pat = patches[s].detach().requires_grad_(need_patch)
                regions = _paired_regions(sub, pat, index[s].long(), subcaption_mask[s], patch_mask[s],
                                          temperature, normalize_inputs)
                inputs = [x for x in (sub, pat) if x.requires_grad]
                grads = list(torch.autograd.grad(regions, inputs, grad_regions[s]))
            if need_sub:
                grad_sub[s] = grads.pop(0)
            if need_patch:
                grad_patch[s] = grads.pop(0)
        return grad_sub, grad_patch, None, None, None, None, None


def subcaption_patch_align(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
    """Regions (B,M,d); same contract as `reference.subcaption_patch_align`."""
    return SubcaptionPatchAlignFunction.apply(
        subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs
    )


# ---------------------------------------------------------------------------------------------
# Cross: every subcaption against every image.
# ---------------------------------------------------------------------------------------------

def _gather_cross(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v (B,P,d), index (n,B,k) -> the chosen patches (n,B,k,d)."""
    images = torch.arange(v.shape[0], device=v.device)[None, :, None]
    return v[images, index]


def _cross_scores(u: torch.Tensor, v: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    regions = _aggregate(u[:, None, :], _gather_cross(v, index), temperature)  # (n,B,d)
    return (u[:, None, :] * normalize(regions)).sum(dim=-1)


def _cross_row_elements(B: int, P: int, k: int, d: int) -> int:
    return B * max(P, k * d)


class SubcaptionPatchScoresFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
        N, d = subcaptions.shape
        B, P, _ = patches.shape
        v = _calibrate(patches, patch_mask, normalize_inputs)
        scores = torch.empty((N, B), dtype=subcaptions.dtype, device=subcaptions.device)
        index = torch.empty((N, B, k), dtype=torch.int32, device=subcaptions.device)
        for s in chunk_slices(N, _cross_row_elements(B, P, k, d)):
            u = _calibrate_rows(subcaptions[s], normalize_inputs)
            sigma = torch.einsum("nd,bpd->nbp", u, v).masked_fill(~patch_mask[None], float("-inf"))
            chunk_index = topk_lower_index(sigma, k)
            index[s] = chunk_index.int()
            scores[s] = _cross_scores(u, v, chunk_index, temperature).to(scores.dtype)
        ctx.save_for_backward(subcaptions, patches, index, patch_mask)
        ctx.options = (temperature, normalize_inputs)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        subcaptions, patches, index, patch_mask = ctx.saved_tensors
        temperature, normalize_inputs = ctx.options
        need_sub, need_patch = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, d = subcaptions.shape
        B, P, _ = patches.shape
        grad_sub = torch.zeros_like(subcaptions) if need_sub else None
        grad_scores = grad_scores.to(compute_dtype(grad_scores.dtype)).contiguous()
        with torch.enable_grad():
            pat = patches.detach().requires_grad_(need_patch)
            v = _calibrate(pat, patch_mask, normalize_inputs)
            # Chunks accumulate into the gradient of the calibrated patches; the normalisation
            # is differentiated once at the end instead of once per chunk.
            v_leaf = v.detach().requires_grad_(need_patch)
            grad_v = torch.zeros_like(v_leaf) if need_patch else None
            for s in chunk_slices(N, _cross_row_elements(B, P, index.shape[-1], d)):
                sub = subcaptions[s].detach().requires_grad_(need_sub)
                u = _calibrate_rows(sub, normalize_inputs)
                scores = _cross_scores(u, v_leaf, index[s].long(), temperature)
                inputs = [x for x in (sub, v_leaf) if x.requires_grad]
                grads = list(torch.autograd.grad(scores, inputs, grad_scores[s]))
                if need_sub:
                    grad_sub[s] = grads.pop(0)
                if need_patch:
                    grad_v += grads.pop(0)
            grad_patch = torch.autograd.grad(v, pat, grad_v)[0] if need_patch else None
        return grad_sub, grad_patch, None, None, None, None


def subcaption_patch_scores(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
    """Scores (N,B); same contract as `reference.subcaption_patch_scores`."""
    return SubcaptionPatchScoresFunction.apply(subcaptions, patches, k, patch_mask, temperature, normalize_inputs)
