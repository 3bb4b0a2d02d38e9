// C++ CPU backend ("cpp") of SAP, paired and cross, forward and backward, built from the per-row
// algorithm of subcaption_patch.h and parallelised with at::parallel_for (OpenMP in the torch
// wheels).
//
// Layout of the work:
// - Calibration first: the subcaptions and patches are copied once into the accumulation
//   dtype (float32, float64 for float64 inputs), L2-normalised, masked rows zeroed. Masked
//   rows are never read from the inputs, so NaN padding cannot leak.
// - Similarities come in tiles, one per task (paired: one image's (M, P); cross: at most
//   kTileElements), from the CPU BLAS (at::mm; small tiles from dot products, see
//   similarity_tile), and are consumed at once by the streaming top-k: nothing of size B*M*P
//   or N*B*P is ever allocated. The BLAS is what makes this faster than a hand-written dot loop.
// - Everything after the similarity (top-k, softmax, aggregation, norms, backward) is the
//   header's per-row code, in loops over d that the compiler vectorises.
// - Backward never recomputes a similarity: it reads the saved indices and sigma (and rho for
//   cross). Each task owns the gradient rows it writes, so there are no atomics: the paired
//   backward runs per image; the cross backward runs one pass per subcaption (dL/du) and one
//   per image (dL/dv).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "subcaption_patch.h"

namespace {

using namespace mulclip::sap;
using at::Tensor;

// Elements of one similarity tile (rows x patches); 256 KiB in float32 stays in L2.
constexpr int64_t kTileElements = 1 << 16;
// Multiply-adds below which a parallel loop stays on one thread: waking OpenMP threads costs
// more than small work, and far more when the cores are shared.
constexpr int64_t kGrainWork = 1 << 20;
// Multiply-adds of a similarity tile from which the BLAS beats plain dot products.
constexpr int64_t kBlasWork = 1 << 18;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, work_per_item));
}

// The simd pragma lets the compiler split the sum into vector lanes (a fixed order for a given
// d); without it a float reduction stays scalar and latency-bound.
template <typename A>
A dot(const A* a, const A* b, int64_t d) {
  A total = A(0);
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < d; ++i) total += a[i] * b[i];
  return total;
}

// out[j] = x . rows[idx[j]] for the chosen rows, four at a time: four independent accumulator
// chains and one load of x for four rows.
template <typename A>
void dot_rows(const A* x, const A* rows, const int* idx, int count, int64_t d, A* out) {
  int j = 0;
  for (; j + 4 <= count; j += 4) {
    const A *r0 = rows + idx[j] * d, *r1 = rows + idx[j + 1] * d, *r2 = rows + idx[j + 2] * d,
            *r3 = rows + idx[j + 3] * d;
    A a0 = A(0), a1 = A(0), a2 = A(0), a3 = A(0);
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < d; ++i) {
      a0 += x[i] * r0[i];
      a1 += x[i] * r1[i];
      a2 += x[i] * r2[i];
      a3 += x[i] * r3[i];
    }
    out[j] = a0;
    out[j + 1] = a1;
    out[j + 2] = a2;
    out[j + 3] = a3;
  }
  for (; j < count; ++j) out[j] = dot(x, rows + idx[j] * d, d);
}

// out (+)= sum_j c[j] rows[idx[j]], a block of columns at a time so that the running sums stay
// in vector registers across the chosen rows instead of going through memory once per row.
// Each element still sums its terms in the order of j. GCC/Clang vector types (32 bytes: one
// AVX register, two SSE ones) make the block explicit; compilers left to vectorise the plain
// loop interchanged it into scalar code.
#if defined(__GNUC__)
template <typename A>
struct Lanes {
  typedef A type __attribute__((vector_size(32)));
  static constexpr int64_t kWidth = 32 / sizeof(A);
  static type load(const A* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(A* p, type v) { std::memcpy(p, &v, sizeof(v)); }
};

template <typename A, bool kAccumulate>
void combine_rows(const A* rows, const int* idx, const A* c, int count, int64_t d, A* out) {
  using L = Lanes<A>;
  using V = typename L::type;
  constexpr int kRegs = 8;
  constexpr int64_t kBlock = kRegs * L::kWidth;
  int64_t i0 = 0;
  for (; i0 + kBlock <= d; i0 += kBlock) {
    V acc[kRegs];
    for (int r = 0; r < kRegs; ++r) acc[r] = kAccumulate ? L::load(out + i0 + r * L::kWidth) : V{};
    for (int j = 0; j < count; ++j) {
      const A* row = rows + idx[j] * d + i0;
      const V cj = V{} + c[j];
      for (int r = 0; r < kRegs; ++r) acc[r] += cj * L::load(row + r * L::kWidth);
    }
    for (int r = 0; r < kRegs; ++r) L::store(out + i0 + r * L::kWidth, acc[r]);
  }
  for (; i0 + L::kWidth <= d; i0 += L::kWidth) {
    V acc = kAccumulate ? L::load(out + i0) : V{};
    for (int j = 0; j < count; ++j) acc += (V{} + c[j]) * L::load(rows + idx[j] * d + i0);
    L::store(out + i0, acc);
  }
  for (; i0 < d; ++i0) {
    A acc = kAccumulate ? out[i0] : A(0);
    for (int j = 0; j < count; ++j) acc += c[j] * rows[idx[j] * d + i0];
    out[i0] = acc;
  }
}
#else
template <typename A, bool kAccumulate>
void combine_rows(const A* rows, const int* idx, const A* c, int count, int64_t d, A* out) {
  for (int64_t i = 0; i < d; ++i) {
    A acc = kAccumulate ? out[i] : A(0);
    for (int j = 0; j < count; ++j) acc += c[j] * rows[idx[j] * d + i];
    out[i] = acc;
  }
}
#endif

// y += a x + b z
template <typename A>
void axpy2(A a, const A* x, A b, const A* z, A* y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i] + b * z[i];
}

