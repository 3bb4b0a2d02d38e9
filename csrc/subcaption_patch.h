// Subcaption top-k patch aggregation (SAP, method section 4): the per-row algorithm, written
// once for the C++ CPU build (subcaption_patch_cpu.cpp) and the CUDA build
// (subcaption_patch_cuda.cu). Everything here is a scalar function of one row (one subcaption
// against one image), so the CPU tests of backend "cpp" exercise the same code as the kernels.
//
// One row, with u' the calibrated subcaption and v'_p the calibrated patches of the image:
//   sigma_p = u' . v'_p over valid patches
//   I       = the k largest sigma_p, ties to the lower patch index      (topk_push, select_topk)
//   w       = softmax_I(sigma / tau)                                     (softmax_chosen)
//   r       = sum_{j in I} w_j v'_j                          paired output: the region
//   s       = u' . r / max(|r|, eps)                         cross output: the score
// Residuals kept for backward, per row: the chosen indices (int32) and sigma of the chosen
// patches; the cross op also keeps rho_j = r . v'_j. With those, |r|^2 = sum_j w_j rho_j and
// u' . r = sum_j w_j sigma_j, so the cross backward never rebuilds r to get its scalars.
//
// Backward (g the upstream gradient, D = max(|r|, eps), open = |r| > eps):
//   paired:  dw_j = g . v'_j
//   cross:   dw_j = g (sigma_j - open s rho_j / D) / D        (g a scalar here)
//   both:    ds_j = w_j (dw_j - sum_i w_i dw_i) / tau           (softmax_chosen_backward)
//   paired:  du' = sum_j ds_j v'_j,                dv'_j += w_j g + ds_j u'
//   cross:   du' = sum_j alpha_j v'_j,             dv'_j += alpha_j u' - beta_j y,  y = r / D
//            alpha_j = ds_j + g w_j / D,  beta_j = open g s w_j / D   (cross_backward_coefficients)
// and through the calibration x' = x / max(|x|, eps) (calibration_backward).
//
// A row whose image has fewer than k valid patches (only reachable when the host-side check of
// k is skipped, e.g. under torch.compile) keeps the valid ones; the free slots hold index -1 and
// take no part in anything. A masked subcaption (paired) is a row with no chosen patch: zero
// region, zero gradient.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define SAP_HD __host__ __device__ __forceinline__
#else
#define SAP_HD inline
#endif

