"""Public entry point of the word-patch reconstruction (WPR) loss, method section 3."""
from typing import Optional

import torch

from . import validation
from .dispatch import resolve

REDUCTIONS = ("mean", "sum", "none")


def word_patch_reconstruction_loss(
    words: torch.Tensor,
    word_mask: Optional[torch.Tensor],
    patches: torch.Tensor,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    recon_temperature: float = 0.05,
    contrast_temperature: float = 0.07,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Word-patch reconstruction loss of MulCLIP (WPR).

    Per sample, the calibrated words rebuild themselves from the patches through
    `softmax_over_patches(T' V'^T / recon_temperature)`, each rebuilt word is contrasted with
    the sample's own words (cross-entropy, target itself, logits over `contrast_temperature`),
    and symmetrically every patch is rebuilt from the words and contrasted with the patches.
    The sample loss is the mean of the two sides.

    Args:
        words: (B, K, d) per-token text embeddings; float16, bfloat16, float32 or float64.
        word_mask: (B, K) bool, True for the words to align (strictly between SOT and EOT);
            None means every position is a word.
        patches: (B, P, d) patch embeddings, same dtype and device as `words`.
        patch_mask: (B, P) bool, True for valid patches; None means all valid. Every sample
            with at least one word needs at least one valid patch.
        recon_temperature: tau_r of the reconstruction softmax (default 0.05).
        contrast_temperature: tau_c of the within-sample contrast (default 0.07).
        normalize: L2-normalise words and patches first (calibration, `norm` with eps 1e-6);
            False uses them as given.
        reduction: "mean" over samples with at least one valid word (0 if there is none),
            "sum" over samples, or "none" for the (B,) per-sample losses (0 where no word).
        backend: "auto" (fastest available for the device), "reference" (eager, materialises
            every (B,K,P), (B,K,K) and (B,P,P) tensor), "torch" (chunked, recomputing), or a
            fused backend when installed.

    Returns:
        A float32 scalar, float64 for float64 inputs (or (B,) for reduction="none"). Masked positions get exactly zero
        gradient. The "torch" backend saves only its inputs for backward and recomputes; the
        fused backends save O(B(K+P)) row statistics beyond the inputs.
    """
    validation.check_float_tensor("words", words, 3, "(B, K, d)")
    validation.check_float_tensor("patches", patches, 3, "(B, P, d)")
    validation.check_same_dtype_device(words=words, patches=patches)
    validation.check_batch("patches", patches, "words", words)
    validation.check_width("patches", patches, "words", words)
    B, K, _ = words.shape
    P = patches.shape[1]
    word_mask = validation.check_mask("word_mask", word_mask, (B, K), "(B, K)", words.device)
    given_patch_mask = patch_mask is not None
    patch_mask = validation.check_mask("patch_mask", patch_mask, (B, P), "(B, P)", words.device)
    recon_temperature = validation.check_temperature("recon_temperature", recon_temperature)
    contrast_temperature = validation.check_temperature("contrast_temperature", contrast_temperature)
    validation.check_choice("reduction", reduction, REDUCTIONS)
    has_word = word_mask.any(dim=-1)
    if given_patch_mask and not torch.compiler.is_compiling():  # a host read-back, skipped in compiled graphs
        orphan = has_word & ~patch_mask.any(dim=-1)
        if bool(orphan.any()):
            raise ValueError(
                f"patch_mask leaves sample {int(orphan.nonzero()[0])} with words but no valid patch; "
                "every sample with a valid word needs at least one valid patch"
            )

    impl = resolve("word_patch_reconstruction", backend, words.device)
    per_sample = impl(words, word_mask, patches, patch_mask, recon_temperature, contrast_temperature, bool(normalize))
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / has_word.sum().clamp_min(1)
