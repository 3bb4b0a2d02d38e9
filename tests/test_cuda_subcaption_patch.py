"""The CUDA backend "cuda" of SAP against the eager reference, on a GPU (skipped without one).

The same cases as tests/test_cpp_subcaption_patch.py (whose CPU build of the shared header is
what runs where no GPU is), k capped at the kernels' 64, plus the paper's shapes. The first test
builds the CUDA module for the visible GPU (cached in ~/.cache/mulclip_kernels).
"""
import pytest
import torch

from inputs import sap_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores
from mulclip_kernels.dispatch import availability
from mulclip_kernels.ops import cpp_subcaption_patch as cpp
from mulclip_kernels.ops import cuda_subcaption_patch as cuda
import sap_checks
from sap_checks import CASES, case_inputs, check_parity, run_align, run_scores

DEVICE = torch.device("cuda")
ok, why = availability("subcaption_patch_align", "cuda", DEVICE) if torch.cuda.is_available() else (False, "no GPU")
pytestmark = pytest.mark.skipif(not ok, reason=f"cuda backend unavailable: {why}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LARGE = [
    pytest.param(("align", dict(B=64, M=8, P=576, d=768)), id="align-B64-M8-P576-d768"),
    pytest.param(("scores", dict(N=512, B=64, P=576, d=768)), id="scores-N512-B64-P576-d768"),
]


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def align_parity(subcaptions, patches, k, subcaption_mask, patch_mask, dtype):
    seed = torch.randn(subcaptions.shape, dtype=torch.float64, device=DEVICE)
    exact = run_align("reference", subcaptions, patches, k, subcaption_mask, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, subcaption_mask, patch_mask, seed)
    lowp = run_align("reference", *cast)
    fused = run_align("cuda", *cast)
    check_parity(["regions", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)
    return fused


def scores_parity(subcaptions, patches, k, patch_mask, dtype):
    seed = torch.randn(subcaptions.shape[0], patches.shape[0], dtype=torch.float64, device=DEVICE)
    exact = run_scores("reference", subcaptions, patches, k, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, patch_mask, seed)
    lowp = run_scores("reference", *cast)
    fused = run_scores("cuda", *cast)
    check_parity(["scores", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_align_parity(case, dtype):
    B, M, P, d, k, _ = case
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*case_inputs(*case))
    subcaption_mask[1, :] = False
    regions, grad_sub, _ = align_parity(subcaptions, patches, min(k, cuda.MAX_K), subcaption_mask, patch_mask, dtype)
    assert (regions[~subcaption_mask] == 0).all() and (grad_sub[~subcaption_mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_scores_parity(case, dtype):
    B, M, P, d, k, _ = case
    subcaptions, patches, _, patch_mask = on_device(*case_inputs(*case))
    scores_parity(subcaptions.reshape(B * M, d), patches, min(k, cuda.MAX_K), patch_mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LARGE)
def test_parity_at_paper_shapes(case, dtype):
    op, shape = case
    if op == "align":
        subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(**shape))
        align_parity(subcaptions, patches, 16, subcaption_mask, patch_mask, dtype)
    else:
        B, P, d = shape["B"], shape["P"], shape["d"]
        subcaptions = torch.randn(shape["N"], d, dtype=torch.float64, device=DEVICE)
        patches = torch.randn(B, P, d, dtype=torch.float64, device=DEVICE)
        patch_mask = torch.rand(B, P, device=DEVICE) < 0.9
        patch_mask[:, :16] = True
        scores_parity(subcaptions, patches, 16, patch_mask, dtype)


def test_cuda_matches_cpp_indices_and_values():
    """The kernels and the CPU build of the same header choose the same patches."""
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5, P=197, d=96, dtype=torch.float32)
    cpu = cpp._OPS.align_forward(subcaptions, patches, 9, subcaption_mask, patch_mask, 0.05, True)
    gpu = cuda._OPS.align_forward(*on_device(subcaptions, patches), 9, *on_device(subcaption_mask, patch_mask), 0.05,
                                  True)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-5, atol=1e-6)
    flat = subcaptions.reshape(-1, 96)
    cpu = cpp._OPS.scores_forward(flat, patches, 9, patch_mask, 0.05, True)
    gpu = cuda._OPS.scores_forward(*on_device(flat, patches), 9, patch_mask.to(DEVICE), 0.05, True)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    for a, b in zip(gpu[:1] + gpu[2:], cpu[:1] + cpu[2:]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


def test_masked_positions_have_no_influence():
    # Atomics add in any order, so gradients may differ by rounding; values may not.
    sap_checks.masked_positions_have_no_influence("cuda", DEVICE, torch.bfloat16, grad_rtol=1e-2, grad_atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(k):
    sap_checks.exact_ties_go_to_the_lower_index("cuda", DEVICE, cuda._OPS.align_forward, cuda._OPS.scores_forward, k,
                                                torch.float32, atol=1e-7)


def test_cross_diagonal_is_paired_cosine():
    sap_checks.cross_diagonal_is_paired_cosine("cuda", DEVICE, rtol=1e-5, atol=1e-6)


def test_fewer_valid_patches_than_k_keeps_the_valid_ones():
    subcaptions, patches, _, _ = sap_inputs(B=2, M=3, P=17, d=10, dtype=torch.float32)
    patch_mask = torch.ones(2, 17, dtype=torch.bool)
    patch_mask[0, 5:] = False
    everything = torch.ones(2, 3, dtype=torch.bool)
    expected = cpp._OPS.align_forward(subcaptions, patches, 8, everything, patch_mask, 0.05, True)
    got = cuda._OPS.align_forward(*on_device(subcaptions, patches), 8, *on_device(everything, patch_mask), 0.05, True)
    assert torch.equal(got[1].cpu(), expected[1])
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=1e-5, atol=1e-6)


def test_saved_for_backward_is_indices_and_statistics():
    sap_checks.saves_indices_and_statistics_only("cuda", DEVICE)


def test_limits_raise_clear_errors():
    subcaptions, patches = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 80, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k <= 64"):
        subcaption_patch_align(subcaptions, patches, 65, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        subcaption_patch_scores(subcaptions[0].double(), patches.double(), 4, backend="cuda")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager(compiler):
    sap_checks.compiled_fullgraph_matches_eager("cuda", DEVICE, compiler, rtol=1e-5, atol=1e-6)
