// CUDA backend ("cuda") of SAP, paired and cross, forward and backward.
//
// Every kernel gives one warp one row (a subcaption against an image) and runs the per-row
// algorithm of subcaption_patch.h, whose CPU build is what the tests without a GPU exercise:
// lanes split the width d, warp shuffles reduce over it, and lane 0 runs the scalar parts
// (streaming top-k, softmax over the chosen patches, backward coefficients) on rows staged
// in shared memory. Nothing of size B*M*P or N*B*P exists: the similarities of one row live in
// shared memory while its top-k is taken.
//
// The kernels read the raw inputs and calibrate on the fly with per-row scales
// (row_stats_kernel): v'_p = v_p * scale_p, scale = 1 / max(|v|, eps) (1 without
// normalisation, 0 for masked rows, which are never read, so NaN padding cannot leak).
// Backward accumulates dL/dv' in a float32 buffer with atomics (several rows may choose the
// same patch) and a last kernel maps it through the calibration into the input dtype.
//
// Limits, checked in bindings.cpp: d <= 1024, P <= 1024, k <= 64 (rows in shared memory),
// B <= 65535 (grid y), float32/float16/bfloat16 with float32 accumulation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "subcaption_patch.h"

namespace {

using namespace mulclip::sap;
using at::Tensor;

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;  // rows per block
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxWidth = 1024;
constexpr int kMaxPatches = 1024;
constexpr int kMaxRow = kMaxWidth > kMaxPatches ? kMaxWidth : kMaxPatches;
constexpr int kMaxK = kMaxKCuda;
constexpr int kPatchStep = 4;  // patches per similarity step: four independent reductions in flight

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return static_cast<float>(*p);
}

template <typename T>
__device__ __forceinline__ T to(float x) {
  return static_cast<T>(x);
}

// scale and norm of each row (see the top of the file). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const T* __restrict__ x, const bool* __restrict__ mask, int64_t rows, int d, bool normalize,
                     float* __restrict__ scale, float* __restrict__ norm) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  if (mask != nullptr && !mask[row]) {
    if (lane == 0) scale[row] = norm[row] = 0.f;
    return;
  }
  const T* xr = x + row * d;
  float sumsq = 0.f;
  for (int i = lane; i < d; i += kWarpSize) {
    const float v = ld(xr + i);
    sumsq += v * v;
  }
  sumsq = warp_sum(sumsq);
  if (lane == 0) {
    scale[row] = calibration_scale(sumsq, normalize);
    norm[row] = sqrtf(sumsq);
  }
}

