"""Fused Triton backend ("triton") of subcaption top-k patch aggregation (SAP), method section 4.

Layout (Liger style): the `@triton.jit` kernels with the math in comments, then the host
functions that allocate, pick tiles and launch, then the `torch.library` custom ops (analytic
backward registered on each forward op), and last `aot_kernel_configs()` for the ahead-of-time
compile check of `mulclip_kernels.aot`.

Per subcaption row u = x / max(|x|, eps) and one image's patches v' = X / max(|X|, eps):

    sigma_p = u . v'_p,  I = top-k of sigma (ties to the lower index),  w = softmax_I(sigma / tau)
    region r = sum_{j in I} w_j v'_j                       paired: the output, (B, M, d)
    s = u . r / max(|r|, eps) = sum_j w_j sigma_j / max(|r|, eps)     cross: the output, (N, B)

Forward, `_forward_kernel`, one program per (block of rows, image): the similarity tile of a
patch tile is a `tl.dot` over width chunks (calibration folded in as 1 / norm factors), then a
streaming top-k over the patch tiles: each similarity and its patch index are packed into one
int64 key (float bits made order-preserving in the high half, 0x7FFFFFFF - index in the low
half, so that equal similarities prefer the lower index), `tl.topk` keeps a tile's best KP keys
and `tl.bitonic_merge` merges them into the running best (KP = k rounded up to a power of two;
the slots past k are never used). Nothing of size rows x P is stored. The k chosen rows are then
gathered in width chunks for the softmax-weighted region; the cross scores also accumulate |r|^2
and rho_j = r . v'_j. Saved for backward: the indices (int32) and similarities (fp32) of the
chosen patches, and rho for the cross scores: O(B M k) paired, O(N B k) cross.

Backward recomputes the softmax from the saved sigma and gathers the chosen rows again; with
g the upstream gradient (a region row paired, a scalar cross), nn = max(|r|, eps):
  paired  dw_j = g . v'_j (a first pass over the width),  ds_j = w_j (dw_j - sum_i w_i dw_i) / tau
          du = sum_j ds_j v'_j,  dv'_j += w_j g + ds_j u
  cross   dw_j = g (sigma_j - [|r| > eps] s rho_j / nn) / nn,  ds_j as above
          du = sum_j c_j v'_j with c_j = g w_j / nn + ds_j
          dv'_j += c_j u - [|r| > eps] (g s w_j / nn^2) r
Every coefficient is a function of the saved k-vectors, so the cross backward splits the width
over programs (one per (block of rows, width chunk)) and loops over the images. u . du, needed
by the calibration backward dx = (du - u (u . du)) / |x| (du / eps when |x| <= eps), is
sum_j coef_j sigma_j: no reduction over the width. The patch gradients dv' land on chosen rows
of many subcaptions: they are accumulated with fp32 atomics into a (B, P, d) buffer (summation
order, hence the last bits, vary from run to run), and `_patch_grad_kernel` applies the patch
calibration backward and casts.

Numerics: dot operands in the input dtype (fp32: IEEE, never TF32), fp32 accumulators and
statistics. The selection uses the fp32 similarities the kernel computed; an input with two
patches whose similarities differ in the last bits may choose differently from another path.
Under the Triton interpreter bf16 arithmetic is wrong, so bf16 is converted to fp32 on load
there (`triton_word_patch._dot_dtypes`). Float64 inputs, and k > 64 (the running top-k lives in
registers), go to the "torch" backend.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_subcaption_patch, triton_word_patch
from .triton_word_patch import (_EPS, _contract, _inv_norm, _load_rows, _on_device, _pad, _row_valid, padded_width)

LOG2E = math.log2(math.e)
MAX_K = 64
_MIN_KEY = tl.constexpr(-0x7FFFFFFFFFFFFFFF)  # below every packed similarity: masked or absent patch


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pack_keys(s, o_p, m_p):
    """int64 keys whose integer order is (similarity, then lower patch index); masked: _MIN_KEY.

    The fp32 bits of a negative float are flipped (all but the sign) so that signed integer order
    is float order; + 0.0 turns -0.0 into +0.0, which the reference's float compare treats as equal.
    """
    bits = (s + 0.0).to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - o_p).to(tl.int64)[None, :]
    return tl.where(m_p[None, :], key, _MIN_KEY)


@triton.jit
def _unpack_keys(best, k, KP: tl.constexpr):
    """(index int32, sigma fp32, valid) of the KP best keys; a slot past k or without a patch is
    invalid, with index -1 and sigma 0."""
    o_j = tl.arange(0, KP)
    m_j = (o_j[None, :] < k) & (best != _MIN_KEY)
    idx = 0x7FFFFFFF - (best & 0xFFFFFFFF).to(tl.int32)
    hi = (best >> 32).to(tl.int32)
    sig = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    return tl.where(m_j, idx, -1), tl.where(m_j, sig, 0.0), m_j


@triton.jit
def _top_k_keys(x_ptr, o_r, m_r, inv_r, v_ptr, v_mask_ptr, v_norm_ptr, P, D,
                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DK: tl.constexpr, KP: tl.constexpr,
                DOT: tl.constexpr):
    """[BLOCK_R, KP] best packed keys (descending) of the rows against one image's valid patches."""
    best = tl.full([BLOCK_R, KP], _MIN_KEY, dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = _row_valid(v_mask_ptr, o_p, P)
        inv_p = _inv_norm(v_norm_ptr, o_p, m_p)
        b_s = _contract(x_ptr, o_r, m_r, v_ptr, o_p, m_p, D, BLOCK_R, BLOCK_P, BLOCK_DK, DOT)
        b_s = b_s * inv_r[:, None] * inv_p[None, :]
        top = tl.topk(_pack_keys(b_s, o_p, m_p), KP, dim=1)
        # best descending, flip(top) ascending: their maximum is bitonic and holds the KP best.
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), dim=1, descending=True)
    return best


