"""What a user would otherwise write: the WPR loss with F.scaled_dot_product_attention, and
torch.compile of the eager reference."""
import functools

import torch
import torch.nn.functional as F

from mulclip_kernels import reference


def _side(a, a_mask, b, b_mask, recon_temperature, contrast_temperature):
    # SDPA rebuilds each row of a from the rows of b without materialising the softmax weights;
    # the within-sample contrast still needs its (n x n) logits.
    open_mask = b_mask | ~b_mask.any(dim=-1, keepdim=True)
    recon = F.scaled_dot_product_attention(a, b, b, attn_mask=open_mask[:, None, :], scale=1.0 / recon_temperature)
    logits = F.normalize(recon, dim=-1, eps=reference.EPS) @ a.transpose(1, 2) / contrast_temperature
    logits = logits.float().masked_fill(~(a_mask | ~a_mask.any(-1, keepdim=True))[:, None, :], float("-inf"))
    B, n, _ = logits.shape
    ce = F.cross_entropy(logits.reshape(B * n, n), torch.arange(n, device=a.device).repeat(B), reduction="none")
    ce = torch.where(a_mask.reshape(-1), ce, torch.zeros_like(ce)).view(B, n)
    return ce.sum(-1) / a_mask.sum(-1).clamp_min(1)


def word_patch_reconstruction_sdpa(words, word_mask, patches, patch_mask, recon_temperature=0.05,
                                   contrast_temperature=0.07):
    """Per-sample WPR loss (B,) float32, written the way a PyTorch user would with SDPA."""
    zero = torch.zeros((), dtype=words.dtype, device=words.device)
    t = F.normalize(torch.where(word_mask[..., None], words, zero), dim=-1, eps=reference.EPS)
    v = F.normalize(torch.where(patch_mask[..., None], patches, zero), dim=-1, eps=reference.EPS)
    loss = (_side(t, word_mask, v, patch_mask, recon_temperature, contrast_temperature)
            + _side(v, patch_mask, t, word_mask, recon_temperature, contrast_temperature)) / 2
    return torch.where(word_mask.any(-1), loss, torch.zeros_like(loss))


@functools.lru_cache(maxsize=None)
def compiled_reference(op: str):
    """torch.compile (inductor) of the eager reference function of `op`, compiled once per process."""
    return torch.compile(getattr(reference, op), dynamic=False)
