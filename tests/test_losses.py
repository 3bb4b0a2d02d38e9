"""The batch losses of method section 5."""
import pytest
import torch
import torch.nn.functional as F

from inputs import sap_inputs
from mulclip_kernels import clip_loss, subcaption_alignment_loss, subcaption_patch_align
from mulclip_kernels.reference import normalize


def symmetric_clip(x, y, scale):
    logits = scale * normalize(x) @ normalize(y).t()
    labels = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def test_clip_loss_is_symmetric_infonce():
    x, y = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(clip_loss(x, y, 14.0), symmetric_clip(x, y, 14.0))


def test_clip_loss_learnable_scale_gets_gradient():
    x, y = torch.randn(6, 10), torch.randn(6, 10)
    scale = torch.tensor(2.0, requires_grad=True)
    clip_loss(x, y, scale.exp()).backward()
    assert scale.grad is not None and scale.grad != 0


def test_slot_mode_restricts_each_slot_and_skips_small_slots():
    subcaptions, patches, _, patch_mask = sap_inputs(B=4, M=3, P=29, d=24)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # slot 2 has 1 sample
    loss = subcaption_alignment_loss(subcaptions, patches, 10.0, 5, subcaption_mask=mask, patch_mask=patch_mask)
    regions = subcaption_patch_align(subcaptions, patches, 5, subcaption_mask=mask, patch_mask=patch_mask)
    expected = sum(
        symmetric_clip(regions[mask[:, i], i], subcaptions[mask[:, i], i], 10.0) for i in range(2)
    ) / 3
    torch.testing.assert_close(loss, expected)


def test_all_mode_is_one_contrast_of_valid_pairs():
    subcaptions, patches, mask, patch_mask = sap_inputs(B=3, M=4, P=29, d=24)
    loss = subcaption_alignment_loss(subcaptions, patches, 10.0, 5, subcaption_mask=mask, patch_mask=patch_mask,
                                     mode="all")
    regions = subcaption_patch_align(subcaptions, patches, 5, subcaption_mask=mask, patch_mask=patch_mask)
    torch.testing.assert_close(loss, symmetric_clip(regions[mask], subcaptions[mask], 10.0))


def test_cross_mode_targets_the_own_image():
    from mulclip_kernels import subcaption_patch_scores
    subcaptions, patches, mask, patch_mask = sap_inputs(B=3, M=4, P=29, d=24)
    loss = subcaption_alignment_loss(subcaptions, patches, 10.0, 5, subcaption_mask=mask, patch_mask=patch_mask,
                                     mode="cross")
    scores = subcaption_patch_scores(subcaptions[mask], patches, 5, patch_mask=patch_mask)
    targets = torch.arange(3)[:, None].expand(3, 4)[mask]
    torch.testing.assert_close(loss, F.cross_entropy(10.0 * scores, targets))


@pytest.mark.parametrize("mode", ["slot", "all", "cross"])
def test_modes_agree_across_backends_and_masked_subcaptions_get_no_gradient(mode):
    subcaptions, patches, mask, patch_mask = sap_inputs(B=3, M=4, P=29, d=24)
    results = []
    for backend in ["reference", "torch"]:
        s, p = subcaptions.clone().requires_grad_(), patches.clone().requires_grad_()
        loss = subcaption_alignment_loss(s, p, 10.0, 5, subcaption_mask=mask, patch_mask=patch_mask, mode=mode,
                                         backend=backend)
        loss.backward()
        assert (s.grad[~mask] == 0).all()
        results.append((loss, s.grad, p.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