@triton.jit
def _softmax_weights(sig, m_j, scale):
    """softmax over the valid slots of sigma * scale (base 2: scale = log2(e) / tau); 0 elsewhere,
    and 0 on a row without a valid slot."""
    b_l = tl.where(m_j, sig * scale, float("-inf"))
    b_m = tl.max(b_l, axis=1)
    b_p = tl.where(m_j, tl.exp2(b_l - tl.where(b_m > float("-inf"), b_m, 0.0)[:, None]), 0.0)
    b_sum = tl.sum(b_p, axis=1)
    return b_p / tl.where(b_sum > 0, b_sum, 1.0)[:, None]


@triton.jit
def _gathered_inv_norm(v_norm_ptr, idx, m_j):
    """1 / max(|X|, eps) of the chosen patches, 0 on invalid slots."""
    n = tl.load(v_norm_ptr + idx, mask=m_j, other=1.0)
    return tl.where(m_j, 1.0 / tl.maximum(n, _EPS), 0.0)


@triton.jit
def _gather(v_ptr, idx, m_j, inv_j, o_v, D):
    """[R, KP, BLOCK_DV] fp32 calibrated chosen rows v'[idx] at columns o_v; 0 on invalid slots."""
    m = m_j[:, :, None] & (o_v[None, None, :] < D)
    vals = tl.load(v_ptr + idx[:, :, None] * D + o_v[None, None, :], mask=m, other=0.0).to(tl.float32)
    return vals * inv_j[:, :, None]


