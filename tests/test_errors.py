"""Every bad input raises the documented error, naming the argument."""
import pytest
import torch

from inputs import sap_inputs, wpr_inputs
from mulclip_kernels import (clip_loss, subcaption_alignment_loss, subcaption_patch_align, subcaption_patch_scores,
                             word_patch_reconstruction_loss)


def wpr(**override):
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=5, P=7, d=8, dtype=torch.float32)
    args = dict(words=words, word_mask=word_mask, patches=patches, patch_mask=patch_mask)
    args.update(override)
    return word_patch_reconstruction_loss(args.pop("words"), args.pop("word_mask"), args.pop("patches"), **args)


def align(**override):
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=2, M=3, P=7, d=8, dtype=torch.float32)
    args = dict(subcaptions=subcaptions, patches=patches, k=2, subcaption_mask=subcaption_mask, patch_mask=patch_mask)
    args.update(override)
    return subcaption_patch_align(args.pop("subcaptions"), args.pop("patches"), args.pop("k"), **args)


def scores(**override):
    subcaptions, patches, _, patch_mask = sap_inputs(B=2, M=3, P=7, d=8, dtype=torch.float32)
    args = dict(subcaptions=subcaptions[0], patches=patches, k=2, patch_mask=patch_mask)
    args.update(override)
    return subcaption_patch_scores(args.pop("subcaptions"), args.pop("patches"), args.pop("k"), **args)


F32 = torch.float32
CASES = [
    # (callable, override, error type, words that the message must contain)
    (wpr, dict(words=torch.randn(5, 8)), ValueError, ["words", "(B, K, d)"]),
    (wpr, dict(patches=torch.randn(2, 7, 9)), ValueError, ["patches", "width"]),
    (wpr, dict(patches=torch.randn(3, 7, 8)), ValueError, ["patches", "batch"]),
    (wpr, dict(words=torch.zeros(2, 5, 8, dtype=torch.int64)), TypeError, ["words", "floating"]),
    (wpr, dict(words=[[0.0]]), TypeError, ["words", "torch.Tensor"]),
    (wpr, dict(patches=torch.randn(2, 7, 8, dtype=torch.float64)), TypeError, ["patches", "dtype"]),
    (wpr, dict(word_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, ["word_mask", "(B, K)"]),
    (wpr, dict(word_mask=torch.ones(2, 5)), TypeError, ["word_mask", "torch.bool"]),
    (wpr, dict(patch_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, ["patch_mask", "(B, P)"]),
    (wpr, dict(patch_mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, ["patch_mask", "no valid patch"]),
    (wpr, dict(words=torch.randn(0, 5, 8), word_mask=torch.ones(0, 5, dtype=torch.bool)), ValueError, ["empty"]),
    (wpr, dict(recon_temperature=0.0), ValueError, ["recon_temperature"]),
    (wpr, dict(contrast_temperature=float("nan")), ValueError, ["contrast_temperature"]),
    (wpr, dict(reduction="max"), ValueError, ["reduction"]),
    (wpr, dict(backend="nope"), ValueError, ["backend", "reference", "torch"]),
    (align, dict(k=0), ValueError, ["k", ">= 1"]),
    (align, dict(k=8), ValueError, ["k=8", "P=7"]),
    (align, dict(k=2.0), TypeError, ["k", "int"]),
    (align, dict(patch_mask=torch.tensor([[True] * 7, [True] + [False] * 6])), ValueError, ["k=2", "image 1"]),
    (align, dict(subcaption_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["subcaption_mask"]),
    (align, dict(subcaptions=torch.randn(2, 3)), ValueError, ["subcaptions", "(B, M, d)"]),
    (align, dict(temperature=-1.0), ValueError, ["temperature"]),
    (scores, dict(subcaptions=torch.randn(2, 3, 8)), ValueError, ["subcaptions", "(N, d)"]),
    (scores, dict(subcaptions=torch.randn(4, 9)), ValueError, ["width"]),
    (scores, dict(k=99), ValueError, ["k=99"]),
    (scores, dict(patch_mask=torch.tensor([[True] * 7, [True] + [False] * 6])), ValueError, ["image 1"]),
]


@pytest.mark.parametrize("call, override, error, words", CASES, ids=lambda x: getattr(x, "__name__", None))
def test_bad_input_raises(call, override, error, words):
    with pytest.raises(error) as info:
        call(**override)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_k_check_ignores_images_without_subcaptions():
    """An image whose subcaptions are all masked may have fewer valid patches than k."""
    patch_mask = torch.tensor([[True] * 7, [True] + [False] * 6])
    subcaption_mask = torch.tensor([[True] * 3, [False] * 3])
    regions = align(patch_mask=patch_mask, subcaption_mask=subcaption_mask)
    assert (regions[1] == 0).all()


def test_mixed_devices_are_rejected():
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=5, P=7, d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="device"):
        wpr(patches=patches.to("meta"))


def test_loss_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="text_features"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 10.0)
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=2, M=3, P=7, d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="mode"):
        subcaption_alignment_loss(subcaptions, patches, 10.0, 2, mode="pairs")

