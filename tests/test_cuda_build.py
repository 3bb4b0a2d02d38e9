"""Compile check of the CUDA extension (csrc/subcaption_patch_cuda.cu + bindings): nvcc compiles
and links it for the target GPUs (8.0 and 9.0 where no GPU is visible, or TORCH_CUDA_ARCH_LIST),
no GPU needed. The build is cached in ~/.cache/mulclip_kernels, so only the first run pays for it
(about three minutes on two cores). Kernels run in tests/test_cuda_subcaption_patch.py, on a GPU.
"""
import pytest
import torch

from mulclip_kernels import cuda_ext

problem = None
if torch.version.cuda is None:
    problem = "this torch is built without CUDA"
elif cuda_ext.find_cuda_home() is None:
    problem = "nvcc / the CUDA toolkit is not installed (set CUDA_HOME to build the CUDA extension)"
else:
    problem = cuda_ext._toolchain_problem("cuda")
pytestmark = pytest.mark.skipif(problem is not None, reason=f"CUDA build check skipped: {problem}")


@pytest.fixture(scope="module")
def cuda_module():
    """The CUDA module, built (or found in the cache) for cuda_ext.cuda_archs(); None where the
    library built but cannot be imported on this machine."""
    try:
        return cuda_ext.load_cuda()
    except ImportError:
        return None


def test_cuda_extension_compiles_and_links(cuda_module):
    library = cuda_ext.cuda_library_path()
    assert library.is_file() and library.stat().st_size > 0, f"no library at {library}"
    archs = cuda_ext.cuda_archs()
    assert archs, "no target architecture"
    if cuda_module is not None:
        assert cuda_module.device == "cuda"
        for name in ("align_forward", "align_backward", "scores_forward", "scores_backward"):
            assert callable(getattr(cuda_module, name))


def test_built_for_every_target_architecture(cuda_module):
    """The fat binary holds machine code for each requested compute capability."""
    library = cuda_ext.cuda_library_path().read_bytes()
    for arch in cuda_ext.cuda_archs():
        number = arch.replace("+PTX", "").replace(".", "")
        assert f"sm_{number}".encode() in library, f"no sm_{number} code in the library"


def test_cuda_module_checks_devices_before_launching(cuda_module):
    """The checks in bindings.cpp run before any CUDA call, so they work without a GPU."""
    if cuda_module is None:
        pytest.skip("the CUDA module built but cannot be imported here")
    subcaptions, patches = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    masks = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="must be on a CUDA device"):
        cuda_module.align_forward(subcaptions, patches, 2, *masks, 0.05, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        cuda_module.scores_forward(subcaptions[0].double(), patches.double(), 2, masks[1], 0.05, True)


def test_cuda_build_directory_is_keyed_by_sources_and_flags():
    """Changing the target architectures gives another cached build, not an overwrite."""
    assert cuda_ext.cuda_library_path("8.0") != cuda_ext.cuda_library_path("9.0")
    assert cuda_ext.cuda_library_path().parent.parent == cuda_ext.cache_root()
