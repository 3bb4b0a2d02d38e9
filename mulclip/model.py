"""MulCLIP on open_clip (method section 1 and 2): long-text positions, per-token embeddings, calibration.

`create_model(name, pretrained)` builds any open_clip ViT CLIP (or a config registered here, such
as "mulclip-tiny"), loads its weights, stretches the text positional embedding from 77 to 248
rows the Long-CLIP way and wraps it in `MulCLIP`, whose forward returns every embedding the
MulCLIP losses need. The wrapped open_clip model keeps its own state-dict keys, so
`save_open_clip_weights` writes a file that `open_clip.create_model(name, pretrained=file,
force_context_length=248)` loads back unchanged.
"""
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import open_clip
import torch
import torch.nn as nn
from open_clip.factory import load_state_dict as _load_open_clip_state_dict
from open_clip.transformer import VisionTransformer

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

FROZEN_POSITIONS = 20  # Long-CLIP keeps the first 20 rows, which carry most of CLIP's short-text skill
STRETCH = 4  # every later row becomes 4 interpolated rows
SHORT_CONTEXT = 77


def long_context_length(context_length: int = SHORT_CONTEXT, keep: int = FROZEN_POSITIONS) -> int:
    """Rows after the Long-CLIP stretch: `keep + 4 (n - keep)`, 248 for CLIP's 77."""
    return keep + STRETCH * (context_length - keep)


LONG_CONTEXT = long_context_length()


def stretch_positional_embedding(pos: torch.Tensor, keep: int = FROZEN_POSITIONS) -> torch.Tensor:
    """Long-CLIP knowledge-preserving stretch of a (n, w) positional embedding to (keep + 4(n-keep), w).

    Rows `0..keep-1` are kept; each row `i = keep..n-2` becomes `p_i + j/4 (p_{i+1} - p_i)`,
    j = 0..3; the last row extrapolates: `p_{n-1} + j/4 (p_{n-1} - p_{n-2})`.
    """
    n, width = pos.shape
    if not 2 < keep + 1 < n:
        raise ValueError(f"cannot stretch a positional embedding of {n} rows keeping {keep}")
    frac = torch.arange(STRETCH, dtype=pos.dtype, device=pos.device)[None, :, None] / STRETCH
    rows = pos[keep:n - 1, None, :] + frac * (pos[keep + 1:n, None, :] - pos[keep:n - 1, None, :])
    last = pos[n - 1] + frac[0] * (pos[n - 1] - pos[n - 2])
    return torch.cat([pos[:keep], rows.reshape(-1, width), last])


def causal_mask(context_length: int) -> torch.Tensor:
    """open_clip's additive causal attention mask: -inf above the diagonal."""
    return torch.full((context_length, context_length), float("-inf")).triu_(1)


def _zero_frozen_rows(grad: torch.Tensor, keep: int = FROZEN_POSITIONS) -> torch.Tensor:
    grad = grad.clone()
    grad[:keep] = 0
    return grad


class TokenCalibration(nn.Module):
    """Learned token compression of method section 2: n tokens -> `num_tokens` weighted sums.

    `W = softmax_over_n(s * MLP(LN(X)))`, MLP = Linear(d, d/5), GELU, Linear(d/5, N_s), masked
    tokens at -inf before the softmax, output `W^T X` (N_s, d). A sample with no valid token
    gets zero weights (hence zero tokens) instead of NaN.
    """

    def __init__(self, width: int, num_tokens: int):
        super().__init__()
        hidden = max(1, width // 5)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, num_tokens))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, n, d), mask (B, n) bool -> (B, N_s, d)."""
        logits = self.scale * self.mlp(self.norm(tokens)).float()
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=1)
        weights = torch.where(mask.any(dim=1)[:, None, None], weights, torch.zeros_like(weights))
        return weights.transpose(1, 2).to(tokens.dtype) @ tokens


