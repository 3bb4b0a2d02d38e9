// Python bindings of the SAP ops, with the shape, device and dtype checks in front of them.
// Compiled twice: into the CPU module (subcaption_patch_cpu.cpp) and, with MULCLIP_WITH_CUDA,
// into the CUDA module (subcaption_patch_cuda.cu). Both expose the same four functions:
//   align_forward(subcaptions (B,M,d), patches (B,P,d), k, subcaption_mask (B,M) bool,
//                 patch_mask (B,P) bool, temperature, normalize)
//       -> [regions (B,M,d), index (B,M,k) int32, sigma (B,M,k)]
//   align_backward(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask,
//                  temperature, normalize) -> [grad_subcaptions, grad_patches]
//   scores_forward(subcaptions (N,d), patches (B,P,d), k, patch_mask, temperature, normalize)
//       -> [scores (N,B), index (N,B,k) int32, sigma (N,B,k), rho (N,B,k)]
//   scores_backward(grad_scores, subcaptions, patches, index, sigma, rho, patch_mask,
//                   temperature, normalize) -> [grad_subcaptions, grad_patches]
// sigma and rho are in the accumulation dtype: float32, float64 for float64 inputs (CPU only).
#include <torch/extension.h>

#include <vector>

using at::Tensor;

#ifdef MULCLIP_WITH_CUDA
#define SAP_IMPL(name) name##_cuda
constexpr bool kCuda = true;
#else
#define SAP_IMPL(name) name##_cpu
constexpr bool kCuda = false;
#endif

std::vector<Tensor> SAP_IMPL(sap_align_forward)(const Tensor& sub, const Tensor& patches, int64_t k,
                                                const Tensor& sub_mask, const Tensor& patch_mask, double tau,
                                                bool normalize);
std::vector<Tensor> SAP_IMPL(sap_align_backward)(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                                 const Tensor& index, const Tensor& sigma, const Tensor& sub_mask,
                                                 const Tensor& patch_mask, double tau, bool normalize);
std::vector<Tensor> SAP_IMPL(sap_scores_forward)(const Tensor& sub, const Tensor& patches, int64_t k,
                                                 const Tensor& patch_mask, double tau, bool normalize);
std::vector<Tensor> SAP_IMPL(sap_scores_backward)(const Tensor& grad, const Tensor& sub, const Tensor& patches,
                                                  const Tensor& index, const Tensor& sigma, const Tensor& rho,
                                                  const Tensor& patch_mask, double tau, bool normalize);

