"""The MulCLIP model on open_clip: Long-CLIP stretch, per-token embeddings, calibration, checkpoints."""
import open_clip
import pytest
import torch

from mulclip.model import (
    FROZEN_POSITIONS, LONG_CONTEXT, MulCLIP, TokenCalibration, create_model, get_tokenizer, load_open_clip_model,
    stretch_positional_embedding,
)
from mulclip.train import create_optimizer

MODEL = "mulclip-micro"


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(MODEL)


def test_stretch_follows_method_section_1():
    pos = torch.randn(77, 5, dtype=torch.float64)
    out = stretch_positional_embedding(pos)
    assert out.shape == (248, 5) and LONG_CONTEXT == 248
    assert torch.equal(out[:20], pos[:20])
    for i in range(20, 76):
        for j in range(4):
            expected = pos[i] + j / 4 * (pos[i + 1] - pos[i])
            torch.testing.assert_close(out[20 + 4 * (i - 20) + j], expected, rtol=0, atol=1e-12)
    for j in range(4):
        torch.testing.assert_close(out[244 + j], pos[76] + j / 4 * (pos[76] - pos[75]), rtol=0, atol=1e-12)


def test_created_model_is_long_and_frozen_rows_stay_fixed(tokenizer):
    torch.manual_seed(0)
    model = create_model(MODEL)
    assert model.context_length == 248
    assert model.clip.attn_mask.shape == (248, 248)
    before = model.clip.positional_embedding.detach().clone()
    text = tokenizer(["a long caption " * 30, "short"], context_length=248)
    images = torch.randn(2, 3, 32, 32)
    optimizer = create_optimizer(model, _Args())
    for _ in range(2):
        out = model(images, text)
        loss = out["word_features"].square().sum() + out["text_features"].sum() + out["image_features"].sum()
        optimizer.zero_grad()
        loss.backward()
        assert model.clip.positional_embedding.grad[:FROZEN_POSITIONS].abs().max() == 0
        assert model.clip.positional_embedding.grad[FROZEN_POSITIONS:].abs().max() > 0
        optimizer.step()
    after = model.clip.positional_embedding.detach()
    assert torch.equal(after[:FROZEN_POSITIONS], before[:FROZEN_POSITIONS])
    assert not torch.equal(after[FROZEN_POSITIONS:], before[FROZEN_POSITIONS:])


class _Args:
    lr, wd, beta1, beta2, eps = 1e-2, 0.5, 0.9, 0.98, 1e-6


def test_text_embeddings_match_open_clip(tokenizer):
    torch.manual_seed(1)
    model = create_model(MODEL).eval()
    captions = ["A red circle at the top. A blue square in the center.", "one", "x " * 300]
    text = tokenizer(captions, context_length=248)
    pooled, tokens, mask = model.encode_text(text)
    torch.testing.assert_close(pooled, model.clip.encode_text(text), rtol=1e-4, atol=1e-5)
    eot = text.argmax(dim=-1)
    assert tokens.shape == (3, int(eot.max()) + 1, 64)
    for b in range(3):
        expected = torch.zeros(tokens.shape[1], dtype=torch.bool)
        expected[1:eot[b]] = True
        assert torch.equal(mask[b], expected)
        torch.testing.assert_close(tokens[b, eot[b]], pooled[b])
    # Cutting to the batch's longest caption changes nothing: the same captions at 77 positions.
    short = tokenizer(captions[:2], context_length=77)
    torch.testing.assert_close(model.encode_text(short)[0], pooled[:2], rtol=1e-4, atol=1e-5)


def test_image_embeddings_match_open_clip():
    torch.manual_seed(2)
    model = create_model(MODEL).eval()
    images = torch.randn(3, 3, 32, 32)
    pooled, patches = model.encode_image(images)
    assert patches.shape == (3, model.num_patches, 64) and model.num_patches == 16
    visual = model.clip.visual
    visual.output_tokens = True
    ref_pooled, ref_tokens = visual(images)
    torch.testing.assert_close(pooled, ref_pooled)
    torch.testing.assert_close(patches, ref_tokens @ visual.proj)


