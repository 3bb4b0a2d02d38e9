"""Edge cases of the method: empty and single-word samples, masked subcaptions, k bounds, ties,
masked positions with no influence on any output or gradient."""
import pytest
import torch

from inputs import leaves, sap_inputs, wpr_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores, word_patch_reconstruction_loss
from mulclip_kernels.reference import normalize

BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_without_words_contributes_nothing(backend):
    words, word_mask, patches, patch_mask = wpr_inputs(B=3)
    word_mask[1] = False
    w, p = leaves(words, patches)
    per_sample = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend, reduction="none")
    assert per_sample[1] == 0
    mean = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend)
    torch.testing.assert_close(mean, (per_sample[0] + per_sample[2]) / 2)
    mean.backward()
    assert (w.grad[1] == 0).all() and (p.grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_without_any_word_gives_zero(backend):
    words, word_mask, patches, patch_mask = wpr_inputs(B=2)
    w, p = leaves(words, patches)
    loss = word_patch_reconstruction_loss(w, torch.zeros_like(word_mask), p, patch_mask, backend=backend)
    assert loss == 0
    loss.backward()
    assert (w.grad == 0).all() and (p.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_word_text_side_is_zero(backend):
    """One word: its reconstruction can only pick itself, so only the image side remains."""
    words, word_mask, patches, patch_mask = wpr_inputs(B=1, K=6, P=11)
    word_mask[:] = False
    word_mask[0, 2] = True
    loss = word_patch_reconstruction_loss(words, word_mask, patches, patch_mask, backend=backend)
    t, v = normalize(words[0, 2]), normalize(patches[0][patch_mask[0]])
    logits = (v @ t / 0.07)[None, :].expand(v.shape[0], -1)  # every patch rebuilds to q_p = t
    image_side = torch.nn.functional.cross_entropy(logits, torch.arange(v.shape[0]))
    torch.testing.assert_close(loss, image_side.to(loss.dtype) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_have_no_influence(backend):
    """NaN in masked words and patches changes nothing and gets exactly zero gradient."""
    words, word_mask, patches, patch_mask = wpr_inputs(B=3)
    clean = word_patch_reconstruction_loss(words, word_mask, patches, patch_mask, backend=backend, reduction="none")
    words, patches = words.clone(), patches.clone()
    words[~word_mask] = float("nan")
    patches[~patch_mask] = float("nan")
    w, p = leaves(words, patches)
    dirty = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend, reduction="none")
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    dirty.sum().backward()
    assert (w.grad[~word_mask] == 0).all() and (p.grad[~patch_mask] == 0).all()
    assert torch.isfinite(w.grad).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_subcaptions_give_zero_regions_and_gradients(backend):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5)
    subcaption_mask[1] = False  # every subcaption of sample 1
    subcaptions = subcaptions.clone()
    subcaptions[~subcaption_mask] = float("nan")
    patches = patches.clone()
    patches[~patch_mask] = float("nan")
    s, p = leaves(subcaptions, patches)
    regions = subcaption_patch_align(s, p, 4, subcaption_mask=subcaption_mask, patch_mask=patch_mask, backend=backend)
    assert (regions[~subcaption_mask] == 0).all()
    assert torch.isfinite(regions).all()
    regions.sum().backward()
    assert (s.grad[~subcaption_mask] == 0).all() and (p.grad[~patch_mask] == 0).all()
    assert (p.grad[1] == 0).all()  # sample 1 has no subcaption: its patches get nothing
    assert torch.isfinite(s.grad).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equal_one_picks_the_most_similar_patch(backend):
    subcaptions, patches, _, patch_mask = sap_inputs(B=2, M=3, P=17)
    regions = subcaption_patch_align(subcaptions, patches, 1, patch_mask=patch_mask, backend=backend)
    u, v = normalize(subcaptions), normalize(patches)
    sigma = (u @ v.transpose(1, 2)).masked_fill(~patch_mask[:, None], float("-inf"))
    best = v[torch.arange(2)[:, None], sigma.argmax(-1)]
    torch.testing.assert_close(regions, best)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equal_valid_patches_is_full_softmax(backend):
    subcaptions, patches, _, _ = sap_inputs(B=2, M=3, P=17)
    patch_mask = torch.ones(2, 17, dtype=torch.bool)
    patch_mask[0, 12:] = False
    patch_mask[1, :5] = False
    k = 12  # both images have exactly 12 valid patches
    regions = subcaption_patch_align(subcaptions, patches, k, patch_mask=patch_mask, backend=backend)
    u, v = normalize(subcaptions), normalize(patches)
    sigma = (u @ v.transpose(1, 2)).masked_fill(~patch_mask[:, None], float("-inf"))
    torch.testing.assert_close(regions, torch.softmax(sigma / 0.05, -1) @ v)


def tied_inputs():
    """Dyadic values so that every dot product is exact and duplicated patches tie exactly."""
    d = 8
    base = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]], dtype=torch.float64)
    # patch 1 and 4 are duplicates of patch 2's direction and value; index order 1 < 2 < 4.
    patches = torch.stack([base[3], base[2], base[2], base[4], base[2], base[0], base[1]])[None]  # (1,7,d)
    subcaptions = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 0]]], dtype=torch.float64) / 2  # (1,1,d)
    return subcaptions, patches, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_ties_go_to_the_lower_index(backend, k):
    subcaptions, patches, d = tied_inputs()
    # sigma: p0 0, p1..p2 0.5, p3 0, p4 0.5, p5 0.5, p6 0.5 -> ties everywhere; after p1,p2,p4,p5,p6 (0.5 each)
    # the order is p1, p2, p4, p5, p6, then p0, p3.
    order = [1, 2, 4, 5, 6]
    chosen = order[:k]
    regions = subcaption_patch_align(subcaptions, patches, k, normalize=False, backend=backend)
    expected = patches[0, chosen].mean(0)  # equal sigma -> equal weights
    torch.testing.assert_close(regions[0, 0], expected, rtol=0, atol=1e-15)
    # Gradient reaches only the chosen patches.
    s, p = leaves(subcaptions, patches)
    subcaption_patch_align(s, p, k, normalize=False, backend=backend).sum().backward()
    touched = (p.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert set(touched) <= set(chosen)
    scores = subcaption_patch_scores(subcaptions[0], patches, k, normalize=False, backend=backend)
    torch.testing.assert_close(scores[0, 0], (subcaptions[0, 0] * normalize(expected)).sum(), rtol=0, atol=1e-15)


def test_tie_rule_with_torch_path_on_duplicated_random_patches():
    subcaptions, patches, _, _ = sap_inputs(B=2, M=4, P=16, d=12)
    patches = patches.clone()
    patches[:, 9] = patches[:, 3]
    patches[:, 14] = patches[:, 3]
    for k in range(1, 17):
        ref = subcaption_patch_align(subcaptions, patches, k, backend="reference")
        lean = subcaption_patch_align(subcaptions, patches, k, backend="torch")
        torch.testing.assert_close(lean, ref, rtol=1e-12, atol=1e-12)