// Forward of one row per warp. Paired (kCross false): row m of sample b, blockIdx.y = b,
// writes the region. Cross: subcaption n against image b = blockIdx.y, writes the score and rho.
template <typename T, bool kCross>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ sub, const float* __restrict__ sub_scale, const bool* __restrict__ sub_mask,
                   const T* __restrict__ patches, const float* __restrict__ patch_scale,
                   const bool* __restrict__ patch_mask, int rows, int B, int P, int d, int k, float tau,
                   T* __restrict__ out, int* __restrict__ index, float* __restrict__ sigma, float* __restrict__ rho) {
  __shared__ float s_u[kWarps][kMaxWidth];
  __shared__ float s_row[kWarps][kMaxRow];  // the similarities, then the region
  __shared__ float s_val[kWarps][kMaxK];
  __shared__ int s_idx[kWarps][kMaxK];
  __shared__ float s_w[kWarps][kMaxK];
  __shared__ int s_count[kWarps];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int b = blockIdx.y;
  const int r = blockIdx.x * kWarps + warp;
  if (r >= rows) return;
  const int64_t u_row = kCross ? r : static_cast<int64_t>(b) * rows + r;
  const int64_t res_row = kCross ? static_cast<int64_t>(r) * B + b : u_row;  // row of the residuals
  int* idx_out = index + res_row * k;
  float* sig_out = sigma + res_row * k;
  const T* vb = patches + static_cast<int64_t>(b) * P * d;
  const float* vs = patch_scale + static_cast<int64_t>(b) * P;
  const bool* vm = patch_mask + static_cast<int64_t>(b) * P;
  float* u = s_u[warp];
  float* row = s_row[warp];
  float* val = s_val[warp];
  int* idx = s_idx[warp];
  float* w = s_w[warp];

  if (!kCross && !sub_mask[u_row]) {  // a masked subcaption: zero region, no chosen patch
    for (int i = lane; i < d; i += kWarpSize) out[u_row * d + i] = to<T>(0.f);
    for (int j = lane; j < k; j += kWarpSize) {
      idx_out[j] = -1;
      sig_out[j] = 0.f;
    }
    return;
  }
  const float us = sub_scale[u_row];
  for (int i = lane; i < d; i += kWarpSize) u[i] = ld(sub + u_row * d + i) * us;
  __syncwarp();

  // sigma_p = u' . v'_p for every patch; masked patches are skipped here and in the top-k.
  for (int p0 = 0; p0 < P; p0 += kPatchStep) {
    float acc[kPatchStep];
    bool live[kPatchStep];
#pragma unroll
    for (int q = 0; q < kPatchStep; ++q) {
      acc[q] = 0.f;
      live[q] = p0 + q < P && vm[p0 + q];
    }
    for (int i = lane; i < d; i += kWarpSize) {
      const float ui = u[i];
#pragma unroll
      for (int q = 0; q < kPatchStep; ++q) {
        if (live[q]) acc[q] += ui * ld(vb + static_cast<int64_t>(p0 + q) * d + i);
      }
    }
#pragma unroll
    for (int q = 0; q < kPatchStep; ++q) {
      const float s = warp_sum(acc[q]);
      if (lane == 0 && p0 + q < P) row[p0 + q] = s * vs[p0 + q];
    }
  }
  __syncwarp();
  if (lane == 0) {
    const int count = select_topk(row, vm, P, k, val, idx);
    softmax_chosen(val, count, tau, w);
    s_count[warp] = count;
  }
  __syncwarp();
  const int count = s_count[warp];

  // r = sum_j w_j v'_j; each lane owns the same elements of u', row and r throughout.
  float r_sumsq = 0.f, u_dot_r = 0.f;
  for (int i = lane; i < d; i += kWarpSize) {
    float acc = 0.f;
    for (int j = 0; j < count; ++j) acc += w[j] * (ld(vb + static_cast<int64_t>(idx[j]) * d + i) * vs[idx[j]]);
    row[i] = acc;
    r_sumsq += acc * acc;
    u_dot_r += u[i] * acc;
    if (!kCross) out[u_row * d + i] = to<T>(acc);
  }
  if (kCross) {
    for (int j = 0; j < count; ++j) {
      const int p = idx[j];
      float part = 0.f;
      for (int i = lane; i < d; i += kWarpSize) part += row[i] * (ld(vb + static_cast<int64_t>(p) * d + i) * vs[p]);
      part = warp_sum(part);
      if (lane == 0) rho[res_row * k + j] = part;
    }
    for (int j = count + lane; j < k; j += kWarpSize) rho[res_row * k + j] = 0.f;
    r_sumsq = warp_sum(r_sumsq);
    u_dot_r = warp_sum(u_dot_r);
    if (lane == 0) out[res_row] = to<T>(cross_score(u_dot_r, r_sumsq));
  }
  for (int j = lane; j < k; j += kWarpSize) {
    idx_out[j] = idx[j];
    sig_out[j] = val[j];
  }
}

