"""The C++ CPU backend "cpp" of SAP (csrc/): values and gradients against the eager reference.

This is also the test of the per-row algorithm in csrc/subcaption_patch.h that the CUDA kernels
share. The first test to run builds the extension (about a minute and a half on two cores, then
cached in ~/.cache/mulclip_kernels).
"""
import pytest
import torch

from inputs import leaves, sap_inputs
from mulclip_kernels import reference, subcaption_patch_align, subcaption_patch_scores
from mulclip_kernels.dispatch import availability
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels.ops import cpp_subcaption_patch as cpp
from mulclip_kernels.testing import PARITY_ATOL, assert_parity
from test_edge_cases import tied_inputs

ok, why = availability("subcaption_patch_align", "cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(not ok, reason=f"cpp backend unavailable: {why}")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (B, M, P, d, k, all patches valid): odd P and d, k = 1, 7 and P.
CASES = [
    pytest.param((3, 5, 29, 24, 1, False), id="B3-M5-P29-d24-k1"),
    pytest.param((3, 5, 29, 24, 7, False), id="B3-M5-P29-d24-k7"),
    pytest.param((3, 5, 29, 24, 29, True), id="B3-M5-P29-d24-kP"),
    pytest.param((2, 3, 197, 24, 7, False), id="B2-M3-P197-d24-k7"),
    pytest.param((2, 3, 197, 24, 197, True), id="B2-M3-P197-d24-kP"),
    pytest.param((2, 3, 29, 768, 7, False), id="B2-M3-P29-d768-k7"),
]


def case_inputs(B, M, P, d, k, all_valid):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=B, M=M, P=P, d=d)
    if all_valid:
        patch_mask = torch.ones_like(patch_mask)
    return subcaptions, patches, subcaption_mask, patch_mask


def run_align(backend, subcaptions, patches, k, subcaption_mask, patch_mask, seed, normalize=True):
    s, p = leaves(subcaptions, patches)
    regions = subcaption_patch_align(s, p, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                     normalize=normalize, backend=backend)
    (regions * seed.to(regions.dtype)).sum().backward()
    return regions, s.grad, p.grad


def run_scores(backend, subcaptions, patches, k, patch_mask, seed, normalize=True):
    s, p = leaves(subcaptions, patches)
    scores = subcaption_patch_scores(s, p, k, patch_mask=patch_mask, normalize=normalize, backend=backend)
    (scores * seed.to(scores.dtype)).sum().backward()
    return scores, s.grad, p.grad


