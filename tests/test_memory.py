"""What the lean torch path keeps for backward: O(B(K+P)) beyond its inputs, never B*K*P."""
import pytest
import torch

from inputs import sap_inputs, wpr_inputs
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores, word_patch_reconstruction_loss
from mulclip_kernels.memory import record_saved_tensors


def test_word_patch_reconstruction_saves_no_similarity():
    B, K, P, d = 4, 40, 50, 16
    words, word_mask, patches, patch_mask = wpr_inputs(B=B, K=K, P=P, d=d, dtype=torch.float32)
    words.requires_grad_()
    patches.requires_grad_()
    with record_saved_tensors() as lean:
        word_patch_reconstruction_loss(words, word_mask, patches, patch_mask, backend="torch")
    with record_saved_tensors() as eager:
        word_patch_reconstruction_loss(words, word_mask, patches, patch_mask, backend="reference")
    inputs = (words, patches)
    assert lean.largest_numel(inputs) < B * K * P
    assert lean.total_bytes(inputs) <= 16 * B * (K + P)
    assert eager.largest_numel(inputs) >= B * K * P  # the measurement sees what the reference keeps
    assert eager.total_bytes() > 5 * lean.total_bytes()


@pytest.mark.parametrize("k", [1, 8])
def test_subcaption_patch_align_saves_indices_only(k):
    B, M, P, d = 4, 6, 50, 16
    subcaptions, patches, subcaption_mask, patch_mask = sap_inputs(B=B, M=M, P=P, d=d, dtype=torch.float32)
    subcaptions.requires_grad_()
    patches.requires_grad_()
    with record_saved_tensors() as lean:
        subcaption_patch_align(subcaptions, patches, k, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                               backend="torch")
    inputs = (subcaptions, patches)
    assert lean.largest_numel(inputs) < B * M * P
    assert lean.total_bytes(inputs) <= 4 * B * M * k + 2 * B * (M + P)


def test_subcaption_patch_scores_saves_indices_only():
    N, B, P, d, k = 24, 5, 50, 16, 4
    subcaptions, patches, _, patch_mask = sap_inputs(B=B, M=N, P=P, d=d, dtype=torch.float32)
    subcaptions = subcaptions[0].detach().requires_grad_()
    patches.requires_grad_()
    with record_saved_tensors() as lean:
        subcaption_patch_scores(subcaptions, patches, k, patch_mask=patch_mask, backend="torch")
    inputs = (subcaptions, patches)
    assert lean.largest_numel(inputs) < N * B * P
    assert lean.total_bytes(inputs) <= 4 * N * B * k + B * P