// Paired backward, one row (b, m) per warp: dL/du written, dL/dv' added to grad_v (float32).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    align_backward_kernel(const T* __restrict__ grad, const T* __restrict__ sub, const float* __restrict__ sub_scale,
                          const float* __restrict__ sub_norm, const bool* __restrict__ sub_mask,
                          const T* __restrict__ patches, const float* __restrict__ patch_scale,
                          const int* __restrict__ index, const float* __restrict__ sigma, int M, int P, int d, int k,
                          float tau, bool normalize, T* __restrict__ grad_sub, float* __restrict__ grad_v) {
  __shared__ float s_u[kWarps][kMaxWidth];
  __shared__ float s_g[kWarps][kMaxWidth];  // the upstream gradient, then dL/du'
  __shared__ float s_w[kWarps][kMaxK];
  __shared__ float s_dw[kWarps][kMaxK];
  __shared__ float s_ds[kWarps][kMaxK];
  __shared__ int s_idx[kWarps][kMaxK];
  __shared__ int s_count[kWarps];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int b = blockIdx.y;
  const int m = blockIdx.x * kWarps + warp;
  if (m >= M) return;
  const int64_t row = static_cast<int64_t>(b) * M + m;
  T* gs = grad_sub + row * d;
  const T* vb = patches + static_cast<int64_t>(b) * P * d;
  const float* vs = patch_scale + static_cast<int64_t>(b) * P;
  float* u = s_u[warp];
  float* g = s_g[warp];
  float* w = s_w[warp];
  float* dw = s_dw[warp];
  float* ds = s_ds[warp];
  int* idx = s_idx[warp];

  if (lane == 0) {
    const int count = sub_mask[row] ? chosen_count(index + row * k, k) : 0;
    for (int j = 0; j < count; ++j) idx[j] = index[row * k + j];
    softmax_chosen(sigma + row * k, count, tau, w);
    s_count[warp] = count;
  }
  __syncwarp();
  const int count = s_count[warp];
  if (count == 0) {
    for (int i = lane; i < d; i += kWarpSize) gs[i] = to<T>(0.f);
    return;
  }
  const float us = sub_scale[row];
  for (int i = lane; i < d; i += kWarpSize) {
    u[i] = ld(sub + row * d + i) * us;
    g[i] = ld(grad + row * d + i);
  }
  for (int j = 0; j < count; ++j) {  // dw_j = g . v'_j
    const int p = idx[j];
    float part = 0.f;
    for (int i = lane; i < d; i += kWarpSize) part += g[i] * (ld(vb + static_cast<int64_t>(p) * d + i) * vs[p]);
    part = warp_sum(part);
    if (lane == 0) dw[j] = part;
  }
  __syncwarp();
  if (lane == 0) softmax_chosen_backward(w, dw, count, tau, ds);
  __syncwarp();
  float along = 0.f;
  for (int i = lane; i < d; i += kWarpSize) {
    const float gi = g[i], ui = u[i];
    float du = 0.f;
    for (int j = 0; j < count; ++j) {
      const int p = idx[j];
      atomicAdd(grad_v + (static_cast<int64_t>(b) * P + p) * d + i, w[j] * gi + ds[j] * ui);
      du += ds[j] * (ld(vb + static_cast<int64_t>(p) * d + i) * vs[p]);
    }
    g[i] = du;
    along += ui * du;
  }
  along = warp_sum(along);
  const float norm = sub_norm[row];
  for (int i = lane; i < d; i += kWarpSize) gs[i] = to<T>(calibration_backward(g[i], u[i], along, norm, normalize));
}

// Loads the saved row (n, b) of the cross op and computes its backward coefficients (lane 0);
// `c` gets w_j / D, the weights of y = r / D.
__device__ __forceinline__ int cross_row_coefficients(const int* index, const float* sigma, const float* rho,
                                                      int64_t row, int k, float g, float tau, int* idx, float* w,
                                                      float* scratch, float* alpha, float* beta, float* c) {
  const int count = chosen_count(index + row * k, k);
  for (int j = 0; j < count; ++j) idx[j] = index[row * k + j];
  softmax_chosen(sigma + row * k, count, tau, w);
  const float divisor =
      cross_backward_coefficients(sigma + row * k, rho + row * k, w, count, g, tau, scratch, alpha, beta);
  for (int j = 0; j < count; ++j) c[j] = w[j] / divisor;
  return count;
}