def check_parity(names, fused, lowp, exact, dtype):
    for name, f, l, e in zip(names, fused, lowp, exact):
        assert f.dtype == dtype, name
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_align_parity(case, dtype):
    B, M, P, d, k, all_valid = case
    subcaptions, patches, subcaption_mask, patch_mask = case_inputs(*case)
    subcaption_mask[1, :] = False  # a sample without subcaptions
    seed = torch.randn(B, M, d, dtype=torch.float64)
    exact = run_align("reference", subcaptions, patches, k, subcaption_mask, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, subcaption_mask, patch_mask, seed)
    lowp = run_align("reference", *cast)
    fused = run_align("cpp", *cast)
    check_parity(["regions", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)
    assert (fused[0][~subcaption_mask] == 0).all() and (fused[1][~subcaption_mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_scores_parity(case, dtype):
    B, M, P, d, k, all_valid = case
    subcaptions, patches, _, patch_mask = case_inputs(*case)
    subcaptions = subcaptions.reshape(B * M, d)
    seed = torch.randn(B * M, B, dtype=torch.float64)
    exact = run_scores("reference", subcaptions, patches, k, patch_mask, seed)
    cast = (subcaptions.to(dtype), patches.to(dtype), k, patch_mask, seed)
    lowp = run_scores("reference", *cast)
    fused = run_scores("cpp", *cast)
    check_parity(["scores", "grad_subcaptions", "grad_patches"], fused, lowp, exact, dtype)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_align_gradcheck(normalize):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=3, P=13, d=8)
    subcaption_mask[2] = False

    def regions(s, p):
        return subcaption_patch_align(s, p, 5, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                      normalize=normalize, backend="cpp")

    assert torch.autograd.gradcheck(regions, (subcaptions.requires_grad_(), patches.requires_grad_()))


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_scores_gradcheck(normalize):
    subcaptions, patches, _, patch_mask = sap_inputs(B=3, M=4, P=13, d=8)

    def scores(s, p):
        return subcaption_patch_scores(s, p, 5, patch_mask=patch_mask, normalize=normalize, backend="cpp")

    assert torch.autograd.gradcheck(scores, (subcaptions[0].requires_grad_(), patches.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_positions_have_no_influence(dtype):
    """NaN in masked subcaptions and patches: exactly zero regions and gradients there, nothing leaks."""
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5, P=29, d=24, dtype=dtype)
    subcaption_mask[0] = True  # the cross op takes sample 0's subcaptions, which have no mask
    subcaption_mask[1] = False
    seed = torch.randn(3, 5, 24, dtype=torch.float64)
    clean = run_align("cpp", subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    clean_scores = run_scores("cpp", subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    subcaptions, patches = subcaptions.clone(), patches.clone()
    subcaptions[~subcaption_mask] = float("nan")
    patches[~patch_mask] = float("nan")
    dirty = run_align("cpp", subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    dirty_scores = run_scores("cpp", subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    for a, b in zip(clean + clean_scores, dirty + dirty_scores):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    regions, grad_sub, grad_patches = dirty
    assert (regions[~subcaption_mask] == 0).all()
    assert (grad_sub[~subcaption_mask] == 0).all() and (grad_patches[~patch_mask] == 0).all()
    assert (grad_patches[1] == 0).all()  # sample 1 has no subcaption: its patches get nothing
    assert (dirty_scores[2][~patch_mask] == 0).all()


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(k):
    subcaptions, patches, d = tied_inputs()
    chosen = [1, 2, 4, 5, 6][:k]  # five patches tie at 0.5; the lower indices win
    regions, index, _ = cpp._OPS.align_forward(subcaptions, patches, k, torch.ones(1, 1, dtype=torch.bool),
                                               torch.ones(1, 7, dtype=torch.bool), 0.05, False)
    assert index[0, 0].tolist() == chosen
    torch.testing.assert_close(regions[0, 0], patches[0, chosen].mean(0), rtol=0, atol=1e-15)
    s, p = leaves(subcaptions, patches)
    subcaption_patch_align(s, p, k, normalize=False, backend="cpp").sum().backward()
    assert set((p.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()) <= set(chosen)
    _, cross_index, _, _ = cpp._OPS.scores_forward(subcaptions[0], patches, k, torch.ones(1, 7, dtype=torch.bool),
                                                   0.05, False)
    assert cross_index[0, 0].tolist() == chosen


@pytest.mark.parametrize("dtype, shape", [
    pytest.param(torch.float64, dict(B=2, M=4, P=16, d=12), id="float64-dot-products"),
    pytest.param(torch.float32, dict(B=2, M=4, P=16, d=12), id="float32-dot-products"),
    pytest.param(torch.float32, dict(B=2, M=8, P=67, d=512), id="float32-blas"),
])
def test_ties_between_duplicated_patches_match_the_reference_indices(dtype, shape):
    """Duplicated random patches tie exactly. Small similarity tiles come from the extension's
    own dot products, which round identical patches alike in any dtype; large ones from the BLAS,
    which MKL rounds alike in float32 (in float64 it may not, at the edge of a tile, torch's bmm
    as well)."""
    subcaptions, patches, _, patch_mask = sap_inputs(dtype=dtype, **shape)
    P = shape["P"]
    patches = patches.clone()
    patches[:, 9] = patches[:, 3]
    patches[:, P - 2] = patches[:, 3]
    all_subcaptions = torch.ones(shape["B"], shape["M"], dtype=torch.bool)
    for k in (1, 4, 8):
        _, index, _ = cpp._OPS.align_forward(subcaptions, patches, k, all_subcaptions, patch_mask, 0.05, True)
        u, v = reference.normalize(subcaptions.double()), reference.normalize(patches.double())
        sigma = u @ v.transpose(1, 2)
        sigma[..., 9] = sigma[..., P - 2] = sigma[..., 3]  # exact ties, however the bmm rounds
        sigma = sigma.masked_fill(~patch_mask[:, None], float("-inf"))
        assert torch.equal(index.long(), reference.topk_lower_index(sigma, k)), k


def test_cross_diagonal_is_paired_cosine():
    subcaptions, patches, _, patch_mask = sap_inputs(B=4, M=3, P=29, d=24)
    regions = subcaption_patch_align(subcaptions, patches, 5, patch_mask=patch_mask, backend="cpp")
    cosine = torch.nn.functional.cosine_similarity(regions, subcaptions, dim=-1, eps=1e-6)  # (B,M)
    scores = subcaption_patch_scores(subcaptions.reshape(-1, 24), patches, 5, patch_mask=patch_mask, backend="cpp")
    own = scores.reshape(4, 3, 4)[torch.arange(4), :, torch.arange(4)]
    torch.testing.assert_close(own, cosine, rtol=1e-12, atol=1e-12)


def test_fewer_valid_patches_than_k_keeps_the_valid_ones():
    """Without the host check of k (as under torch.compile) an image with fewer valid patches than
    k aggregates all of them; the free slots take no part and nothing is read out of bounds."""
    subcaptions, patches, _, _ = sap_inputs(B=2, M=3, P=17, d=10)
    patch_mask = torch.ones(2, 17, dtype=torch.bool)
    patch_mask[0, 5:] = False  # image 0: 5 valid patches, fewer than k = 8
    all_subcaptions = torch.ones(2, 3, dtype=torch.bool)
    regions, index, _ = cpp._OPS.align_forward(subcaptions, patches, 8, all_subcaptions, patch_mask, 0.05, True)
    assert (index[0, :, 5:] == -1).all() and (index[0, :, :5] >= 0).all()
    short = reference.subcaption_patch_align(subcaptions[:1], patches[:1], 5, all_subcaptions[:1], patch_mask[:1],
                                             0.05, True)
    full = reference.subcaption_patch_align(subcaptions[1:], patches[1:], 8, all_subcaptions[1:], patch_mask[1:],
                                            0.05, True)
    torch.testing.assert_close(regions, torch.cat([short, full]), rtol=1e-12, atol=1e-12)
    scores = cpp._OPS.scores_forward(subcaptions[:, 0], patches, 8, patch_mask, 0.05, True)[0]
    torch.testing.assert_close(scores[:, 0], reference.subcaption_patch_scores(
        subcaptions[:, 0], patches[:1], 5, patch_mask[:1], 0.05, True)[:, 0], rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=4, P=29, d=24)
    sub_t = subcaptions.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    patches_t = patches.transpose(1, 2).contiguous().transpose(1, 2)
    assert not sub_t.is_contiguous() and not patches_t.is_contiguous()
    seed = torch.randn(3, 4, 24, dtype=torch.float64)
    a = run_align("cpp", subcaptions, patches, 5, subcaption_mask, patch_mask, seed)
    b = run_align("cpp", sub_t, patches_t, 5, subcaption_mask, patch_mask, seed)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    out = subcaption_patch_scores(subcaptions[:, 0], patches, 5, patch_mask=patch_mask, backend="cpp")
    s, p = leaves(subcaptions[:, 0], patches_t)
    scores = subcaption_patch_scores(s, p, 5, patch_mask=patch_mask, backend="cpp")
    scores.sum().backward()  # the gradient of sum() has stride 0
    torch.testing.assert_close(scores, out, rtol=0, atol=0)
    ref = run_scores("reference", subcaptions[:, 0], patches, 5, patch_mask, torch.ones(3, 3, dtype=torch.float64))
    torch.testing.assert_close(p.grad, ref[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 8])
def test_align_saves_indices_and_similarities_only(k):
    B, M, P, d = 4, 6, 50, 16
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=B, M=M, P=P, d=d, dtype=torch.float32)
    subcaptions.requires_grad_()
    patches.requires_grad_()
    with record_saved_tensors() as saved:
        subcaption_patch_align(subcaptions, patches, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                               backend="cpp")
    inputs = (subcaptions, patches)
    assert saved.largest_numel(inputs) == max(B * M * k, B * P) < B * M * P  # index, sigma; patch_mask
    assert saved.total_bytes(inputs) == 8 * B * M * k + B * (M + P)


def test_scores_save_indices_and_statistics_only():
    N, B, P, d, k = 24, 5, 50, 16, 4
    subcaptions, patches, _, patch_mask = sap_inputs(B=B, M=N, P=P, d=d, dtype=torch.float32)
    subcaptions = subcaptions[0].detach().requires_grad_()
    patches.requires_grad_()
    with record_saved_tensors() as saved:
        subcaption_patch_scores(subcaptions, patches, k, patch_mask=patch_mask, backend="cpp")
    inputs = (subcaptions, patches)
    assert saved.largest_numel(inputs) == max(N * B * k, B * P) < N * B * P
    assert saved.total_bytes(inputs) == 12 * N * B * k + B * P  # index, sigma, rho (4 bytes each), mask


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager(compiler):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=2, M=3, P=17, d=16, dtype=torch.float32)

    def loss_fn(s, p):
        regions = subcaption_patch_align(s, p, 4, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                         backend="cpp")
        scores = subcaption_patch_scores(s[:, 0], p, 4, patch_mask=patch_mask, backend="cpp")
        return (regions * regions).sum() + scores.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    results = []
    for fn in (loss_fn, compiled):
        s, p = leaves(subcaptions, patches)
        loss = fn(s, p)
        loss.backward()
        results.append((loss, s.grad, p.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, rtol=1e-6, atol=1e-7)


def test_extension_checks_its_inputs():
    module = cpp.cuda_ext.load_cpu()
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=2, M=3, P=11, d=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="k must be between 1 and"):
        module.align_forward(subcaptions, patches, 12, subcaption_mask, patch_mask, 0.05, True)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        module.align_forward(subcaptions, patches.double(), 3, subcaption_mask, patch_mask, 0.05, True)
    with pytest.raises(RuntimeError, match="patch_mask must be bool"):
        module.scores_forward(subcaptions[0], patches, 3, patch_mask.int(), 0.05, True)
    _, index, sigma = module.align_forward(subcaptions, patches, 3, subcaption_mask, patch_mask, 0.05, True)
    with pytest.raises(RuntimeError, match="index must be Int"):
        module.align_backward(subcaptions, subcaptions, patches, index.long(), sigma, subcaption_mask, patch_mask,
                              0.05, True)
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        module.align_forward(subcaptions, patches, 3, subcaption_mask, patch_mask, 0.0, True)
