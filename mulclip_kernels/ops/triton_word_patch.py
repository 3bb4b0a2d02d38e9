"""Fused Triton backend ("triton") of the word-patch reconstruction (WPR) loss, method section 3.

Layout (Liger style): the `@triton.jit` kernels with the math in comments, then the host
`wpr_forward` / `wpr_backward` that allocate, pick block sizes and launch, then the
`torch.library` custom ops (analytic backward registered on the forward op), and last
`aot_kernel_configs()`, which lists every kernel specialisation the host can launch on a GPU for
the ahead-of-time compile check of `mulclip_kernels.aot`.

Both sides of WPR are the same computation with the roles swapped, so every kernel is written
for one side: rows `a` (n_a of them; the words on the text side) rebuilt from columns `b` (the
patches). Per sample, with a = norm(rows) and b = norm(columns), zero where masked:

    S = a b^T,  A = softmax_b(S / tau_r),  y = A b,  r = y / max(|y|, eps)
    G = r a^T / tau_c,  CE_i = lse_j G_ij - G_ii (valid i, j),  L_side = mean_i CE_i
    L = (L_text + L_image) / 2, 0 for a sample without a valid word.

Forward (flash-attention style, nothing of size n_a x n_b or n_a x n_a is ever stored):
  `_row_norm_kernel`   |X_i| per row (the calibration); a = X / max(|X|, eps) is applied on load.
  `_recon_kernel`      online softmax over column tiles; y (n_a x d, a temporary) and the
                       base-2 log-sum-exp of S / tau_r per row.
  `_contrast_kernel`   |y_i| and an online log-sum-exp of G over the same side's row tiles; CE_i.
  `_finalize_kernel`   per sample: the mean over valid rows of both sides, and the loss weights.
Saved for backward: |X|, lse(S), |y| and lse(G) per row of both sides and two weights per sample:
O(B(K+P)) floats.

Backward, with w = dL/dCE_i = g_b / (2 n_valid) (0 for a sample without words), recomputes y
(`_recon_kernel` again, bit-identical to the forward) and then:
  dG_ij = w (softmax_j(G_i) - delta_ij)                 (valid i, j)
  dr_i = sum_j dG_ij a_j / tau_c,   c_i = r_i . dr_i = sum_j dG_ij G_ij   (no width reduction)
  dy_i = (dr_i - r_i c_i) / |y_i|   (dr_i / eps when |y_i| <= eps)      `_contrast_backward_kernel`
  D_i = dy_i . y_i  = 0 when |y_i| > eps (dy is orthogonal to y), c_i otherwise
  dS_ip = A_ip (dy_i . b_p - D_i) / tau_r        (flash attention's D = rowsum(dO * O) trick)
  da_j += sum_i dG_ij r_i / tau_c + sum_p dS_ip b_p  (rows of this side)
  db_p += sum_i (A_ip dy_i + dS_ip a_i)              (columns: the other side's rows)
`_grad_rows_kernel` gathers, for a block of rows of one input, the three terms that land on
it: the contrast columns of its own side, the reconstruction rows of its own side and the
reconstruction columns of the other side, which share one recomputed tile of S. Last the
calibration backward dX = (da - a (a . da)) / |X| (da / eps when |X| <= eps), zero where masked,
in the same kernel: a_j . da_j needs no reduction over the width, since every term of da_j is a
tile coefficient times a row whose inner product with a_j the tile already holds
(a_j . r_i = tau_c G_ij, a_j . b_p = S_jp, a_j . dy~_p).

Temporaries: y of one side in the forward, y and dy of both sides in the backward, in the dot
dtype, for a chunk of samples at a time (`DEFAULT_SCRATCH_ELEMENTS`, 128 MiB in 16 bits); the
kernels take the chunk's first sample `b0`.

The width d (padded with zero columns to a multiple of 16, so that Triton vectorises every row)
is split two ways: contractions over d (S, G, dy . b) loop over `BLOCK_DK` chunks, and outputs
of width d (y, dy, gradients) are split over programs in `BLOCK_DV` chunks; a program recomputes
its tile contractions for each output chunk, so `BLOCK_DV` covers as much of d as registers allow.

Numerics: dot operands are the input dtype (fp16/bf16 tensor cores, fp32 accumulators); fp32
inputs use IEEE fp32 dots (`input_precision="ieee"`, never TF32). Under the Triton interpreter
bf16 arithmetic is wrong, so bf16 is converted to fp32 on load there. Softmaxes run in base 2
with log2(e) folded into the scale. Masked rows are never read (masked loads return 0, so even
NaN padding cannot leak), and every probability of a masked pair is set with `tl.where`.
Float64 inputs go to the "torch" backend (the kernels accumulate in fp32). The calibration is
folded into the tiles (coefficients times 1 / |X| against the raw rows), so fp16 inputs whose
rows have a norm below about 2e-5 would overflow those coefficients; bf16 and fp32 cannot.
"""
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ..reference import EPS
from . import torch_word_patch

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_EPS = tl.constexpr(EPS)
_LN2 = tl.constexpr(LN2)
_NEG_BIG = tl.constexpr(-1e30)  # finite start of running maxima: exp2(m_old - m_new) never sees inf - inf


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b; fp32 operands use IEEE fp32 (TF32 would lose parity), 16-bit the tensor cores."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _row_valid(mask_ptr, o_r, n):
    """Rows inside the sample and not masked; the mask is never read past n."""
    m_in = o_r < n
    return m_in & (tl.load(mask_ptr + o_r, mask=m_in, other=0) != 0)


@triton.jit
def _inv_norm(norm_ptr, o_r, m_r):
    """1 / max(|X|, eps) on valid rows, 0 on masked rows (so that they vanish from every tile)."""
    n = tl.load(norm_ptr + o_r, mask=m_r, other=1.0)
    return tl.where(m_r, 1.0 / tl.maximum(n, _EPS), 0.0)


@triton.jit
def _load_rows(ptr, o_r, m_r, o_c, D, DOT: tl.constexpr):
    """[rows, cols] tile of a row-major (n, D) matrix, zero for invalid rows (never read)."""
    return tl.load(ptr + o_r[:, None] * D + o_c[None, :], mask=m_r[:, None] & (o_c[None, :] < D), other=0.0).to(DOT)