// Cross backward, dL/du: one warp per subcaption n, over every image (no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scores_backward_sub_kernel(const T* __restrict__ grad, const T* __restrict__ sub,
                               const float* __restrict__ sub_scale, const float* __restrict__ sub_norm,
                               const T* __restrict__ patches, const float* __restrict__ patch_scale,
                               const int* __restrict__ index, const float* __restrict__ sigma,
                               const float* __restrict__ rho, int N, int B, int P, int d, int k, float tau,
                               bool normalize, T* __restrict__ grad_sub) {
  __shared__ float s_u[kWarps][kMaxWidth];
  __shared__ float s_du[kWarps][kMaxWidth];
  __shared__ float s_w[kWarps][kMaxK], s_scratch[kWarps][kMaxK], s_alpha[kWarps][kMaxK], s_beta[kWarps][kMaxK],
      s_c[kWarps][kMaxK];
  __shared__ int s_idx[kWarps][kMaxK];
  __shared__ int s_count[kWarps];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int n = blockIdx.x * kWarps + warp;
  if (n >= N) return;
  float* u = s_u[warp];
  float* du = s_du[warp];
  const float* alpha = s_alpha[warp];
  const int* idx = s_idx[warp];
  const float us = sub_scale[n];
  for (int i = lane; i < d; i += kWarpSize) {
    u[i] = ld(sub + static_cast<int64_t>(n) * d + i) * us;
    du[i] = 0.f;
  }
  for (int b = 0; b < B; ++b) {
    const int64_t row = static_cast<int64_t>(n) * B + b;
    const float g = ld(grad + row);
    if (g == 0.f) continue;  // every term carries g
    __syncwarp();             // the lanes are done with the previous image's coefficients
    if (lane == 0) {
      s_count[warp] = cross_row_coefficients(index, sigma, rho, row, k, g, tau, s_idx[warp], s_w[warp],
                                             s_scratch[warp], s_alpha[warp], s_beta[warp], s_c[warp]);
    }
    __syncwarp();
    const int count = s_count[warp];
    const T* vb = patches + static_cast<int64_t>(b) * P * d;
    const float* vs = patch_scale + static_cast<int64_t>(b) * P;
    for (int i = lane; i < d; i += kWarpSize) {
      float acc = du[i];
      for (int j = 0; j < count; ++j) acc += alpha[j] * (ld(vb + static_cast<int64_t>(idx[j]) * d + i) * vs[idx[j]]);
      du[i] = acc;
    }
  }
  float along = 0.f;
  for (int i = lane; i < d; i += kWarpSize) along += u[i] * du[i];
  along = warp_sum(along);
  const float norm = sub_norm[n];
  T* gs = grad_sub + static_cast<int64_t>(n) * d;
  for (int i = lane; i < d; i += kWarpSize) gs[i] = to<T>(calibration_backward(du[i], u[i], along, norm, normalize));
}