namespace {

// Limits of the CUDA kernels, whose rows live in shared memory (see subcaption_patch_cuda.cu).
constexpr int64_t kCudaMaxWidth = 1024;
constexpr int64_t kCudaMaxPatches = 1024;
constexpr int64_t kCudaMaxK = 64;

void check_features(const char* name, const Tensor& x, int64_t dim, const char* doc) {
  TORCH_CHECK(x.dim() == dim, name, " must have shape ", doc, ", got ", x.sizes());
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || (!kCuda && type == at::kDouble),
              name, " must be float32, float16 or bfloat16", kCuda ? "" : " or float64", ", got ", type);
  TORCH_CHECK(kCuda ? x.is_cuda() : x.device().is_cpu(), name, " must be on ", kCuda ? "a CUDA device" : "the CPU",
              ", got ", x.device());
  TORCH_CHECK(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

void check_like(const char* name, const Tensor& x, const Tensor& like, at::IntArrayRef shape) {
  TORCH_CHECK(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but the features are on ", like.device());
}

void check_mask(const char* name, const Tensor& mask, const Tensor& like, at::IntArrayRef shape) {
  check_like(name, mask, like, shape);
  TORCH_CHECK(mask.scalar_type() == at::kBool, name, " must be bool, got ", mask.scalar_type());
}

void check_grad(const Tensor& grad, const Tensor& like, at::IntArrayRef shape) {
  check_like("grad", grad, like, shape);
  TORCH_CHECK(grad.scalar_type() == like.scalar_type(), "grad must have the input dtype ", like.scalar_type(),
              ", got ", grad.scalar_type());
}

void check_residual(const char* name, const Tensor& x, const Tensor& like, at::IntArrayRef shape,
                    at::ScalarType type) {
  check_like(name, x, like, shape);
  TORCH_CHECK(x.scalar_type() == type, name, " must be ", type, " (saved by the forward), got ", x.scalar_type());
}

at::ScalarType accumulation_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Shared checks of both ops: features, widths, k, temperature and the CUDA limits.
void check_common(const Tensor& sub, const Tensor& patches, int64_t k, double tau) {
  check_features("patches", patches, 3, "(B, P, d)");
  TORCH_CHECK(sub.scalar_type() == patches.scalar_type(), "subcaptions (", sub.scalar_type(), ") and patches (",
              patches.scalar_type(), ") must share one dtype");
  TORCH_CHECK(sub.device() == patches.device(), "subcaptions (", sub.device(), ") and patches (", patches.device(),
              ") must be on one device");
  const int64_t d = patches.size(2), P = patches.size(1);
  TORCH_CHECK(sub.size(-1) == d, "subcaptions have width d=", sub.size(-1), " but patches have d=", d);
  TORCH_CHECK(k >= 1 && k <= P, "k must be between 1 and the number of patches P=", P, ", got k=", k);
  TORCH_CHECK(tau > 0, "temperature must be positive, got ", tau);
  if (kCuda) {
    TORCH_CHECK(d <= kCudaMaxWidth, "the CUDA kernels take d <= ", kCudaMaxWidth, ", got d=", d);
    TORCH_CHECK(P <= kCudaMaxPatches, "the CUDA kernels take P <= ", kCudaMaxPatches, ", got P=", P);
    TORCH_CHECK(k <= kCudaMaxK, "the CUDA kernels take k <= ", kCudaMaxK, ", got k=", k);
  }
}

std::vector<Tensor> align_forward(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& sub_mask,
                                  const Tensor& patch_mask, double tau, bool normalize) {
  check_features("subcaptions", sub, 3, "(B, M, d)");
  check_common(sub, patches, k, tau);
  TORCH_CHECK(patches.size(0) == sub.size(0), "patches have batch B=", patches.size(0), " but subcaptions have B=",
              sub.size(0));
  check_mask("subcaption_mask", sub_mask, sub, {sub.size(0), sub.size(1)});
  check_mask("patch_mask", patch_mask, sub, {patches.size(0), patches.size(1)});
  return SAP_IMPL(sap_align_forward)(sub.contiguous(), patches.contiguous(), k, sub_mask.contiguous(),
                                     patch_mask.contiguous(), tau, normalize);
}

std::vector<Tensor> align_backward(const Tensor& grad, const Tensor& sub, const Tensor& patches, const Tensor& index,
                                   const Tensor& sigma, const Tensor& sub_mask, const Tensor& patch_mask, double tau,
                                   bool normalize) {
  check_features("subcaptions", sub, 3, "(B, M, d)");
  TORCH_CHECK(index.dim() == 3, "index must have shape (B, M, k), got ", index.sizes());
  check_common(sub, patches, index.size(2), tau);
  const int64_t B = sub.size(0), M = sub.size(1), k = index.size(2);
  check_grad(grad, sub, sub.sizes());
  check_residual("index", index, sub, {B, M, k}, at::kInt);
  check_residual("sigma", sigma, sub, {B, M, k}, accumulation_type(sub));
  check_mask("subcaption_mask", sub_mask, sub, {B, M});
  check_mask("patch_mask", patch_mask, sub, {B, patches.size(1)});
  return SAP_IMPL(sap_align_backward)(grad.contiguous(), sub.contiguous(), patches.contiguous(), index.contiguous(),
                                      sigma.contiguous(), sub_mask.contiguous(), patch_mask.contiguous(), tau,
                                      normalize);
}

std::vector<Tensor> scores_forward(const Tensor& sub, const Tensor& patches, int64_t k, const Tensor& patch_mask,
                                   double tau, bool normalize) {
  check_features("subcaptions", sub, 2, "(N, d)");
  check_common(sub, patches, k, tau);
  check_mask("patch_mask", patch_mask, sub, {patches.size(0), patches.size(1)});
  return SAP_IMPL(sap_scores_forward)(sub.contiguous(), patches.contiguous(), k, patch_mask.contiguous(), tau,
                                      normalize);
}

std::vector<Tensor> scores_backward(const Tensor& grad, const Tensor& sub, const Tensor& patches, const Tensor& index,
                                    const Tensor& sigma, const Tensor& rho, const Tensor& patch_mask, double tau,
                                    bool normalize) {
  check_features("subcaptions", sub, 2, "(N, d)");
  TORCH_CHECK(index.dim() == 3, "index must have shape (N, B, k), got ", index.sizes());
  check_common(sub, patches, index.size(2), tau);
  const int64_t N = sub.size(0), B = patches.size(0), k = index.size(2);
  check_grad(grad, sub, {N, B});
  check_residual("index", index, sub, {N, B, k}, at::kInt);
  check_residual("sigma", sigma, sub, {N, B, k}, accumulation_type(sub));
  check_residual("rho", rho, sub, {N, B, k}, accumulation_type(sub));
  check_mask("patch_mask", patch_mask, sub, {B, patches.size(1)});
  return SAP_IMPL(sap_scores_backward)(grad.contiguous(), sub.contiguous(), patches.contiguous(), index.contiguous(),
                                       sigma.contiguous(), rho.contiguous(), patch_mask.contiguous(), tau, normalize);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Subcaption top-k patch aggregation (SAP), paired and cross, forward and backward";
  m.attr("device") = kCuda ? "cuda" : "cpu";
  m.def("align_forward", &align_forward, "paired SAP forward: regions, chosen indices, their similarities");
  m.def("align_backward", &align_backward, "paired SAP backward from the saved indices and similarities");
  m.def("scores_forward", &scores_forward, "cross SAP forward: scores, chosen indices, similarities, r . v'");
  m.def("scores_backward", &scores_backward, "cross SAP backward from the saved residuals");
}