class MulCLIP(nn.Module):
    """An open_clip CLIP with the per-token outputs of MulCLIP (method section 1).

    `self.clip` is the open_clip model itself (positional embedding already stretched); the
    optional calibration modules live beside it, so `self.clip.state_dict()` has open_clip's keys.
    Text is cut to the longest sequence of the batch before encoding: with the causal mask a
    position never attends to later ones, so the cut changes no output at the kept positions.
    """

    def __init__(self, clip: nn.Module, calibration_tokens: int = 0, freeze_positions: int = FROZEN_POSITIONS):
        super().__init__()
        _check_supported(clip)
        self.clip = clip
        self.calibration_tokens = calibration_tokens
        width = clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor) else clip.text_projection.out_features
        if calibration_tokens > 0:
            self.image_calibration = TokenCalibration(width, calibration_tokens)
            self.text_calibration = TokenCalibration(width, calibration_tokens)
        else:
            self.image_calibration = self.text_calibration = None
        if freeze_positions > 0:
            # Zeroing the gradient keeps these rows fixed under AdamW only because the optimizer
            # also exempts positional_embedding from weight decay (see mulclip.train).
            clip.positional_embedding.register_hook(lambda g: _zero_frozen_rows(g, freeze_positions))

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def num_patches(self) -> int:
        grid = self.clip.visual.grid_size
        return grid[0] * grid[1]

    def calibration_state_dict(self) -> Dict[str, torch.Tensor]:
        """Weights of the calibration modules (empty without them)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def encode_image(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pooled `v_cls` (B, d) and patch embeddings `V = ln_post(patch_tokens) @ proj` (B, P, d)."""
        visual = self.clip.visual
        x = visual._embeds(images)
        x = visual.transformer(x)
        pooled, tokens = visual._pool(x)
        if visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        return pooled @ visual.proj, tokens @ visual.proj

    def encode_text(self, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled (EOT) embedding (B, d), per-token embeddings (B, K, d) and word mask (B, K).

        K is the longest sequence of the batch (SOT to EOT), at most the context length; the
        word mask keeps the positions strictly between SOT and EOT.
        """
        clip = self.clip
        if text.shape[1] > clip.context_length:
            raise ValueError(f"text has {text.shape[1]} positions, the model takes {clip.context_length}")
        eot = text.argmax(dim=-1)
        length = int(eot.max()) + 1
        text = text[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        tokens = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        positions = torch.arange(length, device=text.device)
        word_mask = (positions[None, :] > 0) & (positions[None, :] < eot[:, None])
        pooled = tokens[torch.arange(text.shape[0], device=text.device), eot]
        return pooled, tokens, word_mask

    def calibrate_words(self, tokens: torch.Tensor, word_mask: torch.Tensor, pooled: torch.Tensor):
        """Compress the words to N_s tokens and append the EOT embedding (method section 2).

        The appended EOT token counts as a valid token of the calibrated set (ours); the N_s
        compressed tokens are valid when the caption has at least one word.
        """
        compressed = self.text_calibration(tokens, word_mask)
        has_word = word_mask.any(dim=1, keepdim=True).expand(-1, self.calibration_tokens)
        mask = torch.cat([has_word, torch.ones_like(has_word[:, :1])], dim=1)
        return torch.cat([compressed, pooled[:, None]], dim=1), mask

    def forward(
        self,
        images: torch.Tensor,
        long_text: torch.Tensor,
        short_text: Optional[torch.Tensor] = None,
        subcaption_text: Optional[torch.Tensor] = None,
        subcaption_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Every embedding of a MulCLIP step.

        Args:
            images: (B, 3, H, W). long_text: (B, <=248) token ids of the long captions.
            short_text: (B, L) token ids of the short captions (first sentences), or None.
            subcaption_text: (B, M, L) token ids of the subcaptions, with subcaption_mask (B, M)
                bool marking the real ones; only those are encoded.

        Returns:
            dict with image_features (B,d), patch_features (B,P,d) and patch_mask (B,P),
            text_features (B,d) of the long captions, word_features (B,K,d) and word_mask (B,K)
            (the calibrated tokens when calibration is on), short_text_features (B,d),
            subcaption_features (B,M,d) (zero where masked), subcaption_mask, and logit_scale
            (the multiplier, `exp` of the parameter).
        """
        image_features, patches = self.encode_image(images)
        patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        text_features, words, word_mask = self.encode_text(long_text)
        if self.calibration_tokens > 0:
            words, word_mask = self.calibrate_words(words, word_mask, text_features)
            patches = self.image_calibration(patches, patch_mask)
            patch_mask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
        out = {
            "image_features": image_features,
            "patch_features": patches,
            "patch_mask": patch_mask,
            "text_features": text_features,
            "word_features": words,
            "word_mask": word_mask,
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if short_text is not None:
            out["short_text_features"] = self.encode_text(short_text)[0]
        if subcaption_text is not None:
            B, M, _ = subcaption_text.shape
            if subcaption_mask is None:
                subcaption_mask = torch.ones((B, M), dtype=torch.bool, device=subcaption_text.device)
            subs = torch.zeros((B, M, text_features.shape[-1]), dtype=text_features.dtype, device=text_features.device)
            if bool(subcaption_mask.any()):
                subs = subs.index_put((subcaption_mask,), self.encode_text(subcaption_text[subcaption_mask])[0].to(subs.dtype))
            out["subcaption_features"] = subs
            out["subcaption_mask"] = subcaption_mask
        return out


def _check_supported(clip: nn.Module) -> None:
    if not isinstance(clip, open_clip.CLIP):
        raise ValueError(
            f"MulCLIP needs an open_clip CLIP with the built-in text tower, got {type(clip).__name__} "
            "(CustomTextCLIP / CoCa / Hugging Face text towers are not supported)"
        )
    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"MulCLIP needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.proj is None:
        raise ValueError("MulCLIP needs a ViT with class-token pooling and a projection (no attentional pooler)")
    if clip.text_pool_type != "argmax" or clip.attn_mask is None:
        raise ValueError("MulCLIP needs CLIP's causal text tower pooled at the EOT token (argmax)")


def stretch_text_positions(clip: nn.Module, keep: int = FROZEN_POSITIONS) -> None:
    """Stretch `clip.positional_embedding` in place (Long-CLIP) and resize the causal mask."""
    with torch.no_grad():
        stretched = stretch_positional_embedding(clip.positional_embedding.detach(), keep)
    clip.positional_embedding = nn.Parameter(stretched)
    clip.context_length = stretched.shape[0]
    clip.attn_mask = causal_mask(stretched.shape[0]).to(clip.positional_embedding.device)


def _checkpoint_context_length(path: str) -> int:
    state_dict = _load_open_clip_state_dict(path, weights_only=True)
    pos = state_dict.get("positional_embedding")
    if pos is None:
        raise ValueError(f"{path} has no 'positional_embedding': not an open_clip CLIP checkpoint")
    return pos.shape[0]


def create_model(
    model_name: str,
    pretrained: Optional[str] = None,
    *,
    calibration_tokens: int = 0,
    freeze_positions: int = FROZEN_POSITIONS,
    device="cpu",
    precision: str = "fp32",
) -> MulCLIP:
    """Build a MulCLIP model from an open_clip architecture name and optional weights.

    Args:
        model_name: an open_clip model name ("ViT-B-16", ...) or one registered by this package
            ("mulclip-tiny", "mulclip-micro").
        pretrained: an open_clip pretrained tag (downloaded by open_clip), or a local checkpoint
            file: an open_clip/OpenAI CLIP state dict with 77 positions (stretched after loading)
            or a MulCLIP checkpoint with 248 (loaded as is). None: random initialisation.
        calibration_tokens: N_s of the token calibration module; 0 (default) disables it.
        freeze_positions: leading positional rows whose gradient is zeroed (Long-CLIP: 20).
        device, precision: as open_clip's create_model ("fp32", "fp16", "bf16", ...).
    """
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown model {model_name!r}; open_clip knows: {', '.join(open_clip.list_models())}")
    native = open_clip.get_model_config(model_name)["text_cfg"].get("context_length", SHORT_CONTEXT)
    stored = None
    if pretrained and os.path.isfile(pretrained):
        stored = _checkpoint_context_length(pretrained)
        if stored not in (native, long_context_length(native)):
            raise ValueError(f"{pretrained} has {stored} text positions; expected {native} or {long_context_length(native)}")
    elif pretrained and not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"--pretrained {pretrained!r} is neither a file nor a pretrained tag of {model_name} (tags: {tags})")

    if stored is not None and stored != native:
        # Already stretched: build the long model first so open_clip loads the rows unchanged.
        clip = open_clip.create_model(model_name, pretrained=None, precision=precision, device="cpu")
        stretch_text_positions(clip)
        open_clip.load_checkpoint(clip, pretrained, strict=True, weights_only=True)
    else:
        clip = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device="cpu")
        stretch_text_positions(clip)
    if pretrained is None:
        logging.info("model %s initialised randomly", model_name)
    model = MulCLIP(clip, calibration_tokens=calibration_tokens, freeze_positions=freeze_positions)
    return model.to(device)


def load_open_clip_model(model_name: str, path: str, device="cpu") -> nn.Module:
    """Load a MulCLIP checkpoint with plain open_clip (no mulclip code in the forward pass)."""
    return open_clip.create_model(model_name, pretrained=path, force_context_length=LONG_CONTEXT, device=device)


def get_tokenizer(model_name: str):
    """open_clip's tokenizer of `model_name` (its BPE vocabulary ships with open_clip: no download)."""
    return open_clip.get_tokenizer(model_name)


def image_transform(model: MulCLIP):
    """open_clip's evaluation transform for the model (resize, centre crop, normalise)."""
    cfg = open_clip.get_model_preprocess_cfg(model.clip)
    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )


