"""torch.autograd.gradcheck in float64 of the reference and the lean torch path, odd shapes, masks."""
import pytest
import torch

from inputs import sap_inputs, wpr_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores, word_patch_reconstruction_loss

BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_word_patch_reconstruction_gradcheck(backend, normalize):
    words, word_mask, patches, patch_mask = wpr_inputs(B=3, K=13, P=29, d=24)
    word_mask[1] = False  # a sample without words
    word_mask[2] = False
    word_mask[2, 4] = True  # a sample with a single word

    def loss(w, p):
        return word_patch_reconstruction_loss(w, word_mask, p, patch_mask, normalize=normalize, backend=backend,
                                              reduction="none")

    assert torch.autograd.gradcheck(loss, (words.requires_grad_(), patches.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_subcaption_patch_align_gradcheck(backend, normalize):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=3, M=5, P=29, d=24)
    subcaption_mask[2] = False

    def regions(s, p):
        return subcaption_patch_align(s, p, 7, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                      normalize=normalize, backend=backend)

    assert torch.autograd.gradcheck(regions, (subcaptions.requires_grad_(), patches.requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_subcaption_patch_scores_gradcheck(backend):
    subcaptions, patches, _, patch_mask = sap_inputs(B=3, M=5, P=29, d=24)

    def scores(s, p):
        return subcaption_patch_scores(s, p, 7, patch_mask=patch_mask, backend=backend)

    assert torch.autograd.gradcheck(scores, (subcaptions[0].requires_grad_(), patches.requires_grad_()))
