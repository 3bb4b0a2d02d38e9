"""The MulCLIP training objective (method section 5) on the public mulclip_kernels ops."""
from dataclasses import dataclass
from typing import Dict

import torch

from mulclip_kernels import clip_loss, subcaption_alignment_loss, word_patch_reconstruction_loss

SHORT_CAPTION_WEIGHT = 0.5


@dataclass(frozen=True)
class LossConfig:
    """Weights and settings of `mulclip_loss`; `wpr_ops` / `sap_ops` name the kernel backends."""

    lambda_wpr: float = 1.0
    lambda_sap: float = 1.0
    sap_mode: str = "slot"
    topk: int = 16
    wpr_ops: str = "auto"
    sap_ops: str = "auto"
    recon_temperature: float = 0.05
    contrast_temperature: float = 0.07
    sap_temperature: float = 0.05
    gather_with_grad: bool = False


def mulclip_loss(out: Dict[str, torch.Tensor], cfg: LossConfig) -> Dict[str, torch.Tensor]:
    """`L = L_global + lambda_w L_WPR + lambda_s L_SAP` from the outputs of `MulCLIP.forward`.

    `L_global = L_batch(v_cls, t_long) + 1/2 L_batch(v_cls, t_short)` (the short term only when
    the batch has short captions). A term whose weight is 0 is not computed.

    Returns:
        dict of float32 scalars: "global_loss", "wpr_loss", "sap_loss" and their sum "loss".
    """
    scale = out["logit_scale"].float()
    gather = cfg.gather_with_grad
    image = out["image_features"]
    global_loss = clip_loss(image, out["text_features"], scale, gather_with_grad=gather)
    if "short_text_features" in out:
        global_loss = global_loss + SHORT_CAPTION_WEIGHT * clip_loss(
            image, out["short_text_features"], scale, gather_with_grad=gather
        )
    zero = torch.zeros((), dtype=global_loss.dtype, device=global_loss.device)
    wpr = zero
    if cfg.lambda_wpr:
        wpr = word_patch_reconstruction_loss(
            out["word_features"], out["word_mask"], out["patch_features"], out["patch_mask"],
            recon_temperature=cfg.recon_temperature, contrast_temperature=cfg.contrast_temperature,
            backend=cfg.wpr_ops,
        )
    sap = zero
    if cfg.lambda_sap and "subcaption_features" in out:
        sap = subcaption_alignment_loss(
            out["subcaption_features"], out["patch_features"], scale, cfg.topk,
            subcaption_mask=out["subcaption_mask"], patch_mask=out["patch_mask"], mode=cfg.sap_mode,
            temperature=cfg.sap_temperature, gather_with_grad=gather, backend=cfg.sap_ops,
        )
    loss = global_loss + cfg.lambda_wpr * wpr + cfg.lambda_sap * sap
    return {"loss": loss, "global_loss": global_loss, "wpr_loss": wpr, "sap_loss": sap}
