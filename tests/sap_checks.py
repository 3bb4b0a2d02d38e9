"""Checks every fused SAP backend ("cpp", "cuda", "triton") must pass, written once.

Each function takes the backend name and the device its tensors live on; the test modules of
the backends call them with their own tolerances (atomic adds of the patch gradients sum in any
order on the GPU paths, so only the C++ CPU path is exact run to run).
"""
import pytest
import torch

from inputs import leaves, sap_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels.testing import PARITY_ATOL, assert_parity
from test_edge_cases import tied_inputs


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
    (regions * seed.to(device=regions.device, dtype=regions.dtype)).sum().backward()
    return regions, s.grad, p.grad


def run_scores(backend, subcaptions, patches, k, patch_mask, seed, normalize=True):
    s, p = leaves(subcaptions, patches)
    scores = subcaption_patch_scores(s, p, k, patch_mask=patch_mask, normalize=normalize, backend=backend)
    (scores * seed.to(device=scores.device, dtype=scores.dtype)).sum().backward()
    return scores, s.grad, p.grad


def check_parity(names, fused, lowp, exact, dtype):
    for name, f, l, e in zip(names, fused, lowp, exact):
        assert f.dtype == dtype, name
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def masked_positions_have_no_influence(backend, device, dtype, grad_rtol=0.0, grad_atol=0.0):
    """NaN in masked subcaptions and patches: the outputs are those of clean inputs, exactly, and
    the gradients within the given tolerance; exact zeros at every masked place."""
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5, P=29, d=24, dtype=dtype)
    subcaption_mask[0] = True  # the cross op takes sample 0's subcaptions, which have no mask
    subcaption_mask[1] = False
    subcaptions, patches, subcaption_mask, patch_mask = to(device, subcaptions, patches, subcaption_mask, patch_mask)
    seed = torch.randn(3, 5, 24, dtype=torch.float64)
    clean = run_align(backend, subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    clean_scores = run_scores(backend, subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    subcaptions, patches = subcaptions.clone(), patches.clone()
    subcaptions[~subcaption_mask] = float("nan")
    patches[~patch_mask] = float("nan")
    dirty = run_align(backend, subcaptions, patches, 6, subcaption_mask, patch_mask, seed)
    dirty_scores = run_scores(backend, subcaptions[0], patches, 6, patch_mask, seed[0, :, :3])
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty_scores[0], clean_scores[0], rtol=0, atol=0)
    for a, b in zip(clean[1:] + clean_scores[1:], dirty[1:] + dirty_scores[1:]):
        torch.testing.assert_close(b, a, rtol=grad_rtol, atol=grad_atol)
    regions, grad_sub, grad_patches = dirty
    assert (regions[~subcaption_mask] == 0).all()
    assert (grad_sub[~subcaption_mask] == 0).all() and (grad_patches[~patch_mask] == 0).all()
    assert (grad_patches[1] == 0).all()  # sample 1 has no subcaption: its patches get nothing
    assert (dirty_scores[2][~patch_mask] == 0).all()


def exact_ties_go_to_the_lower_index(backend, device, align_forward, scores_forward, k, dtype, atol):
    """Five patches tie exactly; the k lower indices win, in the paired and the cross forward op
    (`align_forward` / `scores_forward`: the backend's ops, returning indices second)."""
    subcaptions, patches, _ = tied_inputs()
    subcaptions, patches = to(device, subcaptions.to(dtype), patches.to(dtype))
    chosen = [1, 2, 4, 5, 6][:k]
    one, seven = torch.ones(1, 1, dtype=torch.bool, device=device), torch.ones(1, 7, dtype=torch.bool, device=device)
    regions, index, _ = align_forward(subcaptions, patches, k, one, seven, 0.05, False)
    assert index[0, 0].tolist() == chosen
    torch.testing.assert_close(regions[0, 0], patches[0, chosen].mean(0), rtol=0, atol=atol)
    s, p = leaves(subcaptions, patches)
    subcaption_patch_align(s, p, k, normalize=False, backend=backend).sum().backward()
    assert set((p.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()) <= set(chosen)
    cross_index = scores_forward(subcaptions[0], patches, k, seven, 0.05, False)[1]
    assert cross_index[0, 0].tolist() == chosen


def cross_diagonal_is_paired_cosine(backend, device, rtol, atol, dtype=torch.float32):
    subcaptions, patches, _, patch_mask = to(device, *sap_inputs(B=4, M=3, P=29, d=24, dtype=dtype))
    regions = subcaption_patch_align(subcaptions, patches, 5, patch_mask=patch_mask, backend=backend)
    cosine = torch.nn.functional.cosine_similarity(regions, subcaptions, dim=-1, eps=1e-6)  # (B,M)
    scores = subcaption_patch_scores(subcaptions.reshape(-1, 24), patches, 5, patch_mask=patch_mask, backend=backend)
    own = scores.reshape(4, 3, 4)[torch.arange(4), :, torch.arange(4)]
    torch.testing.assert_close(own, cosine, rtol=rtol, atol=atol)


def saves_indices_and_statistics_only(backend, device, B=4, M=6, P=50, d=16, k=8):
    """Beyond the inputs: int32 indices and fp32 sigma (cross: and rho) of the chosen patches,
    and the masks; never anything of B M P or N B P elements."""
    subcaptions, patches, subcaption_mask, patch_mask = to(device, *sap_inputs(B=B, M=M, P=P, d=d,
                                                                              dtype=torch.float32))
    s, p = leaves(subcaptions, patches)
    with record_saved_tensors() as saved:
        subcaption_patch_align(s, p, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend=backend)
    assert saved.largest_numel((s, p)) == max(B * M * k, B * P) < B * M * P
    assert saved.total_bytes((s, p)) == 8 * B * M * k + B * (M + P)
    rows = s[0].detach().requires_grad_()
    with record_saved_tensors() as saved:
        subcaption_patch_scores(rows, p, k, patch_mask=patch_mask, backend=backend)
    assert saved.largest_numel((rows, p)) == max(M * B * k, B * P) < M * B * P
    assert saved.total_bytes((rows, p)) == 12 * M * B * k + B * P


def compiled_fullgraph_matches_eager(backend, device, compiler, rtol, atol):
    """torch.compile(fullgraph=True) of a loss using both ops: same loss and gradients as eager."""
    subcaptions, patches, subcaption_mask, patch_mask = to(device, *sap_inputs(B=2, M=3, P=17, d=16,
                                                                              dtype=torch.float32))

    def loss_fn(s, p):
        regions = subcaption_patch_align(s, p, 4, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                         backend=backend)
        scores = subcaption_patch_scores(s[:, 0], p, 4, patch_mask=patch_mask, backend=backend)
        return (regions * regions).sum() + scores.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    results = []
    for fn in (loss_fn, compiled):
        s, p = leaves(subcaptions, patches)
        loss = fn(s, p)
        loss.backward()
        results.append((loss, s.grad, p.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, rtol=rtol, atol=atol)