@triton.jit
def _contract(x_ptr, o_x, m_x, y_ptr, o_y, m_y, D,
              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_DK: tl.constexpr, DOT: tl.constexpr):
    """[BLOCK_X, BLOCK_Y] fp32 inner products of rows x[o_x] and y[o_y] over D, in BLOCK_DK chunks."""
    b_acc = tl.zeros([BLOCK_X, BLOCK_Y], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_DK):
        o_k = k0 + tl.arange(0, BLOCK_DK)
        b_x = _load_rows(x_ptr, o_x, m_x, o_k, D, DOT)  # [BX, BDK]
        b_y = _load_rows(y_ptr, o_y, m_y, o_k, D, DOT)  # [BY, BDK]
        b_acc = _dot(b_x, tl.trans(b_y), b_acc)
    return b_acc


@triton.jit(do_not_specialize=["n", "normalize"])
def _row_norm_kernel(x_ptr, mask_ptr, norm_ptr, n, D, normalize,
                     BLOCK_R: tl.constexpr, BLOCK_DK: tl.constexpr):
    """norm[b, i] = |X[b, i]| (1 when not normalising; 0 on masked rows). Grid (B, cdiv(n, BLOCK_R))."""
    i_b = tl.program_id(0).to(tl.int64)
    o_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = _row_valid(mask_ptr + i_b * n, o_r, n)
    x_ptr += i_b * n * D
    b_ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    if normalize:
        for k0 in range(0, D, BLOCK_DK):
            b_x = _load_rows(x_ptr, o_r, m_r, k0 + tl.arange(0, BLOCK_DK), D, tl.float32)
            b_ss += tl.sum(b_x * b_x, axis=1)
        b_norm = tl.sqrt(b_ss)
    else:
        b_norm = b_ss + 1.0
    tl.store(norm_ptr + i_b * n + o_r, tl.where(m_r, b_norm, 0.0), mask=o_r < n)


@triton.jit(do_not_specialize=["b0", "n_a", "n_b"])
def _recon_kernel(a_ptr, a_mask_ptr, a_norm_ptr, b_ptr, b_mask_ptr, b_norm_ptr, y_ptr, lse_ptr,
                  b0, n_a, n_b, D, scale,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                  DOT: tl.constexpr):
    """y = softmax_b(a b^T / tau_r) b for rows a, and lse2 = log2-sum-exp2 of S * scale per row.

    scale = log2(e) / tau_r. Online softmax over BLOCK_B column tiles; this program writes columns
    [i_d * BLOCK_DV, +BLOCK_DV) of y. A row with no valid column gets y = 0 and lse2 = 0 (finite,
    unused). Samples b0 + program_id(0); y holds only this launch's samples.
    Grid (samples, cdiv(n_a, BLOCK_A), cdiv(D, BLOCK_DV)).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_b = b0 + i_s
    i_a, i_d = tl.program_id(1), tl.program_id(2)
    a_ptr += i_b * n_a * D
    b_ptr += i_b * n_b * D
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_v = i_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_a = _row_valid(a_mask_ptr + i_b * n_a, o_a, n_a)
    b_ia = _inv_norm(a_norm_ptr + i_b * n_a, o_a, m_a) * scale  # [BA]

    b_m = tl.full([BLOCK_A], _NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)
    b_y = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for p0 in range(0, n_b, BLOCK_B):
        o_b = p0 + tl.arange(0, BLOCK_B)
        m_b = _row_valid(b_mask_ptr + i_b * n_b, o_b, n_b)
        b_ib = _inv_norm(b_norm_ptr + i_b * n_b, o_b, m_b)  # [BB]
        b_s = _contract(a_ptr, o_a, m_a, b_ptr, o_b, m_b, D, BLOCK_A, BLOCK_B, BLOCK_DK, DOT)
        b_s = tl.where(m_b[None, :], b_s * b_ia[:, None] * b_ib[None, :], float("-inf"))  # [BA, BB]
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_v = _load_rows(b_ptr, o_b, m_b, o_v, D, DOT)  # [BB, BDV]
        b_y = _dot((b_p * b_ib[None, :]).to(DOT), b_v, b_y * b_alpha[:, None])
        b_m = b_m_new
    m_some = b_l > 0
    b_y = b_y / tl.where(m_some, b_l, 1.0)[:, None]
    m_out = o_a < n_a
    tl.store(y_ptr + i_s * n_a * D + o_a[:, None] * D + o_v[None, :], b_y.to(y_ptr.dtype.element_ty),
             mask=m_out[:, None] & (o_v[None, :] < D))
    if i_d == 0:
        tl.store(lse_ptr + i_b * n_a + o_a, tl.where(m_some, b_m + tl.log2(tl.where(m_some, b_l, 1.0)), 0.0),
                 mask=m_out)


@triton.jit(do_not_specialize=["b0", "n_a"])
def _contrast_kernel(y_ptr, a_ptr, a_mask_ptr, a_norm_ptr, ce_ptr, lseg_ptr, yn_ptr, b0, n_a, D, scale,
                     BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DK: tl.constexpr, DOT: tl.constexpr):
    """CE_i = lse_j G_ij - G_ii, G_ij = (y_i . a_j) / (max(|y_i|, eps) tau_c) over valid rows j.

    scale = log2(e) / tau_c. Writes CE (0 on masked rows), lse2 of G and |y| per row. Online
    log-sum-exp over BLOCK_J tiles of the same side's rows. Samples b0 + program_id(0), y holds
    only this launch's samples. Grid (samples, cdiv(n_a, BLOCK_A)).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_b = b0 + i_s
    o_i = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    a_ptr += i_b * n_a * D
    y_ptr += i_s * n_a * D
    m_i = _row_valid(a_mask_ptr + i_b * n_a, o_i, n_a)

    b_ss = tl.zeros([BLOCK_A], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_DK):
        b_r = _load_rows(y_ptr, o_i, m_i, k0 + tl.arange(0, BLOCK_DK), D, tl.float32)
        b_ss += tl.sum(b_r * b_r, axis=1)
    b_yn = tl.sqrt(b_ss)
    b_ry = scale / tl.maximum(b_yn, _EPS)  # [BA]

    b_m = tl.full([BLOCK_A], _NEG_BIG, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)
    b_diag = tl.zeros([BLOCK_A], dtype=tl.float32)
    for j0 in range(0, n_a, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = _row_valid(a_mask_ptr + i_b * n_a, o_j, n_a)
        b_ia = _inv_norm(a_norm_ptr + i_b * n_a, o_j, m_j)
        b_g = _contract(y_ptr, o_i, m_i, a_ptr, o_j, m_j, D, BLOCK_A, BLOCK_J, BLOCK_DK, DOT)
        b_g = b_g * b_ry[:, None] * b_ia[None, :]  # [BA, BJ], base-2 logits
        b_diag += tl.sum(tl.where(o_i[:, None] == o_j[None, :], b_g, 0.0), axis=1)
        b_g = tl.where(m_j[None, :], b_g, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_g, axis=1))
        b_l = b_l * tl.exp2(b_m - b_m_new) + tl.sum(tl.exp2(b_g - b_m_new[:, None]), axis=1)
        b_m = b_m_new
    b_lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), 0.0)
    m_out = o_i < n_a
    ce_ptr += i_b * n_a
    tl.store(ce_ptr + o_i, tl.where(m_i, (b_lse - b_diag) * _LN2, 0.0), mask=m_out)
    tl.store(lseg_ptr + i_b * n_a + o_i, b_lse, mask=m_out)
    tl.store(yn_ptr + i_b * n_a + o_i, b_yn, mask=m_out)


