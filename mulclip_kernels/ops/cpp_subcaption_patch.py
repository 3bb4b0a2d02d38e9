"""C++ CPU backend ("cpp") of subcaption top-k patch aggregation (SAP), paired and cross.

The kernels are `csrc/subcaption_patch_cpu.cpp`, built from the per-row algorithm of
`csrc/subcaption_patch.h` that the CUDA backend shares; the module is compiled on first use
(`mulclip_kernels.cuda_ext.load_cpu`, cached). Similarity tiles come from the CPU BLAS and feed a
streaming top-k at once; backward reads the saved indices and similarities and recomputes no
similarity. Saved for backward beyond the inputs: O(B M k) paired, O(N B k) cross. Inputs
float16, bfloat16, float32 or float64; accumulation in float32 (float64 for float64).
"""
from .. import cuda_ext
from .ext_subcaption_patch import define_ops


def is_available(device):
    """(ok, reason): CPU tensors only, with a C++ compiler and ninja to build the module."""
    if device.type != "cpu":
        return False, f"the cpp backend runs on CPU tensors, got device {device}"
    return cuda_ext.is_available(device)


_OPS = define_ops("cpp", "cpu", cuda_ext.load_cpu)
subcaption_patch_align = _OPS.subcaption_patch_align
subcaption_patch_scores = _OPS.subcaption_patch_scores
