"""Inputs for the op tests: odd shapes, random masks, float64 masters cast to the tested dtype."""
import torch


def make_mask(rows: int, cols: int, keep: float, generator=None) -> torch.Tensor:
    mask = torch.rand(rows, cols, generator=generator) < keep
    mask[:, 0] = True
    return mask


def wpr_inputs(B=3, K=13, P=29, d=24, dtype=torch.float64, masks=True):
    words = torch.randn(B, K, d, dtype=torch.float64)
    patches = torch.randn(B, P, d, dtype=torch.float64)
    word_mask = make_mask(B, K, 0.7) if masks else torch.ones(B, K, dtype=torch.bool)
    patch_mask = make_mask(B, P, 0.8) if masks else torch.ones(B, P, dtype=torch.bool)
    return words.to(dtype), word_mask, patches.to(dtype), patch_mask


def sap_inputs(B=3, M=5, P=29, d=24, dtype=torch.float64, masks=True):
    subcaptions = torch.randn(B, M, d, dtype=torch.float64)
    patches = torch.randn(B, P, d, dtype=torch.float64)
    subcaption_mask = make_mask(B, M, 0.7) if masks else torch.ones(B, M, dtype=torch.bool)
    patch_mask = make_mask(B, P, 0.8) if masks else torch.ones(B, P, dtype=torch.bool)
    if masks:
        patch_mask[:, : P // 2] = True  # enough valid patches for the k under test
    return subcaptions.to(dtype), patches.to(dtype), subcaption_mask, patch_mask


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]
