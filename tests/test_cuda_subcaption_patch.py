"""The CUDA backend "cuda" of SAP against the eager reference, on a GPU (skipped without one).

The same cases as tests/test_cpp_subcaption_patch.py (whose CPU build of the shared header is
what runs where no GPU is), k capped at the kernels' 64, plus the paper's shapes. The first test
builds the CUDA module for the visible GPU (cached in ~/.cache/mulclip_kernels).
"""
import pytest
import torch

from inputs import leaves, sap_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores
from mulclip_kernels.dispatch import availability
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels.ops import cpp_subcaption_patch as cpp
from mulclip_kernels.ops import cuda_subcaption_patch as cuda
from test_cpp_subcaption_patch import CASES, case_inputs, check_parity, run_align, run_scores
from test_edge_cases import tied_inputs

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
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(B=3, M=5, P=29, d=24,
                                                                              dtype=torch.bfloat16))
    subcaption_mask[0] = True
    subcaption_mask[1] = False
    seed = torch.randn(3, 5, 24, dtype=torch.float64, device=DEVICE)
    clean = run_align("cuda", subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    clean_scores = run_scores("cuda", subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    subcaptions, patches = subcaptions.clone(), patches.clone()
    subcaptions[~subcaption_mask] = float("nan")
    patches[~patch_mask] = float("nan")
    dirty = run_align("cuda", subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    dirty_scores = run_scores("cuda", subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    # Atomics add in any order, so gradients may differ by rounding; values may not.
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty_scores[0], clean_scores[0], rtol=0, atol=0)
    for a, b in zip(clean[1:] + clean_scores[1:], dirty[1:] + dirty_scores[1:]):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3)
    regions, grad_sub, grad_patches = dirty
    assert (regions[~subcaption_mask] == 0).all()
    assert (grad_sub[~subcaption_mask] == 0).all() and (grad_patches[~patch_mask] == 0).all()
    assert (grad_patches[1] == 0).all()
    assert (dirty_scores[2][~patch_mask] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(k):
    subcaptions, patches, _ = tied_inputs()
    subcaptions, patches = on_device(subcaptions.float(), patches.float())
    chosen = [1, 2, 4, 5, 6][:k]
    everything = torch.ones(1, 1, dtype=torch.bool, device=DEVICE), torch.ones(1, 7, dtype=torch.bool, device=DEVICE)
    regions, index, _ = cuda._OPS.align_forward(subcaptions, patches, k, *everything, 0.05, False)
    assert index[0, 0].tolist() == chosen
    torch.testing.assert_close(regions[0, 0], patches[0, chosen].mean(0), rtol=0, atol=1e-7)
    _, cross_index, _, _ = cuda._OPS.scores_forward(subcaptions[0], patches, k, everything[1], 0.05, False)
    assert cross_index[0, 0].tolist() == chosen


def test_cross_diagonal_is_paired_cosine():
    subcaptions, patches, _, patch_mask = on_device(*sap_inputs(B=4, M=3, P=29, d=24, dtype=torch.float32))
    regions = subcaption_patch_align(subcaptions, patches, 5, patch_mask=patch_mask, backend="cuda")
    cosine = torch.nn.functional.cosine_similarity(regions, subcaptions, dim=-1, eps=1e-6)
    scores = subcaption_patch_scores(subcaptions.reshape(-1, 24), patches, 5, patch_mask=patch_mask, backend="cuda")
    own = scores.reshape(4, 3, 4)[torch.arange(4), :, torch.arange(4)]
    torch.testing.assert_close(own, cosine, rtol=1e-5, atol=1e-6)


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
    B, M, P, d, k = 4, 6, 50, 16, 8
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(B=B, M=M, P=P, d=d,
                                                                              dtype=torch.float32))
    s, p = leaves(subcaptions, patches)
    with record_saved_tensors() as saved:
        subcaption_patch_align(s, p, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend="cuda")
    assert saved.total_bytes((s, p)) == 8 * B * M * k + B * (M + P)
    with record_saved_tensors() as saved:
        subcaption_patch_scores(s[0], p, k, patch_mask=patch_mask, backend="cuda")
    assert saved.total_bytes((s, p)) == 12 * M * B * k + B * P


def test_limits_raise_clear_errors():
    subcaptions, patches = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 80, 8, device=DEVICE)
    with pytest.raises(ValueError, match="k <= 64"):
        subcaption_patch_align(subcaptions, patches, 65, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        subcaption_patch_scores(subcaptions[0].double(), patches.double(), 4, backend="cuda")


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager(compiler):
    subcaptions, patches, subcaption_mask, patch_mask = on_device(*sap_inputs(B=2, M=3, P=17, d=16,
                                                                              dtype=torch.float32))

    def loss_fn(s, p):
        regions = subcaption_patch_align(s, p, 4, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                         backend="cuda")
        scores = subcaption_patch_scores(s[:, 0], p, 4, patch_mask=patch_mask, backend="cuda")
        return (regions * regions).sum() + scores.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    results = []
    for fn in (loss_fn, compiled):
        s, p = leaves(subcaptions, patches)
        loss = fn(s, p)
        loss.backward()
        results.append((loss, s.grad, p.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-6)

