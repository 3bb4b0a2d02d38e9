"""Lean PyTorch path of subcaption top-k patch aggregation (SAP), paired and cross.

Forward runs in chunks, in float32 (float64 stays float64): similarity, top-k (ties to the
lower index), softmax over the k chosen patches, aggregation. It saves the inputs and the chosen
indices only (int32: O(B M k) paired, O(N B k) cross); backward gathers the k chosen patches
again and applies the analytic gradient. The full similarity tensor exists one chunk at a time
in forward and never in backward. Both directions are `torch.library` custom ops.

Gradient, per subcaption u with chosen patches v_1..v_k, s_j = u . v_j, w = softmax(s / tau),
region = sum_j w_j v_j, upstream g = dL/dregion:
    dw_j = g . v_j;  ds_j = w_j (dw_j - sum_i w_i dw_i) / tau
    du = sum_j ds_j v_j;  dv_j = w_j g + ds_j u   (scattered back to the chosen patch indices)
Cross scores add score = u . region / max(|region|, eps) in front of it.
"""
from typing import Tuple

import torch
from torch import Tensor

from .chunking import chunk_slices
from .torch_word_patch import calibrate, calibrate_backward, normalize_backward
from ..reference import EPS, compute_dtype


def topk_lower_index(scores: Tensor, k: int) -> Tensor:
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


def _weights(u: Tensor, chosen: Tensor, temperature: float) -> Tensor:
    """Softmax weights (..., k) of u (..., d) over its chosen patches (..., k, d)."""
    return torch.softmax(torch.einsum("...d,...kd->...k", u, chosen) / temperature, dim=-1)


def _aggregate_backward(grad_region: Tensor, u: Tensor, chosen: Tensor, weights: Tensor,
                        temperature: float) -> Tuple[Tensor, Tensor]:
    """(du, d_chosen) from the gradient of region = sum_j w_j chosen_j."""
    d_weights = torch.einsum("...d,...kd->...k", grad_region, chosen)
    d_sim = weights * (d_weights - (weights * d_weights).sum(dim=-1, keepdim=True)) / temperature
    d_u = torch.einsum("...k,...kd->...d", d_sim, chosen)
    d_chosen = weights[..., None] * grad_region[..., None, :] + d_sim[..., None] * u[..., None, :]
    return d_u, d_chosen


def _scatter_chosen(d_chosen: Tensor, index: Tensor, images: int, patches: int) -> Tensor:
    """Sum d_chosen (..., B', k, d), index (..., B', k) into (B', P, d) by image and patch index.

    The image axis is the second to last batch axis of `index`.
    """
    d = d_chosen.shape[-1]
    offsets = torch.arange(images, device=index.device)[:, None] * patches
    flat = (index + offsets).reshape(-1)
    out = torch.zeros(images * patches, d, dtype=d_chosen.dtype, device=d_chosen.device)
    return out.index_add_(0, flat, d_chosen.reshape(-1, d)).view(images, patches, d)


# ---------------------------------------------------------------------------------------------
# Paired: each sample's subcaptions against its own image.
# ---------------------------------------------------------------------------------------------

def _gather_own(v: Tensor, index: Tensor) -> Tensor:
    """v (b,P,d), index (b,M,k) -> the chosen patches (b,M,k,d)."""
    rows = torch.arange(v.shape[0], device=v.device)[:, None, None]
    return v[rows, index]


def _paired_row_elements(M: int, P: int, k: int, d: int) -> int:
    return M * max(P, 3 * k * d)