// Similarities of `rows` calibrated rows u against the P patches v of one image, (rows, P)
// row-major. Large tiles go to the CPU BLAS. Small ones, where waking the BLAS threads costs
// more than the product, use dot products four patches at a time; the last group repeats its
// last patch so that every similarity comes from the same code and identical patches tie
// exactly.
template <typename A>
const A* similarity_tile(const Tensor& u, const Tensor& v, Tensor& tile, std::vector<A>& buffer) {
  const int64_t rows = u.size(0), P = v.size(0), d = v.size(1);
  if (rows * P * d >= kBlasWork) {
    tile = at::mm(u, v.t()).contiguous();
    return tile.data_ptr<A>();
  }
  buffer.resize(rows * P);
  const A *u_data = u.data_ptr<A>(), *v_data = v.data_ptr<A>();
  int idx[4];
  A out[4];
  for (int64_t p0 = 0; p0 < P; p0 += 4) {
    for (int q = 0; q < 4; ++q) idx[q] = static_cast<int>(std::min(p0 + q, P - 1));
    for (int64_t n = 0; n < rows; ++n) {
      dot_rows(u_data + n * d, v_data, idx, 4, d, out);
      for (int64_t q = 0; q < 4 && p0 + q < P; ++q) buffer[n * P + p0 + q] = out[q];
    }
  }
  return buffer.data();
}

// Calibrated rows in the accumulation dtype (masked rows zero) and the norms of the raw rows.
template <typename T, typename A>
void calibrate(const Tensor& x, const bool* mask, bool normalize, Tensor& out, Tensor& norms) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  out = at::empty({rows, d}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
  norms = at::empty({rows}, out.options());
  const T* src = x.data_ptr<T>();
  A* dst = out.data_ptr<A>();
  A* norm = norms.data_ptr<A>();
  at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      A* y = dst + row * d;
      if (mask != nullptr && !mask[row]) {
        std::fill(y, y + d, A(0));
        norm[row] = A(0);
        continue;
      }
      const T* x_row = src + row * d;
      for (int64_t i = 0; i < d; ++i) y[i] = static_cast<A>(x_row[i]);
      const A sumsq = dot(y, y, d);
      norm[row] = sap_sqrt(sumsq);
      const A scale = calibration_scale(sumsq, normalize);
      for (int64_t i = 0; i < d; ++i) y[i] *= scale;
    }
  });
}

// dL/dx from dL/dx' (in place in `grad`) for one row, written in the input dtype.
template <typename T, typename A>
void write_calibration_grad(const A* grad, const A* xp, A norm, int64_t d, bool normalize, T* out) {
  const A along = dot(xp, grad, d);
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<T>(calibration_backward(grad[i], xp[i], along, norm, normalize));
}

// ---------------------------------------------------------------------------------------------
// Paired: each sample's subcaptions against its own image.
// ---------------------------------------------------------------------------------------------

