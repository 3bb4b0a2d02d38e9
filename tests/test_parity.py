"""Lean torch path against the eager reference: values and gradients, every dtype, parity rule.

Each case runs the reference in float64 (exact), the reference in the tested dtype (its own
error sets the bound) and the backend in the tested dtype; see mulclip_kernels.testing.
"""
import pytest
import torch

from inputs import leaves, sap_inputs, wpr_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores, word_patch_reconstruction_loss
from mulclip_kernels.testing import PARITY_ATOL, assert_parity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES_WPR = [
    pytest.param(dict(B=3, K=13, P=29, d=24), id="B3-K13-P29-d24"),
    pytest.param(dict(B=2, K=31, P=50, d=40), id="B2-K31-P50-d40"),
]


def run_wpr(backend, words, word_mask, patches, patch_mask, seed_grad):
    w, p = leaves(words, patches)
    loss = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend, reduction="none")
    (loss * seed_grad.to(loss.dtype)).sum().backward()
    return loss, w.grad, p.grad


@pytest.mark.parametrize("shape", SHAPES_WPR)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_word_patch_reconstruction_parity(shape, dtype):
    words, word_mask, patches, patch_mask = wpr_inputs(**shape)
    word_mask[0] = False
    word_mask[0, 3] = True  # a sample with one word
    seed_grad = torch.rand(shape["B"], dtype=torch.float64) + 0.5
    exact = run_wpr("reference", words, word_mask, patches, patch_mask, seed_grad)
    cast = [words.to(dtype), word_mask, patches.to(dtype), patch_mask]
    lowp = run_wpr("reference", *cast, seed_grad)
    fused = run_wpr("torch", *cast, seed_grad)
    for name, f, l, e in zip(["loss", "grad_words", "grad_patches"], fused, lowp, exact):
        assert f.dtype == (torch.float32 if name == "loss" else dtype)
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])


def run_align(backend, subcaptions, patches, k, subcaption_mask, patch_mask, seed_grad):
    s, p = leaves(subcaptions, patches)
    regions = subcaption_patch_align(s, p, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend=backend)
    (regions * seed_grad.to(regions.dtype)).sum().backward()
    return regions, s.grad, p.grad


@pytest.mark.parametrize("k", [1, 7, 14])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subcaption_patch_align_parity(k, dtype):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5, P=29, d=24)
    seed_grad = torch.randn(subcaptions.shape, dtype=torch.float64)
    exact = run_align("reference", subcaptions, patches, k, subcaption_mask, patch_mask, seed_grad)
    cast = [subcaptions.to(dtype), patches.to(dtype), k, subcaption_mask, patch_mask]
    lowp = run_align("reference", *cast, seed_grad)
    fused = run_align("torch", *cast, seed_grad)
    for name, f, l, e in zip(["regions", "grad_subcaptions", "grad_patches"], fused, lowp, exact):
        assert f.dtype == dtype
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])


def run_scores(backend, subcaptions, patches, k, patch_mask, seed_grad):
    s, p = leaves(subcaptions, patches)
    scores = subcaption_patch_scores(s, p, k, patch_mask=patch_mask, backend=backend)
    (scores * seed_grad.to(scores.dtype)).sum().backward()
    return scores, s.grad, p.grad


@pytest.mark.parametrize("k", [1, 7, 14])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_subcaption_patch_scores_parity(k, dtype):
    subcaptions, patches, _, patch_mask = sap_inputs(B=4, M=5, P=29, d=24)
    subcaptions = subcaptions.reshape(-1, 24)[:11]
    seed_grad = torch.randn(11, 4, dtype=torch.float64)
    exact = run_scores("reference", subcaptions, patches, k, patch_mask, seed_grad)
    cast = [subcaptions.to(dtype), patches.to(dtype), k, patch_mask]
    lowp = run_scores("reference", *cast, seed_grad)
    fused = run_scores("torch", *cast, seed_grad)
    for name, f, l, e in zip(["scores", "grad_subcaptions", "grad_patches"], fused, lowp, exact):
        assert f.dtype == dtype
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_cross_scores_diagonal_is_paired_cosine(backend):
    subcaptions, patches, _, patch_mask = sap_inputs(B=4, M=3, P=29, d=24)
    regions = subcaption_patch_align(subcaptions, patches, 5, patch_mask=patch_mask, backend=backend)
    cosine = torch.nn.functional.cosine_similarity(regions, subcaptions, dim=-1, eps=1e-6)  # (B,M)
    scores = subcaption_patch_scores(subcaptions.reshape(-1, 24), patches, 5, patch_mask=patch_mask, backend=backend)
    own = scores.reshape(4, 3, 4)[torch.arange(4), :, torch.arange(4)]  # (B,M)
    torch.testing.assert_close(own, cosine, rtol=1e-10, atol=1e-10)


def test_torch_path_chunks_agree_with_one_chunk(monkeypatch):
    """Forcing one sample (or subcaption) per chunk changes nothing."""
    words, word_mask, patches, patch_mask = wpr_inputs(B=4, K=9, P=17, d=16)
    subcaptions, _, subcaption_mask, _ = sap_inputs(B=4, M=3, P=17, d=16)
    seed = torch.rand(4, dtype=torch.float64)
    whole = run_wpr("torch", words, word_mask, patches, patch_mask, seed)
    whole_align = run_align("torch", subcaptions, patches, 3, subcaption_mask, patch_mask, torch.ones(4, 3, 16))
    whole_scores = run_scores("torch", subcaptions[0], patches, 3, patch_mask, torch.ones(3, 4))
    monkeypatch.setenv("MULCLIP_CHUNK_ELEMENTS", "1")
    chunked = run_wpr("torch", words, word_mask, patches, patch_mask, seed)
    chunked_align = run_align("torch", subcaptions, patches, 3, subcaption_mask, patch_mask, torch.ones(4, 3, 16))
    chunked_scores = run_scores("torch", subcaptions[0], patches, 3, patch_mask, torch.ones(3, 4))
    for a, b in zip(whole + whole_align + whole_scores, chunked + chunked_align + chunked_scores):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