@torch.library.custom_op("mulclip::subcaption_patch_align_torch_forward", mutates_args=())
def subcaption_patch_align_forward(subcaptions: Tensor, patches: Tensor, k: int, subcaption_mask: Tensor,
                                   patch_mask: Tensor, temperature: float,
                                   normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Regions (B,M,d) in the input dtype and the chosen indices (B,M,k) int32."""
    B, M, d = subcaptions.shape
    regions = torch.empty_like(subcaptions)
    index = torch.empty((B, M, k), dtype=torch.int32, device=subcaptions.device)
    for s in chunk_slices(B, _paired_row_elements(M, patches.shape[1], k, d)):
        u, _ = calibrate(subcaptions[s], subcaption_mask[s], normalize_inputs)
        v, _ = calibrate(patches[s], patch_mask[s], normalize_inputs)
        sigma = (u @ v.transpose(1, 2)).masked_fill(~patch_mask[s, None, :], float("-inf"))
        chunk_index = topk_lower_index(sigma, k)
        chosen = _gather_own(v, chunk_index)
        chunk = torch.einsum("bmk,bmkd->bmd", _weights(u, chosen, temperature), chosen)
        regions[s] = torch.where(subcaption_mask[s, :, None], chunk, torch.zeros((), device=chunk.device))
        index[s] = chunk_index.int()
    return regions, index


@subcaption_patch_align_forward.register_fake
def _(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
    B, M, _ = subcaptions.shape
    return torch.empty_like(subcaptions), subcaptions.new_empty((B, M, k), dtype=torch.int32)


@torch.library.custom_op("mulclip::subcaption_patch_align_torch_backward", mutates_args=())
def subcaption_patch_align_backward(grad_regions: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor,
                                    subcaption_mask: Tensor, patch_mask: Tensor, temperature: float,
                                    normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for subcaptions and patches from the saved indices."""
    grad_sub, grad_patch = torch.empty_like(subcaptions), torch.empty_like(patches)
    B, M, d = subcaptions.shape
    P, k = patches.shape[1], index.shape[-1]
    for s in chunk_slices(B, _paired_row_elements(M, P, k, d)):
        u, u_norm = calibrate(subcaptions[s], subcaption_mask[s], normalize_inputs)
        v, v_norm = calibrate(patches[s], patch_mask[s], normalize_inputs)
        chunk_index = index[s].long()
        chosen = _gather_own(v, chunk_index)
        g = torch.where(subcaption_mask[s, :, None], grad_regions[s].to(u.dtype), torch.zeros((), device=u.device))
        d_u, d_chosen = _aggregate_backward(g, u, chosen, _weights(u, chosen, temperature), temperature)
        d_v = _scatter_chosen(d_chosen.reshape(-1, M * k, d), chunk_index.reshape(-1, M * k), u.shape[0], P)
        grad_sub[s] = calibrate_backward(d_u, u, u_norm, subcaption_mask[s], subcaptions.dtype)
        grad_patch[s] = calibrate_backward(d_v, v, v_norm, patch_mask[s], patches.dtype)
    return grad_sub, grad_patch


@subcaption_patch_align_backward.register_fake
def _(grad_regions, subcaptions, patches, index, subcaption_mask, patch_mask, temperature, normalize_inputs):
    return torch.empty_like(subcaptions), torch.empty_like(patches)


def _align_setup_context(ctx, inputs, output):
    subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs = inputs
    ctx.save_for_backward(subcaptions, patches, output[1], subcaption_mask, patch_mask)
    ctx.options = (temperature, normalize_inputs)


def _align_backward(ctx, grad_regions, _grad_index):
    subcaptions, patches, index, subcaption_mask, patch_mask = ctx.saved_tensors
    grad_sub, grad_patch = subcaption_patch_align_backward(
        grad_regions.contiguous(), subcaptions, patches, index, subcaption_mask, patch_mask, *ctx.options
    )
    return grad_sub, grad_patch, None, None, None, None, None


subcaption_patch_align_forward.register_autograd(_align_backward, setup_context=_align_setup_context)


def subcaption_patch_align(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
    """Regions (B,M,d); same contract as `reference.subcaption_patch_align`."""
    return subcaption_patch_align_forward(
        subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs
    )[0]


# ---------------------------------------------------------------------------------------------
# Cross: every subcaption against every image.
# ---------------------------------------------------------------------------------------------

def _gather_cross(v: Tensor, index: Tensor) -> Tensor:
    """v (B,P,d), index (n,B,k) -> the chosen patches (n,B,k,d)."""
    images = torch.arange(v.shape[0], device=v.device)[None, :, None]
    return v[images, index]


def _cross_row_elements(B: int, P: int, k: int, d: int) -> int:
    return B * max(P, 3 * k * d)


def _rows(subcaptions: Tensor, normalize_inputs: bool):
    return calibrate(subcaptions, torch.ones(subcaptions.shape[:-1], dtype=torch.bool, device=subcaptions.device),
                     normalize_inputs)


@torch.library.custom_op("mulclip::subcaption_patch_scores_torch_forward", mutates_args=())
def subcaption_patch_scores_forward(subcaptions: Tensor, patches: Tensor, k: int, patch_mask: Tensor,
                                    temperature: float, normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Scores (N,B) in the input dtype and the chosen indices (N,B,k) int32."""
    N, d = subcaptions.shape
    B, P, _ = patches.shape
    v, _ = calibrate(patches, patch_mask, normalize_inputs)
    scores = torch.empty((N, B), dtype=subcaptions.dtype, device=subcaptions.device)
    index = torch.empty((N, B, k), dtype=torch.int32, device=subcaptions.device)
    for s in chunk_slices(N, _cross_row_elements(B, P, k, d)):
        u, _ = _rows(subcaptions[s], normalize_inputs)
        sigma = torch.einsum("nd,bpd->nbp", u, v).masked_fill(~patch_mask[None], float("-inf"))
        chunk_index = topk_lower_index(sigma, k)
        chosen = _gather_cross(v, chunk_index)
        regions = torch.einsum("nbk,nbkd->nbd", _weights(u[:, None, :], chosen, temperature), chosen)
        regions = regions / regions.norm(dim=-1, keepdim=True).clamp_min(EPS)
        scores[s] = (u[:, None, :] * regions).sum(dim=-1).to(scores.dtype)
        index[s] = chunk_index.int()
    return scores, index


@subcaption_patch_scores_forward.register_fake
def _(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
    N, B = subcaptions.shape[0], patches.shape[0]
    return subcaptions.new_empty((N, B)), subcaptions.new_empty((N, B, k), dtype=torch.int32)


@torch.library.custom_op("mulclip::subcaption_patch_scores_torch_backward", mutates_args=())
def subcaption_patch_scores_backward(grad_scores: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor,
                                     patch_mask: Tensor, temperature: float,
                                     normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for subcaptions and patches from the saved indices."""
    N, d = subcaptions.shape
    B, P, _ = patches.shape
    v, v_norm = calibrate(patches, patch_mask, normalize_inputs)
    grad_sub = torch.empty_like(subcaptions)
    d_v = torch.zeros_like(v)
    for s in chunk_slices(N, _cross_row_elements(B, P, index.shape[-1], d)):
        u, u_norm = _rows(subcaptions[s], normalize_inputs)
        chunk_index = index[s].long()
        chosen = _gather_cross(v, chunk_index)  # (n,B,k,d)
        weights = _weights(u[:, None, :], chosen, temperature)
        regions = torch.einsum("nbk,nbkd->nbd", weights, chosen)
        region_norm = regions.norm(dim=-1, keepdim=True)
        unit = regions / region_norm.clamp_min(EPS)
        g = grad_scores[s].to(u.dtype)[..., None]  # (n,B,1)
        d_u = (g * unit).sum(dim=1)
        d_regions = normalize_backward(g * u[:, None, :], unit, region_norm)
        d_u_agg, d_chosen = _aggregate_backward(d_regions, u[:, None, :].expand_as(d_regions), chosen, weights,
                                                temperature)
        d_u = d_u + d_u_agg.sum(dim=1)
        d_v += _scatter_chosen(d_chosen.transpose(0, 1).reshape(B, -1, d), chunk_index.transpose(0, 1).reshape(B, -1),
                               B, P)
        grad_sub[s] = calibrate_backward(d_u, u, u_norm, torch.ones_like(u[..., 0], dtype=torch.bool),
                                         subcaptions.dtype)
    return grad_sub, calibrate_backward(d_v, v, v_norm, patch_mask, patches.dtype)


@subcaption_patch_scores_backward.register_fake
def _(grad_scores, subcaptions, patches, index, patch_mask, temperature, normalize_inputs):
    return torch.empty_like(subcaptions), torch.empty_like(patches)


def _scores_setup_context(ctx, inputs, output):
    subcaptions, patches, k, patch_mask, temperature, normalize_inputs = inputs
    ctx.save_for_backward(subcaptions, patches, output[1], patch_mask)
    ctx.options = (temperature, normalize_inputs)


def _scores_backward(ctx, grad_scores, _grad_index):
    subcaptions, patches, index, patch_mask = ctx.saved_tensors
    grad_sub, grad_patch = subcaption_patch_scores_backward(
        grad_scores.contiguous(), subcaptions, patches, index, patch_mask, *ctx.options
    )
    return grad_sub, grad_patch, None, None, None, None


subcaption_patch_scores_forward.register_autograd(_scores_backward, setup_context=_scores_setup_context)


def subcaption_patch_scores(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
    """Scores (N,B); same contract as `reference.subcaption_patch_scores`."""
    return subcaption_patch_scores_forward(subcaptions, patches, k, patch_mask, temperature, normalize_inputs)[0]