template <typename T>
std::vector<Tensor> align_forward_impl(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& sub_mask,
                                       const Tensor& patch_mask, double tau, bool normalize) {
  using A = at::opmath_type<T>;
  const int64_t B = sub.size(0), M = sub.size(1), d = sub.size(2), P = patches.size(1);
  Tensor u, u_norm, v, v_norm;
  calibrate<T, A>(sub, sub_mask.data_ptr<bool>(), normalize, u, u_norm);
  calibrate<T, A>(patches, patch_mask.data_ptr<bool>(), normalize, v, v_norm);
  u = u.view({B, M, d});
  v = v.view({B, P, d});

  Tensor regions = at::empty_like(sub);
  Tensor index = at::empty({B, M, k}, sub.options().dtype(at::kInt));
  Tensor sigma = at::empty({B, M, k}, u.options());
  const A* v_data = v.data_ptr<A>();
  const bool* sm = sub_mask.data_ptr<bool>();
  const bool* pm = patch_mask.data_ptr<bool>();
  T* out = regions.data_ptr<T>();
  int* idx_out = index.data_ptr<int>();
  A* sig_out = sigma.data_ptr<A>();
  const A temperature = static_cast<A>(tau);

  at::parallel_for(0, B, grain(M * P * d), [&](int64_t begin, int64_t end) {
    std::vector<A> w(k), r(d), buffer;
    for (int64_t b = begin; b < end; ++b) {
      Tensor tile;
      const A* sim = similarity_tile(u[b], v[b], tile, buffer);  // (M, P)
      const A* vb = v_data + b * P * d;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = b * M + m;
        A* val = sig_out + row * k;
        int* idx = idx_out + row * k;
        int count = 0;
        if (sm[row]) {
          count = select_topk(sim + m * P, pm + b * P, static_cast<int>(P), static_cast<int>(k), val, idx);
        } else {
          select_topk(sim, pm, 0, static_cast<int>(k), val, idx);  // no patch: every slot free
        }
        softmax_chosen(val, count, temperature, w.data());
        combine_rows<A, false>(vb, idx, w.data(), count, d, r.data());
        for (int64_t i = 0; i < d; ++i) out[row * d + i] = static_cast<T>(r[i]);
      }
    }
  });
  return {regions, index, sigma};
}

template <typename T>
std::vector<Tensor> align_backward_impl(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                        const Tensor& index, const Tensor& sigma, const Tensor& sub_mask,
                                        const Tensor& patch_mask, double tau, bool normalize) {
  using A = at::opmath_type<T>;
  const int64_t B = sub.size(0), M = sub.size(1), d = sub.size(2), P = patches.size(1), k = index.size(2);
  Tensor u, u_norm, v, v_norm;
  calibrate<T, A>(sub, sub_mask.data_ptr<bool>(), normalize, u, u_norm);
  calibrate<T, A>(patches, patch_mask.data_ptr<bool>(), normalize, v, v_norm);

  Tensor grad_sub = at::empty_like(sub), grad_patches = at::empty_like(patches);
  const A *u_data = u.data_ptr<A>(), *v_data = v.data_ptr<A>();
  const A *un = u_norm.data_ptr<A>(), *vn = v_norm.data_ptr<A>();
  const A* sig = sigma.data_ptr<A>();
  const int* idx_all = index.data_ptr<int>();
  const T* g_all = grad.data_ptr<T>();
  const bool* sm = sub_mask.data_ptr<bool>();
  const bool* pm = patch_mask.data_ptr<bool>();
  T* gs = grad_sub.data_ptr<T>();
  T* gp = grad_patches.data_ptr<T>();
  const A temperature = static_cast<A>(tau);

  at::parallel_for(0, B, grain(4 * M * k * d + P * d), [&](int64_t begin, int64_t end) {
    std::vector<A> w(k), dw(k), ds(k), g(d), du(d), dv(P * d);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(dv.begin(), dv.end(), A(0));
      const A* vb = v_data + b * P * d;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t row = b * M + m;
        T* gs_row = gs + row * d;
        const int* idx = idx_all + row * k;
        const int count = sm[row] ? chosen_count(idx, static_cast<int>(k)) : 0;
        if (count == 0) {
          std::fill(gs_row, gs_row + d, static_cast<T>(0));
          continue;
        }
        const A* u_row = u_data + row * d;
        for (int64_t i = 0; i < d; ++i) g[i] = static_cast<A>(g_all[row * d + i]);
        softmax_chosen(sig + row * k, count, temperature, w.data());
        dot_rows(g.data(), vb, idx, count, d, dw.data());
        softmax_chosen_backward(w.data(), dw.data(), count, temperature, ds.data());
        combine_rows<A, false>(vb, idx, ds.data(), count, d, du.data());
        for (int j = 0; j < count; ++j) axpy2(w[j], g.data(), ds[j], u_row, dv.data() + idx[j] * d, d);
        write_calibration_grad(du.data(), u_row, un[row], d, normalize, gs_row);
      }
      for (int64_t p = 0; p < P; ++p) {
        T* gp_row = gp + (b * P + p) * d;
        if (pm[b * P + p]) {
          write_calibration_grad(dv.data() + p * d, vb + p * d, vn[b * P + p], d, normalize, gp_row);
        } else {
          std::fill(gp_row, gp_row + d, static_cast<T>(0));
        }
      }
    }
  });
  return {grad_sub, grad_patches};
}

