"""Lean PyTorch path of subcaption top-k patch aggregation (SAP), paired and cross.

Forward runs in chunks, in float32 (float64 stays float64): similarity, top-k (ties to the
lower index), softmax over the k chosen patches, aggregation. It saves the inputs and the chosen
indices only (int32: O(B M k) paired, O(N B k) cross); backward recomputes the chunk's
similarities and applies the analytic gradient. Within a chunk the k-sparse weights are spread
into a dense (rows, P) matrix so that aggregation and its gradient are batched matmuls, which a
CPU runs far faster than gathers of (rows, k, d) patch copies; nothing of that size outlives
its chunk. Both directions are `torch.library` custom ops.

Gradient, per subcaption u with chosen patches v_1..v_k, s_j = u . v_j, w = softmax(s / tau),
region = sum_j w_j v_j, upstream g = dL/dregion:
    dw_j = g . v_j;  ds_j = w_j (dw_j - sum_i w_i dw_i) / tau
    du = sum_j ds_j v_j;  dv_j = w_j g + ds_j u
With W and dS the weights and ds spread densely over the patches: du = dS v, dv = W^T g + dS^T u.
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


def _dense_weights(sigma: Tensor, index: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """Softmax over the chosen similarities, (..., k), and the same spread densely over (..., P)."""
    weights = torch.softmax(torch.gather(sigma, -1, index) / temperature, dim=-1)
    return weights, torch.zeros_like(sigma).scatter_(-1, index, weights)


def _dense_sim_grad(d_dense: Tensor, index: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """From dL/dW (dense (..., P)) to dL/dsigma (dense, nonzero on the chosen patches only)."""
    d_weights = torch.gather(d_dense, -1, index)
    d_sim = weights * (d_weights - (weights * d_weights).sum(dim=-1, keepdim=True)) / temperature
    return torch.zeros_like(d_dense).scatter_(-1, index, d_sim)


# ---------------------------------------------------------------------------------------------
# Paired: each sample's subcaptions against its own image.
# ---------------------------------------------------------------------------------------------

def _paired_row_elements(M: int, P: int) -> int:
    return 4 * M * P


def _paired_similarity(subcaptions, patches, subcaption_mask, patch_mask, normalize_inputs):
    u, u_norm = calibrate(subcaptions, subcaption_mask, normalize_inputs)
    v, v_norm = calibrate(patches, patch_mask, normalize_inputs)
    sigma = (u @ v.transpose(1, 2)).masked_fill(~patch_mask[:, None, :], float("-inf"))
    return u, u_norm, v, v_norm, sigma


@torch.library.custom_op("mulclip::subcaption_patch_align_torch_forward", mutates_args=())
def subcaption_patch_align_forward(subcaptions: Tensor, patches: Tensor, k: int, subcaption_mask: Tensor,
                                   patch_mask: Tensor, temperature: float,
                                   normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Regions (B,M,d) in the input dtype and the chosen indices (B,M,k) int32."""
    B, M, d = subcaptions.shape
    regions = torch.empty_like(subcaptions)
    index = torch.empty((B, M, k), dtype=torch.int32, device=subcaptions.device)
    for s in chunk_slices(B, _paired_row_elements(M, patches.shape[1])):
        _, _, v, _, sigma = _paired_similarity(subcaptions[s], patches[s], subcaption_mask[s], patch_mask[s],
                                               normalize_inputs)
        chunk_index = topk_lower_index(sigma, k)
        chunk = _dense_weights(sigma, chunk_index, temperature)[1] @ v
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
    B, M, _ = subcaptions.shape
    for s in chunk_slices(B, _paired_row_elements(M, patches.shape[1])):
        u, u_norm, v, v_norm, sigma = _paired_similarity(subcaptions[s], patches[s], subcaption_mask[s],
                                                         patch_mask[s], normalize_inputs)
        chunk_index = index[s].long()
        weights, dense = _dense_weights(sigma, chunk_index, temperature)
        g = torch.where(subcaption_mask[s, :, None], grad_regions[s].to(u.dtype), torch.zeros((), device=u.device))
        d_sim = _dense_sim_grad(g @ v.transpose(1, 2), chunk_index, weights, temperature)
        d_u = d_sim @ v
        d_v = dense.transpose(1, 2) @ g + d_sim.transpose(1, 2) @ u
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

def _cross_row_elements(B: int, P: int) -> int:
    return 4 * B * P


def _rows(subcaptions: Tensor, normalize_inputs: bool):
    return calibrate(subcaptions, torch.ones(subcaptions.shape[:-1], dtype=torch.bool, device=subcaptions.device),
                     normalize_inputs)


@torch.library.custom_op("mulclip::subcaption_patch_scores_torch_forward", mutates_args=())
def subcaption_patch_scores_forward(subcaptions: Tensor, patches: Tensor, k: int, patch_mask: Tensor,
                                    temperature: float, normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Scores (N,B) in the input dtype and the chosen indices (N,B,k) int32."""
    N = subcaptions.shape[0]
    B, P, _ = patches.shape
    v, _ = calibrate(patches, patch_mask, normalize_inputs)
    scores = torch.empty((N, B), dtype=subcaptions.dtype, device=subcaptions.device)
    index = torch.empty((N, B, k), dtype=torch.int32, device=subcaptions.device)
    for s in chunk_slices(N, _cross_row_elements(B, P)):
        u, _ = _rows(subcaptions[s], normalize_inputs)
        sigma = torch.einsum("nd,bpd->nbp", u, v).masked_fill(~patch_mask[None], float("-inf"))
        chunk_index = topk_lower_index(sigma, k)
        regions = torch.einsum("nbp,bpd->nbd", _dense_weights(sigma, chunk_index, temperature)[1], v)
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
    N = subcaptions.shape[0]
    B, P, _ = patches.shape
    v, v_norm = calibrate(patches, patch_mask, normalize_inputs)
    grad_sub = torch.empty_like(subcaptions)
    d_v = torch.zeros_like(v)
    for s in chunk_slices(N, _cross_row_elements(B, P)):
        u, u_norm = _rows(subcaptions[s], normalize_inputs)
        chunk_index = index[s].long()
        sigma = torch.einsum("nd,bpd->nbp", u, v)  # the chosen entries are never masked ones
        weights, dense = _dense_weights(sigma, chunk_index, temperature)
        regions = torch.einsum("nbp,bpd->nbd", dense, v)
        region_norm = regions.norm(dim=-1, keepdim=True)
        unit = regions / region_norm.clamp_min(EPS)
        g = grad_scores[s].to(u.dtype)[..., None]  # (n,B,1)
        d_regions = normalize_backward(g * u[:, None, :], unit, region_norm)
        d_sim = _dense_sim_grad(torch.einsum("nbd,bpd->nbp", d_regions, v), chunk_index, weights, temperature)
        d_u = (g * unit).sum(dim=1) + torch.einsum("nbp,bpd->nd", d_sim, v)
        d_v += torch.einsum("nbp,nbd->bpd", dense, d_regions) + torch.einsum("nbp,nd->bpd", d_sim, u)
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