// Cross backward, dL/dv': one warp per (n, b), added to grad_v (float32) with atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scores_backward_patch_kernel(const T* __restrict__ grad, const T* __restrict__ sub,
                                 const float* __restrict__ sub_scale, const T* __restrict__ patches,
                                 const float* __restrict__ patch_scale, const int* __restrict__ index,
                                 const float* __restrict__ sigma, const float* __restrict__ rho, int N, int B, int P,
                                 int d, int k, float tau, float* __restrict__ grad_v) {
  __shared__ float s_w[kWarps][kMaxK], s_scratch[kWarps][kMaxK], s_alpha[kWarps][kMaxK], s_beta[kWarps][kMaxK],
      s_c[kWarps][kMaxK];
  __shared__ int s_idx[kWarps][kMaxK];
  __shared__ int s_count[kWarps];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int n = blockIdx.x * kWarps + warp;
  const int b = blockIdx.y;
  if (n >= N) return;
  const int64_t row = static_cast<int64_t>(n) * B + b;
  const float g = ld(grad + row);
  if (g == 0.f) return;
  if (lane == 0) {
    s_count[warp] = cross_row_coefficients(index, sigma, rho, row, k, g, tau, s_idx[warp], s_w[warp],
                                           s_scratch[warp], s_alpha[warp], s_beta[warp], s_c[warp]);
  }
  __syncwarp();
  const int count = s_count[warp];
  const float* alpha = s_alpha[warp];
  const float* beta = s_beta[warp];
  const float* c = s_c[warp];
  const int* idx = s_idx[warp];
  const T* vb = patches + static_cast<int64_t>(b) * P * d;
  const float* vs = patch_scale + static_cast<int64_t>(b) * P;
  const float us = sub_scale[n];
  for (int i = lane; i < d; i += kWarpSize) {
    const float ui = ld(sub + static_cast<int64_t>(n) * d + i) * us;
    float y = 0.f;
    for (int j = 0; j < count; ++j) y += c[j] * (ld(vb + static_cast<int64_t>(idx[j]) * d + i) * vs[idx[j]]);
    for (int j = 0; j < count; ++j) {
      atomicAdd(grad_v + (static_cast<int64_t>(b) * P + idx[j]) * d + i, alpha[j] * ui - beta[j] * y);
    }
  }
}

// dL/dv from the accumulated dL/dv' through the calibration, in the input dtype; zero on masked
// patches. One warp per patch row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    patch_grad_kernel(const float* __restrict__ grad_v, const T* __restrict__ patches,
                      const float* __restrict__ patch_scale, const float* __restrict__ patch_norm,
                      const bool* __restrict__ patch_mask, int64_t rows, int d, bool normalize,
                      T* __restrict__ grad_patches) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  T* out = grad_patches + row * d;
  if (!patch_mask[row]) {
    for (int i = lane; i < d; i += kWarpSize) out[i] = to<T>(0.f);
    return;
  }
  const float* dv = grad_v + row * d;
  const T* v = patches + row * d;
  const float scale = patch_scale[row];
  float along = 0.f;
  for (int i = lane; i < d; i += kWarpSize) along += dv[i] * (ld(v + i) * scale);
  along = warp_sum(along);
  const float norm = patch_norm[row];
  for (int i = lane; i < d; i += kWarpSize) {
    out[i] = to<T>(calibration_backward(dv[i], ld(v + i) * scale, along, norm, normalize));
  }
}

#define SAP_DISPATCH(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

unsigned int blocks_for(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarps - 1) / kWarps);
}