// ---------------------------------------------------------------------------------------------
// Cross: every subcaption against every image.
// ---------------------------------------------------------------------------------------------

template <typename T>
std::vector<Tensor> scores_forward_impl(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& patch_mask,
                                        double tau, bool normalize) {
  using A = at::opmath_type<T>;
  const int64_t N = sub.size(0), d = sub.size(1), B = patches.size(0), P = patches.size(1);
  Tensor u, u_norm, v, v_norm;
  calibrate<T, A>(sub, nullptr, normalize, u, u_norm);
  calibrate<T, A>(patches, patch_mask.data_ptr<bool>(), normalize, v, v_norm);
  v = v.view({B, P, d});

  Tensor scores = at::empty({N, B}, sub.options());
  Tensor index = at::empty({N, B, k}, sub.options().dtype(at::kInt));
  Tensor sigma = at::empty({N, B, k}, u.options());
  Tensor rho = at::empty({N, B, k}, u.options());
  const A *u_data = u.data_ptr<A>(), *v_data = v.data_ptr<A>();
  const bool* pm = patch_mask.data_ptr<bool>();
  T* out = scores.data_ptr<T>();
  int* idx_out = index.data_ptr<int>();
  A* sig_out = sigma.data_ptr<A>();
  A* rho_out = rho.data_ptr<A>();
  const A temperature = static_cast<A>(tau);

  const int64_t tile_rows = std::min<int64_t>(N, std::max<int64_t>(1, kTileElements / P));
  const int64_t tiles = (N + tile_rows - 1) / tile_rows;
  at::parallel_for(0, B * tiles, grain(tile_rows * P * d), [&](int64_t begin, int64_t end) {
    std::vector<A> w(k), r(d), buffer;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, n0 = (task % tiles) * tile_rows, rows = std::min(tile_rows, N - n0);
      Tensor tile;
      const A* sim = similarity_tile(u.narrow(0, n0, rows), v[b], tile, buffer);  // (rows, P)
      const A* vb = v_data + b * P * d;
      for (int64_t n = n0; n < n0 + rows; ++n) {
        const int64_t row = n * B + b;
        A* val = sig_out + row * k;
        int* idx = idx_out + row * k;
        const int count = select_topk(sim + (n - n0) * P, pm + b * P, static_cast<int>(P), static_cast<int>(k),
                                      val, idx);
        softmax_chosen(val, count, temperature, w.data());
        combine_rows<A, false>(vb, idx, w.data(), count, d, r.data());
        dot_rows(r.data(), vb, idx, count, d, rho_out + row * k);
        std::fill(rho_out + row * k + count, rho_out + (row + 1) * k, A(0));
        out[row] = static_cast<T>(cross_score(dot(u_data + n * d, r.data(), d), dot(r.data(), r.data(), d)));
      }
    }
  });
  return {scores, index, sigma, rho};
}