@triton.jit(do_not_specialize=["K", "P"])
def _finalize_kernel(ce_w_ptr, word_mask_ptr, ce_p_ptr, patch_mask_ptr, loss_ptr, coef_ptr, K, P,
                     BLOCK: tl.constexpr):
    """loss_b = (mean valid CE_text + mean valid CE_image) / 2, 0 without a valid word.

    Also coef[b] = (1 / (2 K_b), 1 / (2 P_b)) where the sample has a word, else 0: dL_b / dCE.
    Grid (B,).
    """
    i_b = tl.program_id(0).to(tl.int64)
    b_nw = tl.zeros([BLOCK], dtype=tl.float32)
    b_sw = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        o_k = k0 + tl.arange(0, BLOCK)
        m_k = _row_valid(word_mask_ptr + i_b * K, o_k, K)
        b_nw += m_k.to(tl.float32)
        b_sw += tl.load(ce_w_ptr + i_b * K + o_k, mask=m_k, other=0.0)
    b_np = tl.zeros([BLOCK], dtype=tl.float32)
    b_sp = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, P, BLOCK):
        o_p = p0 + tl.arange(0, BLOCK)
        m_p = _row_valid(patch_mask_ptr + i_b * P, o_p, P)
        b_np += m_p.to(tl.float32)
        b_sp += tl.load(ce_p_ptr + i_b * P + o_p, mask=m_p, other=0.0)
    n_w = tl.sum(b_nw, axis=0)
    n_p = tl.sum(b_np, axis=0)
    has_word = n_w > 0
    coef_w = tl.where(has_word, 0.5 / tl.maximum(n_w, 1.0), 0.0)
    coef_p = tl.where(has_word, 0.5 / tl.maximum(n_p, 1.0), 0.0)
    tl.store(loss_ptr + i_b, coef_w * tl.sum(b_sw, axis=0) + coef_p * tl.sum(b_sp, axis=0))
    tl.store(coef_ptr + 2 * i_b, coef_w)
    tl.store(coef_ptr + 2 * i_b + 1, coef_p)