@triton.jit(do_not_specialize=["n_rows", "row_b_stride", "P", "k", "pair_row_stride", "pair_b_stride"])
def _forward_kernel(x_ptr, x_mask_ptr, x_norm_ptr, v_ptr, v_mask_ptr, v_norm_ptr, out_ptr, index_ptr, sigma_ptr,
                    rho_ptr, n_rows, row_b_stride, P, D, k, scale, pair_row_stride, pair_b_stride,
                    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    KP: tl.constexpr, CROSS: tl.constexpr, DOT: tl.constexpr):
    """Top-k, softmax and region of rows [i_r * BLOCK_R, +BLOCK_R) against image i_b.

    Rows of image b start at row b * row_b_stride (paired: M, their own subcaptions; cross: 0, the
    same N subcaptions for every image). The (row, image) pair is pair = row * pair_row_stride +
    b * pair_b_stride (paired b*M + m, cross n*B + b): index, sigma (and rho) at pair * k + j.
    Paired writes the region row (zero for a masked row) at pair * D; cross writes the score at
    pair and rho. scale = log2(e) / tau. Grid (cdiv(n_rows, BLOCK_R), B).
    """
    i_r = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row0 = i_b * row_b_stride
    m_r = _row_valid(x_mask_ptr + row0, o_r, n_rows)
    inv_r = _inv_norm(x_norm_ptr + row0, o_r, m_r)
    v_ptr += i_b * P * D
    v_norm_ptr += i_b * P
    best = _top_k_keys(x_ptr + row0 * D, o_r, m_r, inv_r, v_ptr, v_mask_ptr + i_b * P, v_norm_ptr, P, D,
                       BLOCK_R, BLOCK_P, BLOCK_DK, KP, DOT)
    idx, sig, m_j = _unpack_keys(best, k, KP)
    m_j = m_j & m_r[:, None]  # a masked row aggregates nothing: a zero region
    b_w = _softmax_weights(sig, m_j, scale)
    inv_j = _gathered_inv_norm(v_norm_ptr, idx, m_j)
    pair = o_r.to(tl.int64) * pair_row_stride + i_b * pair_b_stride
    m_out = o_r < n_rows
    b_rr = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_rho = tl.zeros([BLOCK_R, KP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DV):
        o_v = d0 + tl.arange(0, BLOCK_DV)
        vals = _gather(v_ptr, idx, m_j, inv_j, o_v, D)
        b_r = tl.sum(b_w[:, :, None] * vals, axis=1)  # [BR, BDV]: this chunk of the region
        if CROSS:
            b_rr += tl.sum(b_r * b_r, axis=1)
            b_rho += tl.sum(b_r[:, None, :] * vals, axis=2)
        else:
            tl.store(out_ptr + pair[:, None] * D + o_v[None, :], b_r.to(out_ptr.dtype.element_ty),
                     mask=m_out[:, None] & (o_v[None, :] < D))
    o_j = tl.arange(0, KP)
    m_store = m_out[:, None] & (o_j[None, :] < k)
    saved = pair[:, None] * k + o_j[None, :]
    tl.store(index_ptr + saved, idx, mask=m_store)
    tl.store(sigma_ptr + saved, sig, mask=m_store)
    if CROSS:
        b_score = tl.sum(b_w * sig, axis=1) / tl.maximum(tl.sqrt(b_rr), _EPS)
        tl.store(out_ptr + pair, b_score.to(out_ptr.dtype.element_ty), mask=m_out)
        tl.store(rho_ptr + saved, b_rho, mask=m_store)


@triton.jit
def _rows_backward(du, u, udu, nrm, m_r, normalize):
    """dx of rows x from du, u = x / max(|x|, eps) and u . du: zero on masked rows."""
    if normalize:
        du = tl.where((nrm > _EPS)[:, None], (du - u * udu[:, None]) / tl.maximum(nrm, _EPS)[:, None], du / _EPS)
    return tl.where(m_r[:, None], du, 0.0)


@triton.jit(do_not_specialize=["M", "P", "k", "normalize"])
def _align_backward_kernel(x_ptr, x_mask_ptr, x_norm_ptr, v_ptr, v_norm_ptr, grad_ptr, index_ptr, sigma_ptr,
                           dx_ptr, dv_ptr, M, P, D, k, scale, inv_tau, normalize,
                           BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, KP: tl.constexpr):
    """Paired backward of rows [i_r * BLOCK_R, +BLOCK_R) of sample i_b: dx rows (x dtype) and
    fp32 atomic adds of dv' into dv (B, P, D). Grid (cdiv(M, BLOCK_R), B)."""
    i_r = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = _row_valid(x_mask_ptr + i_b * M, o_r, M)
    pair = i_b * M + o_r
    o_j = tl.arange(0, KP)
    saved = pair[:, None] * k + o_j[None, :]
    m_j = m_r[:, None] & (o_j[None, :] < k)
    idx = tl.load(index_ptr + saved, mask=m_j, other=-1)
    m_j = m_j & (idx >= 0)
    sig = tl.load(sigma_ptr + saved, mask=m_j, other=0.0)
    b_w = _softmax_weights(sig, m_j, scale)
    v_ptr += i_b * P * D
    dv_ptr += i_b * P * D
    inv_j = _gathered_inv_norm(v_norm_ptr + i_b * P, idx, m_j)

    b_dw = tl.zeros([BLOCK_R, KP], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DV):
        o_v = d0 + tl.arange(0, BLOCK_DV)
        b_g = _load_rows(grad_ptr + i_b * M * D, o_r, m_r, o_v, D, tl.float32)
        b_dw += tl.sum(b_g[:, None, :] * _gather(v_ptr, idx, m_j, inv_j, o_v, D), axis=2)
    b_ds = b_w * (b_dw - tl.sum(b_w * b_dw, axis=1)[:, None]) * inv_tau
    b_udu = tl.sum(b_ds * sig, axis=1)

    nrm = tl.load(x_norm_ptr + i_b * M + o_r, mask=m_r, other=1.0)
    inv_r = _inv_norm(x_norm_ptr + i_b * M, o_r, m_r)
    for d0 in range(0, D, BLOCK_DV):
        o_v = d0 + tl.arange(0, BLOCK_DV)
        m_v = o_v < D
        b_g = _load_rows(grad_ptr + i_b * M * D, o_r, m_r, o_v, D, tl.float32)
        b_u = _load_rows(x_ptr + i_b * M * D, o_r, m_r, o_v, D, tl.float32) * inv_r[:, None]
        vals = _gather(v_ptr, idx, m_j, inv_j, o_v, D)
        b_du = tl.sum(b_ds[:, :, None] * vals, axis=1)
        b_dv = b_w[:, :, None] * b_g[:, None, :] + b_ds[:, :, None] * b_u[:, None, :]
        tl.atomic_add(dv_ptr + idx[:, :, None] * D + o_v[None, None, :], b_dv,
                      mask=m_j[:, :, None] & m_v[None, None, :])
        b_dx = _rows_backward(b_du, b_u, b_udu, nrm, m_r, normalize)
        tl.store(dx_ptr + pair[:, None] * D + o_v[None, :], b_dx.to(dx_ptr.dtype.element_ty),
                 mask=(o_r < M)[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["N", "B", "P", "k", "normalize"])
def _scores_backward_kernel(x_ptr, x_norm_ptr, v_ptr, v_norm_ptr, grad_ptr, index_ptr, sigma_ptr, rho_ptr,
                            dx_ptr, dv_ptr, N, B, P, D, k, scale, inv_tau, normalize,
                            BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, KP: tl.constexpr):
    """Cross backward of rows [i_r * BLOCK_R, +BLOCK_R), columns [i_d * BLOCK_DV, +BLOCK_DV):
    a loop over the images; dx columns (x dtype) and fp32 atomic adds of dv' into dv (B, P, D).
    Grid (cdiv(N, BLOCK_R), cdiv(D, BLOCK_DV))."""
    i_r, i_d = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_v = i_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_r = o_r < N
    m_v = o_v < D
    o_j = tl.arange(0, KP)
    nrm = tl.load(x_norm_ptr + o_r, mask=m_r, other=1.0)
    b_u = _load_rows(x_ptr, o_r, m_r, o_v, D, tl.float32) * _inv_norm(x_norm_ptr, o_r, m_r)[:, None]
    b_du = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    b_udu = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i_b in range(0, B):  # v_ptr, v_norm_ptr and dv_ptr advance to image i_b (64-bit pointer arithmetic)
        pair = o_r.to(tl.int64) * B + i_b
        saved = pair[:, None] * k + o_j[None, :]
        m_j = m_r[:, None] & (o_j[None, :] < k)
        idx = tl.load(index_ptr + saved, mask=m_j, other=-1)
        m_j = m_j & (idx >= 0)
        sig = tl.load(sigma_ptr + saved, mask=m_j, other=0.0)
        rho = tl.load(rho_ptr + saved, mask=m_j, other=0.0)
        b_w = _softmax_weights(sig, m_j, scale)
        b_g = tl.load(grad_ptr + pair, mask=m_r, other=0.0).to(tl.float32)
        b_n = tl.sqrt(tl.maximum(tl.sum(b_w * rho, axis=1), 0.0))  # |r|^2 = sum_j w_j rho_j
        b_nn = tl.maximum(b_n, _EPS)
        b_s = tl.sum(b_w * sig, axis=1) / b_nn
        b_sr = tl.where(b_n > _EPS, b_s / b_nn, 0.0)
        b_dw = b_g[:, None] * (sig - b_sr[:, None] * rho) / b_nn[:, None]
        b_ds = b_w * (b_dw - tl.sum(b_w * b_dw, axis=1)[:, None]) * inv_tau
        b_c = (b_g / b_nn)[:, None] * b_w + b_ds  # of v'_j in du, and of u in dv'_j
        b_cr = (b_g * b_sr / b_nn)[:, None] * b_w  # of r in -dv'_j
        b_udu += tl.sum(b_c * sig, axis=1)
        inv_j = _gathered_inv_norm(v_norm_ptr, idx, m_j)
        vals = _gather(v_ptr, idx, m_j, inv_j, o_v, D)
        b_du += tl.sum(b_c[:, :, None] * vals, axis=1)
        b_r = tl.sum(b_w[:, :, None] * vals, axis=1)
        b_dv = b_c[:, :, None] * b_u[:, None, :] - b_cr[:, :, None] * b_r[:, None, :]
        tl.atomic_add(dv_ptr + idx[:, :, None] * D + o_v[None, None, :], b_dv,
                      mask=m_j[:, :, None] & m_v[None, None, :])
        v_ptr += P * D
        v_norm_ptr += P
        dv_ptr += P * D
    b_dx = _rows_backward(b_du, b_u, b_udu, nrm, m_r, normalize)
    tl.store(dx_ptr + o_r[:, None] * D + o_v[None, :], b_dx.to(dx_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_v[None, :])


@triton.jit(do_not_specialize=["n", "normalize"])
def _patch_grad_kernel(v_ptr, v_mask_ptr, v_norm_ptr, dv_ptr, out_ptr, n, D, normalize,
                       BLOCK_R: tl.constexpr, BLOCK_DK: tl.constexpr):
    """out = calibration backward of the accumulated fp32 dv' rows (n = B * P rows), zero on
    masked rows, in the output dtype. Grid (cdiv(n, BLOCK_R),)."""
    o_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = _row_valid(v_mask_ptr, o_r, n)
    nrm = tl.load(v_norm_ptr + o_r, mask=m_r, other=1.0)
    inv = _inv_norm(v_norm_ptr, o_r, m_r)
    b_dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    if normalize:
        for d0 in range(0, D, BLOCK_DK):
            o_c = d0 + tl.arange(0, BLOCK_DK)
            b_v = _load_rows(v_ptr, o_r, m_r, o_c, D, tl.float32) * inv[:, None]
            b_dot += tl.sum(b_v * _load_rows(dv_ptr, o_r, m_r, o_c, D, tl.float32), axis=1)
    for d0 in range(0, D, BLOCK_DK):
        o_c = d0 + tl.arange(0, BLOCK_DK)
        b_v = _load_rows(v_ptr, o_r, m_r, o_c, D, tl.float32) * inv[:, None]
        b_dx = _rows_backward(_load_rows(dv_ptr, o_r, m_r, o_c, D, tl.float32), b_v, b_dot, nrm, m_r, normalize)
        tl.store(out_ptr + o_r[:, None] * D + o_c[None, :], b_dx.to(out_ptr.dtype.element_ty),
                 mask=(o_r < n)[:, None] & (o_c[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Host: tiles, launches
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of one kernel.

    block_r: subcaption rows (or patch rows) per program; block_p: the streamed patch tile of the
    similarity and top-k; block_dk: chunk of a contraction over the width; block_dv: width chunk
    of the gathered [block_r, KP, block_dv] rows (and of the cross backward's programs).
    """

    block_r: int
    block_p: int
    block_dk: int
    block_dv: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Plan:
    """Tiles of every kernel for one top-k width and dtype."""

    forward: Tiles
    forward_cross: Tiles
    align_backward: Tiles
    scores_backward: Tiles
    rows: Tiles


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def slots(k: int) -> int:
    """KP, the top-k width the kernels keep: k rounded up to a power of two, at least 8 (fewer
    specialisations to compile; the slots past k are masked)."""
    return max(8, _pow2(k))


# (width chunk BLOCK_DV, warps) per kernel, dot dtype and KP: for each, the candidate (chunks 8 to
# 64, 4 or 8 warps) with the most columns per warp among those that compile for sm_80 and sm_90
# with no spill, preferring under 250 registers (ptxas spills some of these configurations at
# 64-128 registers and not their neighbours, so no simple rule holds). Registers: the larger of
# the two architectures; docs/triton_kernels.md has the compiled table.
_GATHER_TILES = {
    ("align_backward", "16-bit", 8): (32, 4),  # 237 registers
    ("align_backward", "16-bit", 16): (16, 4),  # 165 registers
    ("align_backward", "16-bit", 32): (16, 4),  # 186 registers
    ("align_backward", "16-bit", 64): (32, 4),  # 242 registers
    ("align_backward", "fp32", 8): (16, 4),  # 188 registers
    ("align_backward", "fp32", 16): (32, 8),  # 180 registers
    ("align_backward", "fp32", 32): (32, 4),  # 248 registers
    ("align_backward", "fp32", 64): (32, 4),  # 244 registers
    ("forward", "16-bit", 8): (16, 4),  # 168 registers (32 spills in fp16 on sm_90)
    ("forward", "16-bit", 16): (16, 4),  # 168 registers
    ("forward", "16-bit", 32): (32, 4),  # 249 registers
    ("forward", "16-bit", 64): (32, 8),  # 248 registers
    ("forward_cross", "16-bit", 8): (32, 4),  # 168 registers
    ("forward_cross", "16-bit", 16): (16, 4),  # 168 registers
    ("forward_cross", "16-bit", 32): (16, 4),  # 248 registers
    ("forward_cross", "16-bit", 64): (16, 8),  # 241 registers
    ("forward", "fp32", 8): (64, 4),  # 209 registers
    ("forward", "fp32", 16): (64, 8),  # 188 registers
    ("forward", "fp32", 32): (32, 8),  # 187 registers
    ("forward", "fp32", 64): (8, 4),  # 200 registers
    ("forward_cross", "fp32", 8): (32, 4),  # 149 registers
    ("forward_cross", "fp32", 16): (32, 4),  # 229 registers
    ("forward_cross", "fp32", 32): (8, 4),  # 167 registers
    ("forward_cross", "fp32", 64): (8, 8),  # 166 registers
    ("scores_backward", "16-bit", 8): (16, 4),  # 166 registers
    ("scores_backward", "16-bit", 16): (16, 4),  # 163 registers
    ("scores_backward", "16-bit", 32): (16, 4),  # 146 registers
    ("scores_backward", "16-bit", 64): (32, 8),  # 179 registers (4 warps spill in fp16 on sm_80)
    ("scores_backward", "fp32", 8): (16, 4),  # 181 registers
    ("scores_backward", "fp32", 16): (16, 8),  # 128 registers
    ("scores_backward", "fp32", 32): (16, 4),  # 128 registers
    ("scores_backward", "fp32", 64): (32, 4),  # 164 registers
}


def gpu_plan(KP: int, dtype: torch.dtype) -> Plan:
    """Tiles launched on a GPU for KP = slots(k); every specialisation is in the AOT table.

    Similarity tiles: 16-bit 32 x 64 rows x patches (16 x 64 for KP >= 32) on the tensor cores,
    d contracted in 64-wide chunks, 2 stages; fp32 IEEE dots on the FMA units, 16 x 32 (x KP),
    16-wide chunks. The gathered [rows, KP, BLOCK_DV] tiles take the width chunks and warps of
    `_GATHER_TILES`; backward rows per program shrink as KP grows (16 for KP = 8 down to 2).
    """
    kind = "fp32" if dtype == torch.float32 else "16-bit"
    if dtype == torch.float32:
        block_r, block_p, block_dk, stages = 16, max(32, KP), 16, 1
    else:
        block_r, block_p, block_dk, stages = (32 if KP <= 16 else 16), max(64, KP), 64, 2
    backward_r = max(2, min(16, 128 // KP))

    def tiles(name, rows, p, dk, num_stages):
        chunk, warps = _GATHER_TILES[(name, kind, KP)]
        return Tiles(rows, p, dk, chunk, num_warps=warps, num_stages=num_stages)

    return Plan(forward=tiles("forward", block_r, block_p, block_dk, stages),
                forward_cross=tiles("forward_cross", block_r, block_p, block_dk, stages),
                align_backward=tiles("align_backward", backward_r, 0, 0, 1),
                scores_backward=tiles("scores_backward", backward_r, 0, 0, 1),
                rows=Tiles(32, 0, 64, 0, num_warps=4, num_stages=1))


def interpreter_plan(KP: int, D: int) -> Plan:
    """Small tiles for the Triton interpreter, whose cost is per operation, not per element."""
    chunk = min(_pow2(D), 32)
    forward = Tiles(16, max(16, KP), 16, chunk, num_warps=1, num_stages=1)
    backward = Tiles(16, 0, 0, chunk, num_warps=1, num_stages=1)
    return Plan(forward=forward, forward_cross=forward, align_backward=backward, scores_backward=backward,
                rows=Tiles(16, 0, chunk, 0, num_warps=1, num_stages=1))


def default_plan(KP: int, D: int, dtype: torch.dtype) -> Plan:
    return interpreter_plan(KP, D) if triton_word_patch._INTERPRETED else gpu_plan(KP, dtype)


def _meta(kernel, plan: Plan, KP: int, dtype: torch.dtype, cross: bool = False) -> dict:
    """Constexprs and launch options of `kernel`: the one place the host launches and
    `aot_kernel_configs` take them from."""
    if kernel is _forward_kernel:
        t = plan.forward_cross if cross else plan.forward
        meta = dict(BLOCK_R=t.block_r, BLOCK_P=t.block_p, BLOCK_DK=t.block_dk, BLOCK_DV=t.block_dv, KP=KP,
                    CROSS=cross, DOT=triton_word_patch._dot_dtypes(dtype)[1])
    elif kernel is _align_backward_kernel or kernel is _scores_backward_kernel:
        t = plan.align_backward if kernel is _align_backward_kernel else plan.scores_backward
        meta = dict(BLOCK_R=t.block_r, BLOCK_DV=t.block_dv, KP=KP)
    elif kernel is _patch_grad_kernel:
        t = plan.rows
        meta = dict(BLOCK_R=t.block_r, BLOCK_DK=t.block_dk)
    else:
        raise ValueError(f"not a kernel of this module: {kernel}")
    return dict(meta, num_warps=t.num_warps, num_stages=t.num_stages)


def _norms(x: Tensor, mask: Tensor, normalize: bool) -> Tensor:
    """|x| per row (B*n,) fp32 of (B, n, D) rows, through the WPR row-norm kernel (1 when not normalising)."""
    B, n, D = x.shape
    out = x.new_empty((B * n,), dtype=torch.float32)
    triton_word_patch._row_norms(x, mask, out, normalize, triton_word_patch.default_plan(D, x.dtype))
    return out


def _prepare(rows, row_mask, patches, patch_mask, k, normalize_inputs, plan):
    """What every launch needs: rows and patches padded to width D, contiguous masks, KP, the
    plan, and the row norms of both (rows (B,M,d) with row_mask (B,M), or (N,d) with (1,N))."""
    D = padded_width(rows.shape[-1])
    x, v = _pad(rows, D), _pad(patches, D)
    row_mask, patch_mask = row_mask.contiguous(), patch_mask.contiguous()
    KP = slots(k)
    plan = plan or default_plan(KP, D, x.dtype)
    x_norm = _norms(x.view(*row_mask.shape, D), row_mask, normalize_inputs)
    return x, row_mask, x_norm, v, patch_mask, _norms(v, patch_mask, normalize_inputs), D, KP, plan


def _all_rows(N: int, device) -> Tensor:
    """The cross op's row mask: every one of the N subcaptions is real."""
    return torch.ones((1, N), dtype=torch.bool, device=device)


def align_forward(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs,
                  plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Regions (B,M,d) in the input dtype, the chosen indices (B,M,k) int32 and their sigma fp32."""
    B, M, d = subcaptions.shape
    P = patches.shape[1]
    x, subcaption_mask, x_norm, v, patch_mask, v_norm, D, KP, plan = _prepare(
        subcaptions, subcaption_mask, patches, patch_mask, k, normalize_inputs, plan)
    regions = torch.empty_like(x)
    index = x.new_empty((B, M, k), dtype=torch.int32)
    sigma = x.new_empty((B, M, k), dtype=torch.float32)
    _forward_kernel[(triton.cdiv(M, plan.forward.block_r), B)](
        x, subcaption_mask, x_norm, v, patch_mask, v_norm, regions, index, sigma, sigma, M, M, P, D, k,
        LOG2E / temperature, 1, M, **_meta(_forward_kernel, plan, KP, x.dtype, cross=False))
    return (regions if D == d else regions[..., :d].contiguous()), index, sigma


def align_backward(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask, temperature,
                   normalize_inputs, plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    B, M, d = subcaptions.shape
    P = patches.shape[1]
    k = index.shape[-1]
    x, subcaption_mask, x_norm, v, patch_mask, v_norm, D, KP, plan = _prepare(
        subcaptions, subcaption_mask, patches, patch_mask, k, normalize_inputs, plan)
    g = _pad(grad_regions, D)
    grad_x = torch.empty_like(x)
    dv = torch.zeros((B, P, D), dtype=torch.float32, device=x.device)
    _align_backward_kernel[(triton.cdiv(M, plan.align_backward.block_r), B)](
        x, subcaption_mask, x_norm, v, v_norm, g, index, sigma, grad_x, dv, M, P, D, k, LOG2E / temperature,
        1.0 / temperature, int(normalize_inputs), **_meta(_align_backward_kernel, plan, KP, x.dtype))
    grad_v = _patch_grad(v, patch_mask, v_norm, dv, normalize_inputs, plan)
    return _unpad(grad_x, d), _unpad(grad_v, d)


def scores_forward(subcaptions, patches, k, patch_mask, temperature, normalize_inputs,
                   plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores (N,B) in the input dtype, the chosen indices (N,B,k) int32, sigma and rho fp32."""
    N, d = subcaptions.shape
    B, P, _ = patches.shape
    x, row_mask, x_norm, v, patch_mask, v_norm, D, KP, plan = _prepare(
        subcaptions, _all_rows(N, subcaptions.device), patches, patch_mask, k, normalize_inputs, plan)
    scores = x.new_empty((N, B))
    index = x.new_empty((N, B, k), dtype=torch.int32)
    sigma = x.new_empty((N, B, k), dtype=torch.float32)
    rho = torch.empty_like(sigma)
    _forward_kernel[(triton.cdiv(N, plan.forward_cross.block_r), B)](
        x, row_mask, x_norm, v, patch_mask, v_norm, scores, index, sigma, rho, N, 0, P, D, k, LOG2E / temperature,
        B, 1, **_meta(_forward_kernel, plan, KP, x.dtype, cross=True))
    return scores, index, sigma, rho


def scores_backward(grad_scores, subcaptions, patches, index, sigma, rho, patch_mask, temperature, normalize_inputs,
                    plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    N, d = subcaptions.shape
    B, P, _ = patches.shape
    k = index.shape[-1]
    x, _, x_norm, v, patch_mask, v_norm, D, KP, plan = _prepare(
        subcaptions, _all_rows(N, subcaptions.device), patches, patch_mask, k, normalize_inputs, plan)
    grad_x = torch.empty_like(x)
    dv = torch.zeros((B, P, D), dtype=torch.float32, device=x.device)
    t = plan.scores_backward
    _scores_backward_kernel[(triton.cdiv(N, t.block_r), triton.cdiv(D, t.block_dv))](
        x, x_norm, v, v_norm, grad_scores.contiguous(), index, sigma, rho, grad_x, dv, N, B, P, D, k,
        LOG2E / temperature, 1.0 / temperature, int(normalize_inputs),
        **_meta(_scores_backward_kernel, plan, KP, x.dtype))
    grad_v = _patch_grad(v, patch_mask, v_norm, dv, normalize_inputs, plan)
    return _unpad(grad_x, d), _unpad(grad_v, d)


def _patch_grad(v, patch_mask, v_norm, dv, normalize_inputs, plan) -> Tensor:
    B, P, D = v.shape
    out = torch.empty_like(v)
    _patch_grad_kernel[(triton.cdiv(B * P, plan.rows.block_r),)](
        v, patch_mask, v_norm, dv, out, B * P, D, int(normalize_inputs),
        **_meta(_patch_grad_kernel, plan, 1, v.dtype))
    return out


def _unpad(x: Tensor, d: int) -> Tensor:
    return x if x.shape[-1] == d else x[..., :d].contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library registration: one opaque node per direction for torch.compile
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mulclip::subcaption_patch_align_triton_forward", mutates_args=())
def subcaption_patch_align_forward(subcaptions: Tensor, patches: Tensor, k: int, subcaption_mask: Tensor,
                                   patch_mask: Tensor, temperature: float,
                                   normalize_inputs: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Regions (B,M,d), chosen indices (B,M,k) int32 and their similarities (B,M,k) fp32."""
    with _on_device(subcaptions.device):
        return align_forward(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs)


@subcaption_patch_align_forward.register_fake
def _(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
    B, M, _ = subcaptions.shape
    return (torch.empty_like(subcaptions), subcaptions.new_empty((B, M, k), dtype=torch.int32),
            subcaptions.new_empty((B, M, k), dtype=torch.float32))


@torch.library.custom_op("mulclip::subcaption_patch_align_triton_backward", mutates_args=())
def subcaption_patch_align_backward(grad_regions: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor,
                                    sigma: Tensor, subcaption_mask: Tensor, patch_mask: Tensor, temperature: float,
                                    normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for subcaptions and patches from the saved indices and similarities."""
    with _on_device(subcaptions.device):
        return align_backward(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask,
                              temperature, normalize_inputs)


@subcaption_patch_align_backward.register_fake
def _(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask, temperature, normalize_inputs):
    return torch.empty_like(subcaptions), torch.empty_like(patches)


def _align_setup_context(ctx, inputs, output):
    subcaptions, patches, _, subcaption_mask, patch_mask, temperature, normalize_inputs = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(subcaptions, patches, output[1], output[2], subcaption_mask, patch_mask)
    ctx.options = (temperature, normalize_inputs)


def _align_backward(ctx, grad_regions, *_):
    subcaptions, patches, index, sigma, subcaption_mask, patch_mask = ctx.saved_tensors
    grad_sub, grad_patches = subcaption_patch_align_backward(grad_regions.contiguous(), subcaptions, patches, index,
                                                             sigma, subcaption_mask, patch_mask, *ctx.options)
    return grad_sub, grad_patches, None, None, None, None, None


subcaption_patch_align_forward.register_autograd(_align_backward, setup_context=_align_setup_context)


@torch.library.custom_op("mulclip::subcaption_patch_scores_triton_forward", mutates_args=())
def subcaption_patch_scores_forward(subcaptions: Tensor, patches: Tensor, k: int, patch_mask: Tensor,
                                    temperature: float,
                                    normalize_inputs: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores (N,B), chosen indices (N,B,k) int32, their similarities and rho = r . v' (N,B,k) fp32."""
    with _on_device(subcaptions.device):
        return scores_forward(subcaptions, patches, k, patch_mask, temperature, normalize_inputs)


@subcaption_patch_scores_forward.register_fake
def _(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
    N, B = subcaptions.shape[0], patches.shape[0]
    stats = subcaptions.new_empty((N, B, k), dtype=torch.float32)
    return (subcaptions.new_empty((N, B)), subcaptions.new_empty((N, B, k), dtype=torch.int32), stats,
            torch.empty_like(stats))


@torch.library.custom_op("mulclip::subcaption_patch_scores_triton_backward", mutates_args=())
def subcaption_patch_scores_backward(grad_scores: Tensor, subcaptions: Tensor, patches: Tensor, index: Tensor,
                                     sigma: Tensor, rho: Tensor, patch_mask: Tensor, temperature: float,
                                     normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for subcaptions and patches from the saved indices, sigma and rho."""
    with _on_device(subcaptions.device):
        return scores_backward(grad_scores, subcaptions, patches, index, sigma, rho, patch_mask, temperature,
                               normalize_inputs)


@subcaption_patch_scores_backward.register_fake
def _(grad_scores, subcaptions, patches, index, sigma, rho, patch_mask, temperature, normalize_inputs):
    return torch.empty_like(subcaptions), torch.empty_like(patches)


def _scores_setup_context(ctx, inputs, output):
    subcaptions, patches, _, patch_mask, temperature, normalize_inputs = inputs
    ctx.mark_non_differentiable(output[1], output[2], output[3])
    ctx.save_for_backward(subcaptions, patches, output[1], output[2], output[3], patch_mask)
    ctx.options = (temperature, normalize_inputs)


def _scores_backward(ctx, grad_scores, *_):
    subcaptions, patches, index, sigma, rho, patch_mask = ctx.saved_tensors
    grad_sub, grad_patches = subcaption_patch_scores_backward(grad_scores.contiguous(), subcaptions, patches, index,
                                                              sigma, rho, patch_mask, *ctx.options)
    return grad_sub, grad_patches, None, None, None, None


subcaption_patch_scores_forward.register_autograd(_scores_backward, setup_context=_scores_setup_context)


def is_available(device: torch.device) -> Tuple[bool, str]:
    """(ok, reason): as the Triton WPR backend (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    return triton_word_patch.is_available(device)


def subcaption_patch_align(subcaptions, patches, k, subcaption_mask, patch_mask, temperature, normalize_inputs):
    """Regions (B,M,d); same contract as `reference.subcaption_patch_align`. Float64 inputs (the
    kernels accumulate in fp32) and k > 64 (the top-k is kept in registers) run the "torch" backend."""
    if subcaptions.dtype == torch.float64 or k > MAX_K:
        return torch_subcaption_patch.subcaption_patch_align(subcaptions, patches, k, subcaption_mask, patch_mask,
                                                             temperature, normalize_inputs)
    return subcaption_patch_align_forward(subcaptions, patches, k, subcaption_mask, patch_mask, temperature,
                                          normalize_inputs)[0]


def subcaption_patch_scores(subcaptions, patches, k, patch_mask, temperature, normalize_inputs):
    """Scores (N,B); same contract as `reference.subcaption_patch_scores`. Float64 inputs and
    k > 64 run the "torch" backend."""
    if subcaptions.dtype == torch.float64 or k > MAX_K:
        return torch_subcaption_patch.subcaption_patch_scores(subcaptions, patches, k, patch_mask, temperature,
                                                              normalize_inputs)
    return subcaption_patch_scores_forward(subcaptions, patches, k, patch_mask, temperature, normalize_inputs)[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile check (mulclip_kernels.aot)
# ----------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signatures(dtype: torch.dtype) -> Dict[str, Dict[str, str]]:
    """Triton signature of every kernel for inputs of `dtype` as the GPU host launches them."""
    x, f32, i32, mask = f"*{_TRITON_TYPES[dtype]}", "*fp32", "*i32", "*i1"
    return {
        "_forward_kernel": {"x_ptr": x, "x_mask_ptr": mask, "x_norm_ptr": f32, "v_ptr": x, "v_mask_ptr": mask,
                            "v_norm_ptr": f32, "out_ptr": x, "index_ptr": i32, "sigma_ptr": f32, "rho_ptr": f32,
                            "n_rows": "i32", "row_b_stride": "i32", "P": "i32", "D": "i32", "k": "i32",
                            "scale": "fp32", "pair_row_stride": "i32", "pair_b_stride": "i32"},
        "_align_backward_kernel": {"x_ptr": x, "x_mask_ptr": mask, "x_norm_ptr": f32, "v_ptr": x, "v_norm_ptr": f32,
                                   "grad_ptr": x, "index_ptr": i32, "sigma_ptr": f32, "dx_ptr": x, "dv_ptr": f32,
                                   "M": "i32", "P": "i32", "D": "i32", "k": "i32", "scale": "fp32",
                                   "inv_tau": "fp32", "normalize": "i32"},
        "_scores_backward_kernel": {"x_ptr": x, "x_norm_ptr": f32, "v_ptr": x, "v_norm_ptr": f32, "grad_ptr": x,
                                    "index_ptr": i32, "sigma_ptr": f32, "rho_ptr": f32, "dx_ptr": x, "dv_ptr": f32,
                                    "N": "i32", "B": "i32", "P": "i32", "D": "i32", "k": "i32", "scale": "fp32",
                                    "inv_tau": "fp32", "normalize": "i32"},
        "_patch_grad_kernel": {"v_ptr": x, "v_mask_ptr": mask, "v_norm_ptr": f32, "dv_ptr": f32, "out_ptr": x,
                               "n": "i32", "D": "i32", "normalize": "i32"},
    }


def aot_kernel_configs() -> List[dict]:
    """Every (kernel, dtype, tiles) that `gpu_plan` launches for k <= MAX_K (KP = 8, 16, 32, 64).

    Entries as `triton_word_patch.aot_kernel_configs`; the width D is padded to a multiple of 16
    by the host (divisible_by_16), the other integers are `do_not_specialize`.
    """
    entries, seen = [], set()
    for dtype in _TRITON_TYPES:
        signatures = _signatures(dtype)
        KP = slots(1)
        while KP <= MAX_K:
            plan = gpu_plan(KP, dtype)
            for fn, cross in ((_forward_kernel, False), (_forward_kernel, True), (_align_backward_kernel, False),
                              (_scores_backward_kernel, True), (_patch_grad_kernel, False)):
                meta = _meta(fn, plan, KP, dtype, cross)
                options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
                signature = {**signatures[fn.__name__], **{key: "constexpr" for key in meta}}
                key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in meta.items()),
                       tuple(options.items()))
                if key not in seen:
                    seen.add(key)
                    entries.append(dict(name=fn.__name__, fn=fn, signature=signature, constexprs=meta, **options,
                                        divisible_by_16=["D"]))
            KP *= 2
    return entries