namespace mulclip {
namespace sap {

constexpr int kMaxKCuda = 64;  // the CUDA kernels keep the chosen patches in shared memory
constexpr double kEps = 1e-6;  // norm(x) = x / max(|x|, eps)

SAP_HD float sap_exp(float x) { return expf(x); }
SAP_HD double sap_exp(double x) { return exp(x); }
SAP_HD float sap_sqrt(float x) { return sqrtf(x); }
SAP_HD double sap_sqrt(double x) { return sqrt(x); }

template <typename A>
SAP_HD A sap_max(A a, A b) {
  return a > b ? a : b;
}

// Scale that calibrates a row with squared norm `sumsq`: 1 / max(|x|, eps), or 1 when the op
// uses its inputs as given.
template <typename A>
SAP_HD A calibration_scale(A sumsq, bool normalize) {
  return normalize ? A(1) / sap_max(sap_sqrt(sumsq), A(kEps)) : A(1);
}

// One element of the gradient through x' = x / max(|x|, eps), given dL/dx'_i, x'_i,
// dot = x' . dL/dx' and norm = |x|. Below eps the map is x / eps, a plain scaling.
template <typename A>
SAP_HD A calibration_backward(A grad_i, A xp_i, A dot, A norm, bool normalize) {
  if (!normalize) return grad_i;
  return norm > A(kEps) ? (grad_i - xp_i * dot) / norm : grad_i / A(kEps);
}

// Streaming top-k. `val` holds the `count` best values so far in descending order and `idx`
// their patch indices. Candidates must arrive in increasing index order: a candidate equal to
// a kept value then belongs after it (ties to the lower index), and one equal to the current
// k-th value is not better than it.
template <typename A>
SAP_HD void topk_push(A* val, int* idx, int& count, int k, A value, int index) {
  if (count == k) {
    if (!(value > val[k - 1])) return;
    --count;  // the k-th drops out
  }
  int pos = count;
  while (pos > 0 && val[pos - 1] < value) {
    val[pos] = val[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  val[pos] = value;
  idx[pos] = index;
  ++count;
}

// The top-k of one row of similarities over its valid patches; returns how many were chosen
// (k unless the image has fewer valid patches) and marks the free slots with index -1.
template <typename A>
SAP_HD int select_topk(const A* sigma, const bool* mask, int num_patches, int k, A* val, int* idx) {
  int count = 0;
  A kth = A(0);  // val[k - 1] once k are kept: most candidates stop at this one comparison
  for (int p = 0; p < num_patches; ++p) {
    if (!mask[p]) continue;
    const A value = sigma[p];
    if (count == k && !(value > kth)) continue;
    topk_push(val, idx, count, k, value, p);
    if (count == k) kth = val[k - 1];
  }
  for (int j = count; j < k; ++j) {
    val[j] = A(0);
    idx[j] = -1;
  }
  return count;
}

// Number of chosen patches of a saved row (the free slots, index -1, come last).
SAP_HD int chosen_count(const int* idx, int k) {
  int count = 0;
  while (count < k && idx[count] >= 0) ++count;
  return count;
}

// w = softmax(sigma / tau) over the chosen patches; sigma is in descending order, so sigma[0]
// is the maximum that keeps the exponentials finite.
template <typename A>
SAP_HD void softmax_chosen(const A* sigma, int count, A tau, A* w) {
  if (count == 0) return;
  A total = A(0);
  for (int j = 0; j < count; ++j) {
    w[j] = sap_exp((sigma[j] - sigma[0]) / tau);
    total += w[j];
  }
  for (int j = 0; j < count; ++j) w[j] /= total;
}

// ds_j = w_j (dw_j - sum_i w_i dw_i) / tau: from dL/dw to dL/dsigma through the softmax.
template <typename A>
SAP_HD void softmax_chosen_backward(const A* w, const A* dw, int count, A tau, A* ds) {
  A mean = A(0);
  for (int j = 0; j < count; ++j) mean += w[j] * dw[j];
  for (int j = 0; j < count; ++j) ds[j] = w[j] * (dw[j] - mean) / tau;
}

// The cross score from u' . r and |r|^2.
template <typename A>
SAP_HD A cross_score(A u_dot_r, A r_sumsq) {
  return u_dot_r / sap_max(sap_sqrt(r_sumsq), A(kEps));
}

// Backward of one cross score s = u' . r / max(|r|, eps) with upstream gradient g, from the
// saved sigma and rho of the chosen patches and their weights w. Fills alpha and beta (see the
// top of this file; `scratch` holds dw) and returns D = max(|r|, eps), the divisor of y = r / D.
template <typename A>
SAP_HD A cross_backward_coefficients(const A* sigma, const A* rho, const A* w, int count, A g, A tau,
                                     A* scratch, A* alpha, A* beta) {
  A r_sumsq = A(0), u_dot_r = A(0);
  for (int j = 0; j < count; ++j) {
    r_sumsq += w[j] * rho[j];
    u_dot_r += w[j] * sigma[j];
  }
  const A norm = sap_sqrt(sap_max(r_sumsq, A(0)));
  const bool open = norm > A(kEps);
  const A D = open ? norm : A(kEps);
  const A score = u_dot_r / D;
  for (int j = 0; j < count; ++j) scratch[j] = g * (sigma[j] - (open ? score * rho[j] / D : A(0))) / D;
  softmax_chosen_backward(w, scratch, count, tau, alpha);
  for (int j = 0; j < count; ++j) {
    beta[j] = open ? g * score * w[j] / D : A(0);
    alpha[j] += g * w[j] / D;
  }
  return D;
}

}  // namespace sap
}  // namespace mulclip