@triton.jit(do_not_specialize=["side", "b0", "n_a"])
def _contrast_backward_kernel(y_ptr, a_ptr, a_mask_ptr, a_norm_ptr, yn_ptr, lseg_ptr, grad_ptr, coef_ptr, side,
                              dy_ptr, dd_ptr, b0, n_a, D, scale, inv_tau,
                              BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_DK: tl.constexpr,
                              BLOCK_DV: tl.constexpr, DOT: tl.constexpr):
    """dy_i (columns of this program's chunk) and D_i = dy_i . y_i of one side.

    dG_ij = w (softmax_j(G_i) - delta_ij), dr_i = sum_j dG_ij a_j / tau_c, c_i = sum_j dG_ij G_ij,
    dy_i = (dr_i - r_i c_i) / |y_i| (dr_i / eps when |y_i| <= eps), D_i = 0 (c_i when |y_i| <= eps).
    w = grad[b] * coef[b, side]; scale = log2(e) / tau_c, inv_tau = 1 / tau_c. Samples
    b0 + program_id(0); y, dy and D hold only this launch's samples.
    Grid (samples, cdiv(n_a, BLOCK_A), cdiv(D, BLOCK_DV)).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_b = b0 + i_s
    i_a, i_d = tl.program_id(1), tl.program_id(2)
    a_ptr += i_b * n_a * D
    y_ptr += i_s * n_a * D
    o_i = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_v = i_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_i = _row_valid(a_mask_ptr + i_b * n_a, o_i, n_a)
    b_yn = tl.load(yn_ptr + i_b * n_a + o_i, mask=m_i, other=1.0)
    b_ry = 1.0 / tl.maximum(b_yn, _EPS)
    b_lse = tl.load(lseg_ptr + i_b * n_a + o_i, mask=m_i, other=0.0)
    w = tl.load(grad_ptr + i_b) * tl.load(coef_ptr + 2 * i_b + side)

    b_c = tl.zeros([BLOCK_A], dtype=tl.float32)
    b_dr = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    for j0 in range(0, n_a, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = _row_valid(a_mask_ptr + i_b * n_a, o_j, n_a)
        b_ia = _inv_norm(a_norm_ptr + i_b * n_a, o_j, m_j)
        b_g = _contract(y_ptr, o_i, m_i, a_ptr, o_j, m_j, D, BLOCK_A, BLOCK_J, BLOCK_DK, DOT)
        b_g = b_g * (b_ry * scale)[:, None] * b_ia[None, :]  # [BA, BJ], base 2
        m_ij = m_i[:, None] & m_j[None, :]
        b_dg = tl.where(m_ij, tl.exp2(b_g - b_lse[:, None]), 0.0)
        b_dg -= tl.where(m_ij & (o_i[:, None] == o_j[None, :]), 1.0, 0.0)
        b_c += tl.sum(b_dg * b_g, axis=1)
        b_a = _load_rows(a_ptr, o_j, m_j, o_v, D, DOT)  # [BJ, BDV]
        b_dr = _dot((b_dg * b_ia[None, :]).to(DOT), b_a, b_dr)
    b_dr *= w * inv_tau
    b_c *= w * _LN2
    b_r = _load_rows(y_ptr, o_i, m_i, o_v, D, tl.float32) * b_ry[:, None]
    m_big = b_yn > _EPS
    b_dy = tl.where(m_big[:, None], b_dr - b_r * b_c[:, None], b_dr) / tl.maximum(b_yn, _EPS)[:, None]
    m_out = o_i < n_a
    tl.store(dy_ptr + i_s * n_a * D + o_i[:, None] * D + o_v[None, :], b_dy.to(dy_ptr.dtype.element_ty),
             mask=m_out[:, None] & (o_v[None, :] < D))
    if i_d == 0:
        tl.store(dd_ptr + i_s * n_a + o_i, tl.where(m_big, 0.0, b_c), mask=m_out)


@triton.jit(do_not_specialize=["side", "b0", "n_a", "n_b", "normalize"])
def _grad_rows_kernel(a_ptr, a_mask_ptr, a_norm_ptr, a_y_ptr, a_yn_ptr, a_lseg_ptr, a_lse_ptr, a_dy_ptr, a_dd_ptr,
                      b_ptr, b_mask_ptr, b_norm_ptr, b_lse_ptr, b_dy_ptr, b_dd_ptr,
                      grad_ptr, coef_ptr, side, out_ptr, b0, n_a, n_b, D, normalize,
                      scale_r, scale_c, inv_tau_r, inv_tau_c,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                      DOT: tl.constexpr):
    """Gradient of the loss with respect to the rows X_j of input `a`, for a block of rows j.

    With a = calibrated rows of `a`, b = of `b`, and the other side's quantities marked ~:
      da_j = sum_i dG_ij r_i / tau_c                          (contrast of a's side, over rows i)
           + sum_p dS_jp b_p                                   (a's reconstruction, rows j)
           + sum_p (A~_pj dy~_p + dS~_pj b_p)                  (b's reconstruction, columns j)
    dS_jp = A_jp (dy_j . b_p - D_j) / tau_r, dS~_pj = A~_pj (dy~_p . a_j - D~_p) / tau_r; A and A~
    come from one recomputed tile of S = a b^T with the saved log-sum-exps. Then the calibration
    backward, with a_j . da_j gathered from the same tiles; `out` gets dX in the input dtype.
    scale_r/c = log2(e) / tau_r/c. Samples b0 + program_id(0); y, dy and D (of both sides) hold
    only this launch's samples. Grid (samples, cdiv(n_a, BLOCK_A), cdiv(D, BLOCK_DV)).
    """
    i_s = tl.program_id(0).to(tl.int64)
    i_b = b0 + i_s
    i_a, i_d = tl.program_id(1), tl.program_id(2)
    a_ptr += i_b * n_a * D
    a_y_ptr += i_s * n_a * D
    a_dy_ptr += i_s * n_a * D
    b_ptr += i_b * n_b * D
    b_dy_ptr += i_s * n_b * D
    a_mask_ptr += i_b * n_a
    b_mask_ptr += i_b * n_b
    o_j = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_v = i_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_j = _row_valid(a_mask_ptr, o_j, n_a)
    b_ia = _inv_norm(a_norm_ptr + i_b * n_a, o_j, m_j)  # [BA]

    # Contrast of a's side, gradient through its columns: dG^T tiles [BA (j), BB (i)]. b_proj
    # gathers a_j . da_j from the tiles (a_j . r_i = tau_c G_ij, a_j . b_p = S_jp), so the
    # calibration backward needs no reduction over the width and works on any chunk of it.
    b_da = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)
    b_proj = tl.zeros([BLOCK_A], dtype=tl.float32)
    for i0 in range(0, n_a, BLOCK_B):
        o_i = i0 + tl.arange(0, BLOCK_B)
        m_i = _row_valid(a_mask_ptr, o_i, n_a)
        b_ry = 1.0 / tl.maximum(tl.load(a_yn_ptr + i_b * n_a + o_i, mask=m_i, other=1.0), _EPS)
        b_lse = tl.load(a_lseg_ptr + i_b * n_a + o_i, mask=m_i, other=0.0)
        b_g = _contract(a_ptr, o_j, m_j, a_y_ptr, o_i, m_i, D, BLOCK_A, BLOCK_B, BLOCK_DK, DOT)
        b_g = b_g * b_ia[:, None] * (b_ry * scale_c)[None, :]  # base-2 G_ij
        m_ji = m_j[:, None] & m_i[None, :]
        b_dg = tl.where(m_ji, tl.exp2(b_g - b_lse[None, :]), 0.0)
        b_dg -= tl.where(m_ji & (o_j[:, None] == o_i[None, :]), 1.0, 0.0)
        b_proj += tl.sum(b_dg * b_g, axis=1)
        # r_i = y_i / |y_i| scaled in fp32 first: unit rows are safe in 16 bits, 1/|y| may not be.
        b_r = (_load_rows(a_y_ptr, o_i, m_i, o_v, D, tl.float32) * b_ry[:, None]).to(DOT)  # [BB, BDV]
        b_da = _dot(b_dg.to(DOT), b_r, b_da)
    w = tl.load(grad_ptr + i_b) * tl.load(coef_ptr + 2 * i_b + side)
    b_da *= w * inv_tau_c
    b_proj *= w * _LN2

    # Both reconstructions through one tile of S: three contractions over D share the loads.
    b_lse_a = tl.load(a_lse_ptr + i_b * n_a + o_j, mask=m_j, other=0.0)
    b_dd_a = tl.load(a_dd_ptr + i_s * n_a + o_j, mask=m_j, other=0.0)
    for p0 in range(0, n_b, BLOCK_B):
        o_p = p0 + tl.arange(0, BLOCK_B)
        m_p = _row_valid(b_mask_ptr, o_p, n_b)
        b_ib = _inv_norm(b_norm_ptr + i_b * n_b, o_p, m_p)
        b_lse_b = tl.load(b_lse_ptr + i_b * n_b + o_p, mask=m_p, other=0.0)
        b_dd_b = tl.load(b_dd_ptr + i_s * n_b + o_p, mask=m_p, other=0.0)
        b_s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)  # X_j . X_p
        b_dyb = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)  # dy_j . X_p
        b_adq = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)  # X_j . dy~_p
        for k0 in range(0, D, BLOCK_DK):
            o_k = k0 + tl.arange(0, BLOCK_DK)
            b_xa = _load_rows(a_ptr, o_j, m_j, o_k, D, DOT)
            b_xb = tl.trans(_load_rows(b_ptr, o_p, m_p, o_k, D, DOT))
            b_s = _dot(b_xa, b_xb, b_s)
            b_dyb = _dot(_load_rows(a_dy_ptr, o_j, m_j, o_k, D, DOT), b_xb, b_dyb)
            b_adq = _dot(b_xa, tl.trans(_load_rows(b_dy_ptr, o_p, m_p, o_k, D, DOT)), b_adq)
        b_s = b_s * (b_ia * scale_r)[:, None] * b_ib[None, :]  # base-2 S_jp / tau_r
        b_adq *= b_ia[:, None]  # a_j . dy~_p
        m_jp = m_j[:, None] & m_p[None, :]
        b_pa = tl.where(m_jp, tl.exp2(b_s - b_lse_a[:, None]), 0.0)  # A_jp, softmax over p
        b_pb = tl.where(m_jp, tl.exp2(b_s - b_lse_b[None, :]), 0.0)  # A~_pj, softmax over j
        b_ds = b_pa * (b_dyb * b_ib[None, :] - b_dd_a[:, None]) + b_pb * (b_adq - b_dd_b[None, :])
        b_ds *= inv_tau_r
        b_proj += tl.sum(b_ds * b_s, axis=1) / scale_r + tl.sum(b_pb * b_adq, axis=1)
        b_da = _dot((b_ds * b_ib[None, :]).to(DOT), _load_rows(b_ptr, o_p, m_p, o_v, D, DOT), b_da)
        b_da = _dot(b_pb.to(DOT), _load_rows(b_dy_ptr, o_p, m_p, o_v, D, DOT), b_da)

    # Calibration backward: dX = (da - a (a . da)) / |X|, da / eps when |X| <= eps, da unnormalised.
    if normalize:
        m_big = tl.load(a_norm_ptr + i_b * n_a + o_j, mask=m_j, other=0.0) > _EPS
        b_proj = tl.where(m_big, b_proj * b_ia, 0.0)  # (a . da) / |X|
        b_x = _load_rows(a_ptr, o_j, m_j, o_v, D, DOT).to(tl.float32)
        b_da = (b_da - b_x * b_proj[:, None]) * b_ia[:, None]
    m_out = (o_j < n_a)[:, None] & (o_v[None, :] < D)
    tl.store(out_ptr + i_b * n_a * D + o_j[:, None] * D + o_v[None, :],
             tl.where(m_j[:, None], b_da, 0.0).to(out_ptr.dtype.element_ty), mask=m_out)


# ----------------------------------------------------------------------------------------------
# Host side: block sizes, launches
# ----------------------------------------------------------------------------------------------

# `@triton.jit` built interpreter functions (CPU tensors only) if TRITON_INTERPRET=1 at import.
_INTERPRETED = isinstance(_recon_kernel, InterpretedFunction)


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(n))


@dataclass(frozen=True)
class Tiles:
    """Block sizes and launch options of one kernel.

    block_a: rows per program; block_b: the streamed tile (columns, or rows of the same side);
    block_dk: chunk of a contraction over d; block_dv: chunk of an output row of width d per
    program (covering d avoids recomputing the tile contractions once per chunk).
    For the row-wise kernels (norms, finalize) block_a is the rows per program and block_b the
    finalize chunk.
    """

    block_a: int
    block_b: int
    block_dk: int
    block_dv: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Plan:
    """Tiles of every kernel for one width and dtype."""

    recon: Tiles
    contrast: Tiles
    contrast_backward: Tiles
    grad_rows: Tiles
    rows: Tiles


def gpu_plan(D: int, dtype: torch.dtype) -> Plan:
    """Tiles launched on a GPU for padded width D; every specialisation is in the AOT table.

    16-bit: 64-row blocks, d contracted in 64-wide chunks, 8 warps. Output rows go in 256-wide
    chunks in the forward and contrast-backward kernels (one program per row block up to d = 256,
    2 / 3 / 4 at d = 512 / 768 / 1024; each chunk recomputes its tile contractions) and in
    128-wide chunks in the gradient kernel, which holds three S-sized accumulators beside its
    output: 256 spills on sm_90, and without software pipelining 128 just fits sm_80's 255
    registers. fp32 runs IEEE dots on the FMA units, whose operands sit in registers: 32-row
    blocks, 16-wide contraction chunks, 64-wide output chunks, 4 warps. The tiles do not depend on
    D otherwise.
    """
    if dtype == torch.float32:
        tiles = Tiles(32, 32, 16, 64, num_warps=4, num_stages=1)
        return Plan(recon=tiles, contrast=tiles, contrast_backward=tiles, grad_rows=tiles,
                    rows=Tiles(32, 128, 64, 0, num_warps=4, num_stages=1))
    return Plan(recon=Tiles(64, 64, 64, 256, num_warps=8, num_stages=2),
                contrast=Tiles(64, 64, 64, 0, num_warps=4, num_stages=2),
                contrast_backward=Tiles(64, 64, 64, 256, num_warps=8, num_stages=2),
                grad_rows=Tiles(64, 32, 64, 128, num_warps=8, num_stages=1),
                rows=Tiles(32, 128, 64, 0, num_warps=4, num_stages=1))


def interpreter_plan(D: int) -> Plan:
    """Small tiles for the Triton interpreter, whose cost is per operation, not per element."""
    tiles = Tiles(16, 16, 16, min(_pow2(D), 32), num_warps=1, num_stages=1)
    return Plan(recon=tiles, contrast=tiles, contrast_backward=tiles, grad_rows=tiles,
                rows=Tiles(16, 64, 16, 0, num_warps=1, num_stages=1))


def default_plan(D: int, dtype: torch.dtype) -> Plan:
    return interpreter_plan(D) if _INTERPRETED else gpu_plan(D, dtype)


def _meta(kernel, plan: Plan, D: int, dtype: torch.dtype) -> dict:
    """Constexprs and launch options of `kernel` under `plan`: the one place both the host
    launches and `aot_kernel_configs` take them from."""
    dot = _dot_dtypes(dtype)[1]
    if kernel is _row_norm_kernel:
        t = plan.rows
        meta = dict(BLOCK_R=t.block_a, BLOCK_DK=t.block_dk)
    elif kernel is _finalize_kernel:
        t = plan.rows
        meta = dict(BLOCK=t.block_b)
    elif kernel is _recon_kernel:
        t = plan.recon
        meta = dict(BLOCK_A=t.block_a, BLOCK_B=t.block_b, BLOCK_DK=t.block_dk, BLOCK_DV=t.block_dv, DOT=dot)
    elif kernel is _contrast_kernel:
        t = plan.contrast
        meta = dict(BLOCK_A=t.block_a, BLOCK_J=t.block_b, BLOCK_DK=t.block_dk, DOT=dot)
    elif kernel is _contrast_backward_kernel:
        t = plan.contrast_backward
        meta = dict(BLOCK_A=t.block_a, BLOCK_J=t.block_b, BLOCK_DK=t.block_dk, BLOCK_DV=t.block_dv, DOT=dot)
    elif kernel is _grad_rows_kernel:
        t = plan.grad_rows
        meta = dict(BLOCK_A=t.block_a, BLOCK_B=t.block_b, BLOCK_DK=t.block_dk, BLOCK_DV=t.block_dv, DOT=dot)
    else:
        raise ValueError(f"not a kernel of this module: {kernel}")
    return dict(meta, num_warps=t.num_warps, num_stages=t.num_stages)


# Every kernel one forward and backward launch, whatever the plan and width.
_KERNELS = (_row_norm_kernel, _recon_kernel, _contrast_kernel, _finalize_kernel, _contrast_backward_kernel,
            _grad_rows_kernel)


def _dot_dtypes(dtype: torch.dtype) -> Tuple[torch.dtype, tl.dtype]:
    """Dtype of the dot operands and of the y / dy temporaries: the input's, except fp32 for bf16
    in the interpreter (whose bf16 arithmetic is wrong)."""
    if dtype == torch.bfloat16 and not _INTERPRETED:
        return torch.bfloat16, tl.bfloat16
    if dtype == torch.float16:
        return torch.float16, tl.float16
    return torch.float32, tl.float32


def _round_up(n, multiple: int):
    return -(-n // multiple) * multiple


def padded_width(d: int) -> int:
    """The width the kernels run at: d padded with zero columns to a multiple of 16.

    Zero columns change no norm, similarity or gradient; a row stride divisible by 16 is what
    lets Triton vectorise every row load (the AOT table lists only that specialisation).
    """
    return _round_up(d, 16)


def _pad(x: Tensor, width: int) -> Tensor:
    x = x.contiguous()
    return x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _stats_shape(B, n) -> Tuple[int, int]:
    """Four fp32 planes of B*n row statistics; each plane starts 16-byte aligned."""
    return 4, _round_up(B * n, 4)


def _planes(stats: Tensor, B: int, n: int) -> List[Tensor]:
    """Views (B*n,) of the planes |X|, base-2 lse of S / tau_r, |y|, base-2 lse of G."""
    return [stats[k, : B * n] for k in range(4)]


# Elements of the y / dy temporaries that one pass over the batch may hold (128 MiB in 16 bits):
# the batch runs in chunks of samples within it. MULCLIP_TRITON_SCRATCH_ELEMENTS overrides it.
DEFAULT_SCRATCH_ELEMENTS = 1 << 26


def _sample_chunks(B: int, elements_per_sample: int) -> List[Tuple[int, int]]:
    """(start, stop) chunks of the batch whose temporaries stay within the budget (one sample at least)."""
    budget = int(os.environ.get("MULCLIP_TRITON_SCRATCH_ELEMENTS", DEFAULT_SCRATCH_ELEMENTS))
    step = max(1, budget // max(1, elements_per_sample))
    return [(start, min(B, start + step)) for start in range(0, B, step)]


def _on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _row_norms(x: Tensor, mask: Tensor, out: Tensor, normalize: bool, plan: Plan) -> None:
    B, n, D = x.shape
    _row_norm_kernel[(B, triton.cdiv(n, plan.rows.block_a))](x, mask, out, n, D, int(normalize),
                                                              **_meta(_row_norm_kernel, plan, D, x.dtype))


def _recon(a, a_mask, a_norm, b, b_mask, b_norm, lse_out, y, b0, recon_temperature, plan) -> None:
    """y = softmax(S / tau_r) b for the rows of `a` of samples b0 .. b0 + len(y); lse into lse_out."""
    _, n_a, D = a.shape
    t = plan.recon
    grid = (y.shape[0], triton.cdiv(n_a, t.block_a), triton.cdiv(D, t.block_dv))
    _recon_kernel[grid](a, a_mask, a_norm, b, b_mask, b_norm, y, lse_out, b0, n_a, b.shape[1], D,
                        LOG2E / recon_temperature, **_meta(_recon_kernel, plan, D, a.dtype))


def _forward_side(a, a_mask, a_planes, b, b_mask, b_norm, recon_temperature, contrast_temperature, plan) -> Tensor:
    """CE per row of side `a` (B, n_a) fp32; fills the lse(S), |y| and lse(G) planes of `a`."""
    B, n_a, D = a.shape
    norm, lse, yn, lseg = a_planes
    ce = a.new_empty((B, n_a), dtype=torch.float32)
    chunks = _sample_chunks(B, n_a * D)
    scratch = a.new_empty((chunks[0][1], n_a, D), dtype=_dot_dtypes(a.dtype)[0])
    for start, stop in chunks:
        y = scratch[: stop - start]
        _recon(a, a_mask, norm, b, b_mask, b_norm, lse, y, start, recon_temperature, plan)
        _contrast_kernel[(stop - start, triton.cdiv(n_a, plan.contrast.block_a))](
            y, a, a_mask, norm, ce, lseg, yn, start, n_a, D, LOG2E / contrast_temperature,
            **_meta(_contrast_kernel, plan, D, a.dtype))
    return ce


def wpr_forward(words: Tensor, word_mask: Tensor, patches: Tensor, patch_mask: Tensor, recon_temperature: float,
                contrast_temperature: float, normalize_inputs: bool,
                plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample loss (B,) fp32 and the statistics backward needs.

    Returns (loss, word_stats, patch_stats, coef): the stats are (4, ~B*n) fp32 planes (see
    `_planes`) of |X|, base-2 lse of S / tau_r, |y| and base-2 lse of G per row; coef (B, 2) holds
    dL_b / dCE of a row of each side. Temporaries: y of one side for a chunk of samples.
    """
    B, K, d = words.shape
    P = patches.shape[1]
    D = padded_width(d)
    words, patches = _pad(words, D), _pad(patches, D)
    word_mask, patch_mask = word_mask.contiguous(), patch_mask.contiguous()
    plan = plan or default_plan(D, words.dtype)
    word_stats = words.new_empty(_stats_shape(B, K), dtype=torch.float32)
    patch_stats = words.new_empty(_stats_shape(B, P), dtype=torch.float32)
    word_planes, patch_planes = _planes(word_stats, B, K), _planes(patch_stats, B, P)
    _row_norms(words, word_mask, word_planes[0], normalize_inputs, plan)
    _row_norms(patches, patch_mask, patch_planes[0], normalize_inputs, plan)
    temperatures = (recon_temperature, contrast_temperature)
    ce_words = _forward_side(words, word_mask, word_planes, patches, patch_mask, patch_planes[0], *temperatures, plan)
    ce_patches = _forward_side(patches, patch_mask, patch_planes, words, word_mask, word_planes[0], *temperatures,
                               plan)
    loss = words.new_empty((B,), dtype=torch.float32)
    coef = words.new_empty((B, 2), dtype=torch.float32)
    _finalize_kernel[(B,)](ce_words, word_mask, ce_patches, patch_mask, loss, coef, K, P,
                           **_meta(_finalize_kernel, plan, D, words.dtype))
    return loss, word_stats, patch_stats, coef


@dataclass
class _Side:
    """One input and what the backward of its side has: saved planes, and for the current chunk
    of samples the recomputed y, its gradient dy and D = dy . y."""

    x: Tensor
    mask: Tensor
    planes: List[Tensor]
    y: Tensor
    dy: Tensor
    dd: Tensor


def _contrast_backward(s: _Side, grad, coef, side, b0, contrast_temperature, plan) -> None:
    """s.dy and s.dd for samples b0 .. b0 + len(s.y) of one side."""
    _, n_a, D = s.x.shape
    norm, _, yn, lseg = s.planes
    t = plan.contrast_backward
    grid = (s.y.shape[0], triton.cdiv(n_a, t.block_a), triton.cdiv(D, t.block_dv))
    _contrast_backward_kernel[grid](
        s.y, s.x, s.mask, norm, yn, lseg, grad, coef, side, s.dy, s.dd, b0, n_a, D,
        LOG2E / contrast_temperature, 1.0 / contrast_temperature, **_meta(_contrast_backward_kernel, plan, D, s.x.dtype))


def _grad_rows(a: _Side, b: _Side, grad, coef, side, out, b0, normalize, recon_temperature, contrast_temperature,
               plan) -> None:
    """Rows of `out` (a's gradient, a's dtype) of samples b0 .. b0 + len(a.y)."""
    _, n_a, D = a.x.shape
    a_norm, a_lse, a_yn, a_lseg = a.planes
    t = plan.grad_rows
    grid = (a.y.shape[0], triton.cdiv(n_a, t.block_a), triton.cdiv(D, t.block_dv))
    _grad_rows_kernel[grid](
        a.x, a.mask, a_norm, a.y, a_yn, a_lseg, a_lse, a.dy, a.dd,
        b.x, b.mask, b.planes[0], b.planes[1], b.dy, b.dd,
        grad, coef, side, out, b0, n_a, b.x.shape[1], D, int(normalize),
        LOG2E / recon_temperature, LOG2E / contrast_temperature, 1.0 / recon_temperature, 1.0 / contrast_temperature,
        **_meta(_grad_rows_kernel, plan, D, a.x.dtype))


def wpr_backward(grad_loss: Tensor, words: Tensor, word_mask: Tensor, patches: Tensor, patch_mask: Tensor,
                 word_stats: Tensor, patch_stats: Tensor, coef: Tensor, recon_temperature: float,
                 contrast_temperature: float, normalize_inputs: bool,
                 plan: Optional[Plan] = None) -> Tuple[Tensor, Tensor]:
    """Gradients of sum_b grad_loss[b] * loss[b] for words and patches, from the saved statistics.

    Temporaries: y and dy of both sides (input dtype) for a chunk of samples.
    """
    B, K, d = words.shape
    P = patches.shape[1]
    D = padded_width(d)
    words, patches = _pad(words, D), _pad(patches, D)
    word_mask, patch_mask = word_mask.contiguous(), patch_mask.contiguous()
    grad = grad_loss.contiguous().to(torch.float32)
    plan = plan or default_plan(D, words.dtype)
    grad_words, grad_patches = torch.empty_like(words), torch.empty_like(patches)
    chunks = _sample_chunks(B, 2 * (K + P) * D)
    scratch = dict(dtype=_dot_dtypes(words.dtype)[0])
    size = chunks[0][1]
    w = _Side(words, word_mask, _planes(word_stats, B, K), words.new_empty((size, K, D), **scratch),
              words.new_empty((size, K, D), **scratch), words.new_empty((size, K), dtype=torch.float32))
    p = _Side(patches, patch_mask, _planes(patch_stats, B, P), words.new_empty((size, P, D), **scratch),
              words.new_empty((size, P, D), **scratch), words.new_empty((size, P), dtype=torch.float32))
    # y is recomputed with the forward's kernel and blocks, so it matches the saved |y| and lse(G)
    # bit for bit; its lse output equals the saved one and goes to a throwaway buffer.
    lse_w, lse_p = torch.empty_like(w.planes[1]), torch.empty_like(p.planes[1])
    options = (normalize_inputs, recon_temperature, contrast_temperature, plan)
    for start, stop in chunks:
        n = stop - start
        wc = _Side(words, word_mask, w.planes, w.y[:n], w.dy[:n], w.dd[:n])
        pc = _Side(patches, patch_mask, p.planes, p.y[:n], p.dy[:n], p.dd[:n])
        _recon(words, word_mask, w.planes[0], patches, patch_mask, p.planes[0], lse_w, wc.y, start,
               recon_temperature, plan)
        _recon(patches, patch_mask, p.planes[0], words, word_mask, w.planes[0], lse_p, pc.y, start,
               recon_temperature, plan)
        _contrast_backward(wc, grad, coef, 0, start, contrast_temperature, plan)
        _contrast_backward(pc, grad, coef, 1, start, contrast_temperature, plan)
        _grad_rows(wc, pc, grad, coef, 0, grad_words, start, *options)
        _grad_rows(pc, wc, grad, coef, 1, grad_patches, start, *options)
    if D != d:
        grad_words, grad_patches = grad_words[..., :d].contiguous(), grad_patches[..., :d].contiguous()
    return grad_words, grad_patches


# ----------------------------------------------------------------------------------------------
# torch.library registration: one opaque node per direction for torch.compile
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("mulclip::word_patch_reconstruction_triton_forward", mutates_args=())
def word_patch_reconstruction_forward(words: Tensor, word_mask: Tensor, patches: Tensor, patch_mask: Tensor,
                                      recon_temperature: float, contrast_temperature: float,
                                      normalize_inputs: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample loss (B,) and the O(B(K+P)) statistics that backward reads (see `wpr_forward`)."""
    with _on_device(words.device):
        return wpr_forward(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature,
                           normalize_inputs)


@word_patch_reconstruction_forward.register_fake
def _(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, normalize_inputs):
    B, K, _ = words.shape
    P = patches.shape[1]
    stats = dict(dtype=torch.float32)
    return (words.new_empty((B,), **stats), words.new_empty(_stats_shape(B, K), **stats),
            words.new_empty(_stats_shape(B, P), **stats), words.new_empty((B, 2), **stats))


@torch.library.custom_op("mulclip::word_patch_reconstruction_triton_backward", mutates_args=())
def word_patch_reconstruction_backward(grad_loss: Tensor, words: Tensor, word_mask: Tensor, patches: Tensor,
                                       patch_mask: Tensor, word_stats: Tensor, patch_stats: Tensor, coef: Tensor,
                                       recon_temperature: float, contrast_temperature: float,
                                       normalize_inputs: bool) -> Tuple[Tensor, Tensor]:
    """Gradients for words and patches of sum(grad_loss * loss), recomputing from the statistics."""
    with _on_device(words.device):
        return wpr_backward(grad_loss, words, word_mask, patches, patch_mask, word_stats, patch_stats, coef,
                            recon_temperature, contrast_temperature, normalize_inputs)


@word_patch_reconstruction_backward.register_fake
def _(grad_loss, words, word_mask, patches, patch_mask, word_stats, patch_stats, coef, recon_temperature,
      contrast_temperature, normalize_inputs):
    return torch.empty_like(words), torch.empty_like(patches)


def _setup_context(ctx, inputs, output):
    words, word_mask, patches, patch_mask, *options = inputs
    _, word_stats, patch_stats, coef = output
    ctx.mark_non_differentiable(word_stats, patch_stats, coef)
    ctx.save_for_backward(words, word_mask, patches, patch_mask, word_stats, patch_stats, coef)
    ctx.options = options


def _backward(ctx, grad_loss, *_stats_grads):
    grad_words, grad_patches = word_patch_reconstruction_backward(grad_loss.contiguous(), *ctx.saved_tensors,
                                                                  *ctx.options)
    return grad_words, None, grad_patches, None, None, None, None


word_patch_reconstruction_forward.register_autograd(_backward, setup_context=_setup_context)


def is_available(device: torch.device) -> Tuple[bool, str]:
    """(ok, reason): CUDA tensors with compiled Triton, or CPU tensors under the Triton interpreter.

    Whether the kernels are interpreted is fixed when this module is imported (`@triton.jit`
    reads TRITON_INTERPRET then), so the environment variable must have been "1" at import.
    """
    if device.type == "cuda":
        if _INTERPRETED:
            return False, "TRITON_INTERPRET=1 was set when the kernels were imported: they run on CPU tensors only"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, ""
    if device.type == "cpu":
        if _INTERPRETED:
            return True, ""
        return False, "the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return False, f"the triton backend runs on CUDA tensors, got device {device}"


def word_patch_reconstruction(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature,
                              normalize_inputs):
    """Per-sample WPR loss (B,); same contract as `reference.word_patch_reconstruction`.

    Float64 inputs run the "torch" backend: the kernels accumulate in fp32.
    """
    if words.dtype == torch.float64:
        return torch_word_patch.word_patch_reconstruction(words, word_mask, patches, patch_mask, recon_temperature,
                                                          contrast_temperature, normalize_inputs)
    return word_patch_reconstruction_forward(words, word_mask, patches, patch_mask, recon_temperature,
                                             contrast_temperature, normalize_inputs)[0]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile check (mulclip_kernels.aot)
# ----------------------------------------------------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signatures(dtype: torch.dtype) -> Dict[str, Dict[str, str]]:
    """Triton signature of every kernel for inputs of `dtype` as the GPU host launches them."""
    x = dot = f"*{_TRITON_TYPES[dtype]}"  # on a GPU the y / dy temporaries have the input dtype
    f32, mask = "*fp32", "*i1"
    side_a = {"a_ptr": x, "a_mask_ptr": mask, "a_norm_ptr": f32}
    return {
        "_row_norm_kernel": {"x_ptr": x, "mask_ptr": mask, "norm_ptr": f32, "n": "i32", "D": "i32", "normalize": "i32"},
        "_recon_kernel": {**side_a, "b_ptr": x, "b_mask_ptr": mask, "b_norm_ptr": f32, "y_ptr": dot, "lse_ptr": f32,
                          "b0": "i32", "n_a": "i32", "n_b": "i32", "D": "i32", "scale": "fp32"},
        "_contrast_kernel": {"y_ptr": dot, **side_a, "ce_ptr": f32, "lseg_ptr": f32, "yn_ptr": f32, "b0": "i32",
                             "n_a": "i32", "D": "i32", "scale": "fp32"},
        "_finalize_kernel": {"ce_w_ptr": f32, "word_mask_ptr": mask, "ce_p_ptr": f32, "patch_mask_ptr": mask,
                             "loss_ptr": f32, "coef_ptr": f32, "K": "i32", "P": "i32"},
        "_contrast_backward_kernel": {"y_ptr": dot, **side_a, "yn_ptr": f32, "lseg_ptr": f32, "grad_ptr": f32,
                                      "coef_ptr": f32, "side": "i32", "dy_ptr": dot, "dd_ptr": f32, "b0": "i32",
                                      "n_a": "i32",
                                      "D": "i32", "scale": "fp32", "inv_tau": "fp32"},
        "_grad_rows_kernel": {**side_a, "a_y_ptr": dot, "a_yn_ptr": f32, "a_lseg_ptr": f32, "a_lse_ptr": f32,
                              "a_dy_ptr": dot, "a_dd_ptr": f32, "b_ptr": x, "b_mask_ptr": mask, "b_norm_ptr": f32,
                              "b_lse_ptr": f32, "b_dy_ptr": dot, "b_dd_ptr": f32, "grad_ptr": f32, "coef_ptr": f32,
                              "side": "i32", "out_ptr": x, "b0": "i32", "n_a": "i32", "n_b": "i32", "D": "i32", "normalize": "i32",
                              "scale_r": "fp32", "scale_c": "fp32", "inv_tau_r": "fp32", "inv_tau_c": "fp32"},
    }


def aot_kernel_configs(max_width: int = 1024) -> List[dict]:
    """Every (kernel, dtype, tiles) that `gpu_plan` launches for widths d <= max_width.

    Each entry: name, fn (the JIT function), signature (parameter -> Triton type, "constexpr" for
    constexprs), constexprs, num_warps, num_stages, and divisible_by_16 (["D"]: the host pads the
    width, so Triton always specialises it as a multiple of 16; the other integers are declared
    `do_not_specialize`). `mulclip_kernels.aot` compiles them for sm_80 and sm_90 and checks
    registers, spills and shared memory.
    """
    entries, seen = [], set()
    for dtype in _TRITON_TYPES:
        signatures = _signatures(dtype)
        for D in range(16, padded_width(max_width) + 1, 16):
            plan = gpu_plan(D, dtype)
            for fn in _KERNELS:
                meta = _meta(fn, plan, D, dtype)
                options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
                signature = {**signatures[fn.__name__], **{key: "constexpr" for key in meta}}
                key = (fn.__name__, tuple(signature.items()), tuple((k, str(v)) for k, v in meta.items()),
                       tuple(options.items()))
                if key not in seen:
                    seen.add(key)
                    entries.append(dict(name=fn.__name__, fn=fn, signature=signature, constexprs=meta, **options,
                                        divisible_by_16=["D"]))
    return entries
