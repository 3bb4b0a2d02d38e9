"""The C++ CPU backend "cpp" of SAP (csrc/): values and gradients against the eager reference.

This is also the test of the per-row algorithm in csrc/subcaption_patch.h that the CUDA kernels
share. The first test to run builds the extension (about a minute and a half on two cores, then
cached in ~/.cache/mulclip_kernels).
"""
import pytest
import torch

import sap_checks
from inputs import leaves, sap_inputs
from mulclip_kernels import reference, subcaption_patch_align, subcaption_patch_scores
from mulclip_kernels.dispatch import availability
from mulclip_kernels.ops import cpp_subcaption_patch as cpp
from sap_checks import CASES, case_inputs, check_parity, run_align, run_scores

ok, why = availability("subcaption_patch_align", "cpp", torch.device("cpu"))
pytestmark = pytest.mark.skipif(not ok, reason=f"cpp backend unavailable: {why}")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


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
    sap_checks.masked_positions_have_no_influence("cpp", torch.device("cpu"), dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(k):
    sap_checks.exact_ties_go_to_the_lower_index("cpp", torch.device("cpu"), cpp._OPS.align_forward,
                                                cpp._OPS.scores_forward, k, torch.float64, atol=1e-15)


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
    sap_checks.cross_diagonal_is_paired_cosine("cpp", torch.device("cpu"), rtol=1e-12, atol=1e-12,
                                               dtype=torch.float64)


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
def test_saves_indices_and_statistics_only(k):
    sap_checks.saves_indices_and_statistics_only("cpp", torch.device("cpu"), k=k)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager(compiler):
    sap_checks.compiled_fullgraph_matches_eager("cpp", torch.device("cpu"), compiler, rtol=1e-6, atol=1e-7)


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
