"""CUDA backend ("cuda") of subcaption top-k patch aggregation (SAP), paired and cross.

The kernels are `csrc/subcaption_patch_cuda.cu`: one warp per row (a subcaption against an
image) running the per-row algorithm of `csrc/subcaption_patch.h`, which the "cpp" backend's
tests verify on CPU. Built on first use for the visible GPUs (`mulclip_kernels.cuda_ext.load_cuda`,
cached). Saved for backward beyond the inputs: O(B M k) paired, O(N B k) cross. Inputs float16,
bfloat16 or float32 with float32 accumulation; d <= 1024, P <= 1024, k <= 64, B <= 65535.
"""
import torch

from .. import cuda_ext
from .ext_subcaption_patch import define_ops

MAX_WIDTH = 1024
MAX_PATCHES = 1024
MAX_K = 64
MAX_IMAGES = 65535


def is_available(device):
    """(ok, reason): CUDA tensors, a GPU, nvcc and a C++ compiler to build the module."""
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA tensors, got device {device}"
    return cuda_ext.is_available(device)


def _check(subcaptions, patches, k):
    """The kernels' limits, as errors that name the argument."""
    if subcaptions.dtype == torch.float64:
        raise TypeError("the cuda backend takes float16, bfloat16 or float32; use backend='torch' for float64")
    B, P, d = patches.shape
    if d > MAX_WIDTH:
        raise ValueError(f"the cuda backend takes d <= {MAX_WIDTH}, got d={d}")
    if P > MAX_PATCHES:
        raise ValueError(f"the cuda backend takes P <= {MAX_PATCHES} patches, got P={P}")
    if k > MAX_K:
        raise ValueError(f"the cuda backend takes k <= {MAX_K}, got k={k}")
    if B > MAX_IMAGES:
        raise ValueError(f"the cuda backend takes B <= {MAX_IMAGES} images, got B={B}")


_OPS = define_ops("cuda", "cuda", cuda_ext.load_cuda, check=_check)
subcaption_patch_align = _OPS.subcaption_patch_align
subcaption_patch_scores = _OPS.subcaption_patch_scores