// Per-row calibration scale and norm of x (rows = x.numel() / d), float32.
void row_stats(const Tensor& x, const bool* mask, bool normalize, Tensor& scale, Tensor& norm, cudaStream_t stream) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  scale = at::empty({rows}, x.options().dtype(at::kFloat));
  norm = at::empty({rows}, scale.options());
  SAP_DISPATCH(x.scalar_type(), "sap_row_stats", [&] {
    row_stats_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), mask, rows, static_cast<int>(d), normalize, scale.data_ptr<float>(),
        norm.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor patch_grad(const Tensor& grad_v, const Tensor& patches, const Tensor& scale, const Tensor& norm,
                  const Tensor& patch_mask, bool normalize, cudaStream_t stream) {
  const int64_t d = patches.size(2), rows = patches.size(0) * patches.size(1);
  Tensor grad_patches = at::empty_like(patches);
  SAP_DISPATCH(patches.scalar_type(), "sap_patch_grad", [&] {
    patch_grad_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(
        grad_v.data_ptr<float>(), patches.data_ptr<scalar_t>(), scale.data_ptr<float>(), norm.data_ptr<float>(),
        patch_mask.data_ptr<bool>(), rows, static_cast<int>(d), normalize, grad_patches.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_patches;
}

}  // namespace

std::vector<Tensor> sap_align_forward_cuda(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& sub_mask,
                                           const Tensor& patch_mask, double tau, bool normalize) {
  const c10::cuda::CUDAGuard guard(sub.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = sub.size(0), M = sub.size(1), d = sub.size(2), P = patches.size(1);
  TORCH_CHECK(B <= 65535, "the CUDA kernels take B <= 65535, got ", B);
  Tensor sub_scale, sub_norm, patch_scale, patch_norm;
  row_stats(sub, sub_mask.data_ptr<bool>(), normalize, sub_scale, sub_norm, stream);
  row_stats(patches, patch_mask.data_ptr<bool>(), normalize, patch_scale, patch_norm, stream);
  Tensor regions = at::empty_like(sub);
  Tensor index = at::empty({B, M, k}, sub.options().dtype(at::kInt));
  Tensor sigma = at::empty({B, M, k}, sub.options().dtype(at::kFloat));
  const dim3 grid(blocks_for(M), static_cast<unsigned int>(B));
  SAP_DISPATCH(sub.scalar_type(), "sap_align_forward_cuda", [&] {
    forward_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
        sub.data_ptr<scalar_t>(), sub_scale.data_ptr<float>(), sub_mask.data_ptr<bool>(),
        patches.data_ptr<scalar_t>(), patch_scale.data_ptr<float>(), patch_mask.data_ptr<bool>(),
        static_cast<int>(M), static_cast<int>(B), static_cast<int>(P), static_cast<int>(d), static_cast<int>(k),
        static_cast<float>(tau), regions.data_ptr<scalar_t>(), index.data_ptr<int>(), sigma.data_ptr<float>(),
        nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {regions, index, sigma};
}

std::vector<Tensor> sap_align_backward_cuda(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                            const Tensor& index, const Tensor& sigma, const Tensor& sub_mask,
                                            const Tensor& patch_mask, double tau, bool normalize) {
  const c10::cuda::CUDAGuard guard(sub.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = sub.size(0), M = sub.size(1), d = sub.size(2), P = patches.size(1), k = index.size(2);
  TORCH_CHECK(B <= 65535, "the CUDA kernels take B <= 65535, got ", B);
  Tensor sub_scale, sub_norm, patch_scale, patch_norm;
  row_stats(sub, sub_mask.data_ptr<bool>(), normalize, sub_scale, sub_norm, stream);
  row_stats(patches, patch_mask.data_ptr<bool>(), normalize, patch_scale, patch_norm, stream);
  Tensor grad_sub = at::empty_like(sub);
  Tensor grad_v = at::zeros({B, P, d}, sub.options().dtype(at::kFloat));
  const dim3 grid(blocks_for(M), static_cast<unsigned int>(B));
  SAP_DISPATCH(sub.scalar_type(), "sap_align_backward_cuda", [&] {
    align_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), sub.data_ptr<scalar_t>(), sub_scale.data_ptr<float>(), sub_norm.data_ptr<float>(),
        sub_mask.data_ptr<bool>(), patches.data_ptr<scalar_t>(), patch_scale.data_ptr<float>(),
        index.data_ptr<int>(), sigma.data_ptr<float>(), static_cast<int>(M), static_cast<int>(P),
        static_cast<int>(d), static_cast<int>(k), static_cast<float>(tau), normalize, grad_sub.data_ptr<scalar_t>(),
        grad_v.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_sub, patch_grad(grad_v, patches, patch_scale, patch_norm, patch_mask, normalize, stream)};
}

std::vector<Tensor> sap_scores_forward_cuda(const Tensor& sub, const Tensor& patches, int64_t k,
                                            const Tensor& patch_mask, double tau, bool normalize) {
  const c10::cuda::CUDAGuard guard(sub.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = sub.size(0), d = sub.size(1), B = patches.size(0), P = patches.size(1);
  TORCH_CHECK(B <= 65535, "the CUDA kernels take B <= 65535, got ", B);
  Tensor sub_scale, sub_norm, patch_scale, patch_norm;
  row_stats(sub, nullptr, normalize, sub_scale, sub_norm, stream);
  row_stats(patches, patch_mask.data_ptr<bool>(), normalize, patch_scale, patch_norm, stream);
  Tensor scores = at::empty({N, B}, sub.options());
  Tensor index = at::empty({N, B, k}, sub.options().dtype(at::kInt));
  Tensor sigma = at::empty({N, B, k}, sub.options().dtype(at::kFloat));
  Tensor rho = at::empty({N, B, k}, sigma.options());
  const dim3 grid(blocks_for(N), static_cast<unsigned int>(B));
  SAP_DISPATCH(sub.scalar_type(), "sap_scores_forward_cuda", [&] {
    forward_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(
        sub.data_ptr<scalar_t>(), sub_scale.data_ptr<float>(), nullptr, patches.data_ptr<scalar_t>(),
        patch_scale.data_ptr<float>(), patch_mask.data_ptr<bool>(), static_cast<int>(N), static_cast<int>(B),
        static_cast<int>(P), static_cast<int>(d), static_cast<int>(k), static_cast<float>(tau),
        scores.data_ptr<scalar_t>(), index.data_ptr<int>(), sigma.data_ptr<float>(), rho.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, index, sigma, rho};
}

std::vector<Tensor> sap_scores_backward_cuda(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                             const Tensor& index, const Tensor& sigma, const Tensor& rho,
                                             const Tensor& patch_mask, double tau, bool normalize) {
  const c10::cuda::CUDAGuard guard(sub.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t N = sub.size(0), d = sub.size(1), B = patches.size(0), P = patches.size(1), k = index.size(2);
  TORCH_CHECK(B <= 65535, "the CUDA kernels take B <= 65535, got ", B);
  Tensor sub_scale, sub_norm, patch_scale, patch_norm;
  row_stats(sub, nullptr, normalize, sub_scale, sub_norm, stream);
  row_stats(patches, patch_mask.data_ptr<bool>(), normalize, patch_scale, patch_norm, stream);
  Tensor grad_sub = at::empty_like(sub);
  Tensor grad_v = at::zeros({B, P, d}, sub.options().dtype(at::kFloat));
  SAP_DISPATCH(sub.scalar_type(), "sap_scores_backward_cuda", [&] {
    scores_backward_sub_kernel<scalar_t><<<blocks_for(N), kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), sub.data_ptr<scalar_t>(), sub_scale.data_ptr<float>(), sub_norm.data_ptr<float>(),
        patches.data_ptr<scalar_t>(), patch_scale.data_ptr<float>(), index.data_ptr<int>(), sigma.data_ptr<float>(),
        rho.data_ptr<float>(), static_cast<int>(N), static_cast<int>(B), static_cast<int>(P), static_cast<int>(d),
        static_cast<int>(k), static_cast<float>(tau), normalize, grad_sub.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scores_backward_patch_kernel<scalar_t><<<dim3(blocks_for(N), static_cast<unsigned int>(B)), kThreads, 0,
                                             stream>>>(
        grad.data_ptr<scalar_t>(), sub.data_ptr<scalar_t>(), sub_scale.data_ptr<float>(),
        patches.data_ptr<scalar_t>(), patch_scale.data_ptr<float>(), index.data_ptr<int>(), sigma.data_ptr<float>(),
        rho.data_ptr<float>(), static_cast<int>(N), static_cast<int>(B), static_cast<int>(P), static_cast<int>(d),
        static_cast<int>(k), static_cast<float>(tau), grad_v.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_sub, patch_grad(grad_v, patches, patch_scale, patch_norm, patch_mask, normalize, stream)};
}