def test_forward_outputs_and_subcaption_mask(tokenizer):
    torch.manual_seed(3)
    model = create_model(MODEL).eval()
    subs = tokenizer(["a", "b", "c", "d"], context_length=77).view(2, 2, 77)
    sub_mask = torch.tensor([[True, False], [True, True]])
    out = model(torch.randn(2, 3, 32, 32), tokenizer(["a b. c", "d"], context_length=248),
                tokenizer(["a b.", "d"], context_length=77), subs, sub_mask)
    assert out["subcaption_features"].shape == (2, 2, 64)
    assert torch.equal(out["subcaption_features"][0, 1], torch.zeros(64))
    torch.testing.assert_close(out["subcaption_features"][1, 1], model.encode_text(subs[1, 1:])[0][0])
    torch.testing.assert_close(out["logit_scale"], model.clip.logit_scale.exp())
    assert out["patch_mask"].all() and out["patch_features"].shape == (2, 16, 64)


def test_checkpoint_loads_back_with_plain_open_clip(tmp_path, tokenizer):
    torch.manual_seed(4)
    model = create_model(MODEL).eval()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.clip.state_dict()}, path)
    plain = load_open_clip_model(MODEL, str(path)).eval()
    assert set(plain.state_dict()) == set(model.clip.state_dict())
    for key, value in model.clip.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    text = tokenizer(["a caption that is long enough " * 12], context_length=248)
    torch.testing.assert_close(plain.encode_text(text), model.encode_text(text)[0], rtol=1e-4, atol=1e-5)
    # And back into MulCLIP: a 248-row checkpoint is loaded without stretching again.
    again = create_model(MODEL, str(path))
    assert torch.equal(again.clip.positional_embedding, model.clip.positional_embedding)


def test_short_context_checkpoint_is_stretched_after_loading(tmp_path):
    torch.manual_seed(5)
    plain = open_clip.create_model(MODEL)
    path = tmp_path / "clip77.pt"
    torch.save(plain.state_dict(), path)
    model = create_model(MODEL, str(path))
    torch.testing.assert_close(model.clip.positional_embedding, stretch_positional_embedding(plain.positional_embedding))
    assert torch.equal(model.clip.visual.proj, plain.visual.proj)


def test_unknown_and_unsupported_models_raise():
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        create_model("ViT-Nope")
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        create_model(MODEL, "no-such-tag")
    with pytest.raises(ValueError, match="VisionTransformer"):
        MulCLIP(open_clip.create_model("RN50"))


def test_token_calibration_ignores_masked_tokens():
    torch.manual_seed(6)
    calibration = TokenCalibration(10, 3)
    x = torch.randn(2, 5, 10)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    out = calibration(x, mask)
    assert out.shape == (2, 3, 10)
    assert torch.equal(out[1], torch.zeros(3, 10))
    y = x.clone()
    y[0, 2] = 1e3
    torch.testing.assert_close(calibration(y, mask), out)
    # Each compressed token is a convex combination of the valid tokens.
    weights = torch.linalg.lstsq(x[0, [0, 1, 3]].T, out[0].T).solution
    torch.testing.assert_close(weights.sum(0), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_calibrated_model_outputs(tokenizer):
    torch.manual_seed(7)
    model = create_model(MODEL, calibration_tokens=3)
    out = model(torch.randn(2, 3, 32, 32), tokenizer(["a b c d", ""], context_length=248))
    assert out["word_features"].shape == (2, 4, 64) and out["patch_features"].shape == (2, 3, 64)
    assert torch.equal(out["word_mask"], torch.tensor([[True] * 4, [False, False, False, True]]))
    torch.testing.assert_close(out["word_features"][:, -1], out["text_features"])
    assert set(model.calibration_state_dict()) and all(not k.startswith("clip.") for k in model.calibration_state_dict())
