"""The public API on random features: every op, forward and backward, on the best backend here."""
import torch

from mulclip_kernels import (clip_loss, subcaption_alignment_loss, subcaption_patch_align, subcaption_patch_scores,
                             word_patch_reconstruction_loss)

device = "cuda" if torch.cuda.is_available() else "cpu"
B, K, P, M, d = 8, 248, 196, 8, 512
words = torch.randn(B, K, d, device=device, requires_grad=True)  # per-token text embeddings
word_mask = torch.rand(B, K, device=device) < 0.5  # True between SOT and EOT
patches = torch.randn(B, P, d, device=device, requires_grad=True)  # projected patch tokens
subcaptions = torch.randn(B, M, d, device=device, requires_grad=True)  # one embedding per sentence
subcaption_mask = torch.rand(B, M, device=device) < 0.8
image, text = torch.randn(B, d, device=device), torch.randn(B, d, device=device)

wpr = word_patch_reconstruction_loss(words, word_mask, patches)
regions = subcaption_patch_align(subcaptions, patches, k=16, subcaption_mask=subcaption_mask)
scores = subcaption_patch_scores(subcaptions[:, 0], patches, k=16)
sap = subcaption_alignment_loss(subcaptions, patches, 100.0, k=16, subcaption_mask=subcaption_mask)
total = clip_loss(image, text, 100.0) + wpr + sap
total.backward()
print(f"device {device}: WPR {wpr.item():.4f}  SAP {sap.item():.4f}  total {total.item():.4f}")
print(f"regions {tuple(regions.shape)}  cross scores {tuple(scores.shape)}  "
      f"|grad words| {words.grad.norm():.4f}  |grad patches| {patches.grad.norm():.4f}")