template <typename T>
std::vector<Tensor> scores_backward_impl(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                         const Tensor& index, const Tensor& sigma, const Tensor& rho,
                                         const Tensor& patch_mask, double tau, bool normalize) {
  using A = at::opmath_type<T>;
  const int64_t N = sub.size(0), d = sub.size(1), B = patches.size(0), P = patches.size(1), k = index.size(2);
  Tensor u, u_norm, v, v_norm;
  calibrate<T, A>(sub, nullptr, normalize, u, u_norm);
  calibrate<T, A>(patches, patch_mask.data_ptr<bool>(), normalize, v, v_norm);

  Tensor grad_sub = at::empty_like(sub), grad_patches = at::empty_like(patches);
  const A *u_data = u.data_ptr<A>(), *v_data = v.data_ptr<A>();
  const A *un = u_norm.data_ptr<A>(), *vn = v_norm.data_ptr<A>();
  const A *sig = sigma.data_ptr<A>(), *rh = rho.data_ptr<A>();
  const int* idx_all = index.data_ptr<int>();
  const T* g_all = grad.data_ptr<T>();
  const bool* pm = patch_mask.data_ptr<bool>();
  T* gs = grad_sub.data_ptr<T>();
  T* gp = grad_patches.data_ptr<T>();
  const A temperature = static_cast<A>(tau);

  // The per-row scalars of one (n, b) pair; cheap (O(k)), so both passes recompute them.
  struct Row {
    std::vector<A> w, scratch, alpha, beta;
    explicit Row(int64_t k) : w(k), scratch(k), alpha(k), beta(k) {}
  };
  auto coefficients = [&](int64_t n, int64_t b, Row& s, int& count, A& divisor) {
    const int64_t row = n * B + b;
    count = chosen_count(idx_all + row * k, static_cast<int>(k));
    softmax_chosen(sig + row * k, count, temperature, s.w.data());
    divisor = cross_backward_coefficients(sig + row * k, rh + row * k, s.w.data(), count,
                                          static_cast<A>(g_all[row]), temperature, s.scratch.data(),
                                          s.alpha.data(), s.beta.data());
  };

  // dL/du: one task per subcaption, over every image.
  at::parallel_for(0, N, grain(B * k * d), [&](int64_t begin, int64_t end) {
    Row s(k);
    std::vector<A> du(d);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(du.begin(), du.end(), A(0));
      for (int64_t b = 0; b < B; ++b) {
        if (static_cast<A>(g_all[n * B + b]) == A(0)) continue;  // every term carries g
        int count;
        A divisor;
        coefficients(n, b, s, count, divisor);
        const int* idx = idx_all + (n * B + b) * k;
        combine_rows<A, true>(v_data + b * P * d, idx, s.alpha.data(), count, d, du.data());
      }
      write_calibration_grad(du.data(), u_data + n * d, un[n], d, normalize, gs + n * d);
    }
  });

  // dL/dv: one task per image, over every subcaption.
  at::parallel_for(0, B, grain(3 * N * k * d + P * d), [&](int64_t begin, int64_t end) {
    Row s(k);
    std::vector<A> y(d), dv(P * d);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(dv.begin(), dv.end(), A(0));
      const A* vb = v_data + b * P * d;
      for (int64_t n = 0; n < N; ++n) {
        if (static_cast<A>(g_all[n * B + b]) == A(0)) continue;
        int count;
        A divisor;
        coefficients(n, b, s, count, divisor);
        const int* idx = idx_all + (n * B + b) * k;
        for (int j = 0; j < count; ++j) s.scratch[j] = s.w[j] / divisor;
        combine_rows<A, false>(vb, idx, s.scratch.data(), count, d, y.data());  // y = r / D
        const A* u_row = u_data + n * d;
        for (int j = 0; j < count; ++j) axpy2(s.alpha[j], u_row, -s.beta[j], y.data(), dv.data() + idx[j] * d, d);
      }
      for (int64_t p = 0; p < P; ++p) {
        T* gp_row = gp + (b * P + p) * d;
        if (pm[b * P + p]) {
          write_calibration_grad(dv.data() + p * d, vb + p * d, vn[b * P + p], d, normalize, gp_row);
        } else {
          std::fill(gp_row, gp_row + d, static_cast<T>(0));
        }
      }
    }
  });
  return {grad_sub, grad_patches};
}

}  // namespace

std::vector<Tensor> sap_align_forward_cpu(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& sub_mask,
                                          const Tensor& patch_mask, double tau, bool normalize) {
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sub.scalar_type(), "sap_align_forward_cpu", [&] {
    out = align_forward_impl<scalar_t>(sub, patches, k, sub_mask, patch_mask, tau, normalize);
  });
  return out;
}

std::vector<Tensor> sap_align_backward_cpu(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                           const Tensor& index, const Tensor& sigma, const Tensor& sub_mask,
                                           const Tensor& patch_mask, double tau, bool normalize) {
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sub.scalar_type(), "sap_align_backward_cpu", [&] {
    out = align_backward_impl<scalar_t>(grad, sub, patches, index, sigma, sub_mask, patch_mask, tau, normalize);
  });
  return out;
}

std::vector<Tensor> sap_scores_forward_cpu(const Tensor& sub, const Tensor& patches, int64_t k,
                                           const Tensor& patch_mask, double tau, bool normalize) {
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sub.scalar_type(), "sap_scores_forward_cpu", [&] {
    out = scores_forward_impl<scalar_t>(sub, patches, k, patch_mask, tau, normalize);
  });
  return out;
}

std::vector<Tensor> sap_scores_backward_cpu(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                            const Tensor& index, const Tensor& sigma, const Tensor& rho,
                                            const Tensor& patch_mask, double tau, bool normalize) {
  c10::NoGradGuard no_grad;
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sub.scalar_type(), "sap_scores_backward_cpu", [&] {
    out = scores_backward_impl<scalar_t>(grad, sub, patches, index, sigma, rho, patch_mask, tau, normalize);
  });
  return out;
}
