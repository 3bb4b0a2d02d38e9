"""Triton SAP backend against the eager reference: parity rule, masks, ties, saved bytes, compile.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 first) on small odd shapes with small tiles; on a GPU the same checks run at
paper-like shapes in every dtype. The helpers are the cpp backend's tests', so every SAP backend
is held to the same checks.
"""
import pytest
import torch

from inputs import leaves, sap_inputs
from mulclip_kernels import reference, subcaption_patch_align
from mulclip_kernels.ops import triton_subcaption_patch as triton_sap
from mulclip_kernels.ops import triton_word_patch
import sap_checks
from sap_checks import case_inputs, check_parity, run_align, run_scores

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = triton_word_patch._INTERPRETED
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests: a GPU runs the large ones instead")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (B, M, P, d, k, all patches valid): odd P and d, k = 1, 7 and P (29: 32 top-k slots).
SMALL = [
    pytest.param((3, 5, 29, 24, 1, False), id="B3-M5-P29-d24-k1"),
    pytest.param((3, 5, 29, 24, 7, False), id="B3-M5-P29-d24-k7"),
    pytest.param((3, 5, 29, 24, 29, True), id="B3-M5-P29-d24-kP"),
    pytest.param((2, 3, 197, 24, 7, False), id="B2-M3-P197-d24-k7"),
    pytest.param((2, 2, 29, 768, 7, False), id="B2-M2-P29-d768-k7"),
]
LARGE = [
    pytest.param((4, 8, 197, 768, 16, False), id="B4-M8-P197-d768-k16"),
    pytest.param((3, 6, 577, 512, 64, False), id="B3-M6-P577-d512-k64"),
    pytest.param((2, 5, 1024, 1024, 7, True), id="B2-M5-P1024-d1024-k7"),
]
# Every width chunk loop and row block split over several programs, on the interpreter.
_NARROW_FORWARD = triton_sap.Tiles(16, 16, 16, 16, num_warps=1, num_stages=1)
_NARROW_BACKWARD = triton_sap.Tiles(2, 0, 0, 16, num_warps=1, num_stages=1)
_NARROW = triton_sap.Plan(forward=_NARROW_FORWARD, forward_cross=_NARROW_FORWARD, align_backward=_NARROW_BACKWARD,
                          scores_backward=_NARROW_BACKWARD, rows=triton_sap.Tiles(8, 0, 16, 0, num_warps=1, num_stages=1))


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def align_parity(case, dtype):
    B, M, P, d, k, _ = case
    subcaptions, patches, subcaption_mask, patch_mask = case_inputs(*case)
    subcaption_mask[1, :] = False  # a sample without subcaptions
    seed = torch.randn(B, M, d, dtype=torch.float64)  # run_align moves it to the outputs' device
    exact = run_align("reference", subcaptions, patches, k, subcaption_mask, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, subcaption_mask, patch_mask, seed)
    lowp = run_align("reference", *cast)
    s, p, sm, pm = on_device(cast[0], cast[1], subcaption_mask, patch_mask)
    fused = [x.cpu() for x in run_align("triton", s, p, k, sm, pm, seed)]
    check_parity(["regions", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)
    assert (fused[0][~subcaption_mask] == 0).all() and (fused[1][~subcaption_mask] == 0).all()
    assert (fused[2][~patch_mask] == 0).all() and (fused[2][1] == 0).all()


def scores_parity(case, dtype):
    B, M, P, d, k, _ = case
    subcaptions, patches, _, patch_mask = case_inputs(*case)
    subcaptions = subcaptions.reshape(B * M, d)
    seed = torch.randn(B * M, B, dtype=torch.float64)
    exact = run_scores("reference", subcaptions, patches, k, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, patch_mask, seed)
    lowp = run_scores("reference", *cast)
    s, p, pm = on_device(cast[0], cast[1], patch_mask)
    fused = [x.cpu() for x in run_scores("triton", s, p, k, pm, seed)]
    check_parity(["scores", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)
    assert (fused[2][~patch_mask] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL)
def test_align_parity(case, dtype):
    align_parity(case, dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL)
def test_scores_parity(case, dtype):
    scores_parity(case, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LARGE)
def test_parity_at_large_shapes(case, dtype):
    align_parity(case, dtype)
    scores_parity(case, dtype)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_narrow_tiles_match_the_reference(normalize):
    """Width split into several chunks, rows into several blocks, in both directions."""
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(B=2, M=5, P=37, d=40,
                                                                             dtype=torch.float32))
    grad_regions = torch.randn_like(subcaptions)
    regions, index, sigma = triton_sap.align_forward(subcaptions, patches, 6, subcaption_mask, patch_mask, 0.05,
                                                     normalize, plan=_NARROW)
    grads = triton_sap.align_backward(grad_regions, subcaptions, patches, index, sigma, subcaption_mask, patch_mask,
                                      0.05, normalize, plan=_NARROW)
    s, p = leaves(subcaptions.double(), patches.double())
    expected = reference.subcaption_patch_align(s, p, 6, subcaption_mask, patch_mask, 0.05, normalize)
    expected_grads = torch.autograd.grad(expected, (s, p), grad_regions.double())
    torch.testing.assert_close(regions.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

    rows = subcaptions[0]
    grad_scores = torch.randn(5, 2, device=DEVICE)
    scores, index, sigma, rho = triton_sap.scores_forward(rows, patches, 6, patch_mask, 0.05, normalize, plan=_NARROW)
    grads = triton_sap.scores_backward(grad_scores, rows, patches, index, sigma, rho, patch_mask, 0.05, normalize,
                                       plan=_NARROW)
    s, p = leaves(rows.double(), patches.double())
    expected = reference.subcaption_patch_scores(s, p, 6, patch_mask, 0.05, normalize)
    expected_grads = torch.autograd.grad(expected, (s, p), grad_scores.double())
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_positions_have_no_influence(dtype):
    sap_checks.masked_positions_have_no_influence("triton", DEVICE, dtype, grad_rtol=1e-6, grad_atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(k):
    sap_checks.exact_ties_go_to_the_lower_index("triton", DEVICE, triton_sap.align_forward, triton_sap.scores_forward,
                                                k, torch.float32, atol=1e-6)


def test_ties_between_duplicated_patches_match_the_reference_indices():
    subcaptions, patches, _, patch_mask = on_device(*sap_inputs(B=2, M=4, P=37, d=24, dtype=torch.float32))
    patches = patches.clone()
    patches[:, 9] = patches[:, 3]
    patches[:, 35] = patches[:, 3]
    all_subcaptions = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    for k in (1, 4, 8):
        _, index, sigma = triton_sap.align_forward(subcaptions, patches, k, all_subcaptions, patch_mask, 0.05, True)
        u, v = reference.normalize(subcaptions.double()), reference.normalize(patches.double())
        exact = u @ v.transpose(1, 2)
        exact[..., 9] = exact[..., 35] = exact[..., 3]  # exact ties, however the kernel rounds
        exact = exact.masked_fill(~patch_mask[:, None], float("-inf"))
        assert torch.equal(index.long(), reference.topk_lower_index(exact, k)), k
        torch.testing.assert_close(sigma.double(), torch.gather(exact, -1, index.long()), rtol=0, atol=1e-6)


def test_cross_diagonal_is_paired_cosine():
    sap_checks.cross_diagonal_is_paired_cosine("triton", DEVICE, rtol=1e-5, atol=1e-6)


def test_fewer_valid_patches_than_k_keeps_the_valid_ones():
    """Without the host check of k (as under torch.compile) an image with fewer valid patches than
    k aggregates all of them; the free slots hold index -1 and nothing is read out of bounds."""
    subcaptions, patches, _, _ = sap_inputs(B=2, M=3, P=17, d=10, dtype=torch.float32)
    patch_mask = torch.ones(2, 17, dtype=torch.bool)
    patch_mask[0, 5:] = False  # image 0: 5 valid patches, fewer than k = 8
    all_subcaptions = torch.ones(2, 3, dtype=torch.bool)
    regions, index, _ = triton_sap.align_forward(*on_device(subcaptions, patches), 8,
                                                 *on_device(all_subcaptions, patch_mask), 0.05, True)
    regions, index = regions.cpu(), index.cpu()
    assert (index[0, :, 5:] == -1).all() and (index[0, :, :5] >= 0).all()
    short = reference.subcaption_patch_align(subcaptions[:1], patches[:1], 5, all_subcaptions[:1], patch_mask[:1],
                                             0.05, True)
    full = reference.subcaption_patch_align(subcaptions[1:], patches[1:], 8, all_subcaptions[1:], patch_mask[1:],
                                            0.05, True)
    torch.testing.assert_close(regions, torch.cat([short, full]), rtol=1e-5, atol=1e-6)


def test_saved_for_backward_is_indices_and_statistics():
    sap_checks.saves_indices_and_statistics_only("triton", DEVICE, B=3, M=4, P=29, d=16, k=4)


def test_float64_and_large_k_run_the_torch_path():
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(B=2, M=3, P=80, d=8))
    patch_mask = torch.ones_like(patch_mask)
    for k in (5, 70):
        cast = subcaptions if k == 5 else subcaptions.float()
        args = (cast, patches.to(cast.dtype), k)
        got = subcaption_patch_align(*args, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend="triton")
        want = subcaption_patch_align(*args, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend="torch")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager(compiler):
    sap_checks.compiled_fullgraph_matches_eager("triton", DEVICE, compiler, rtol=1e-5, atol=1e-6)
