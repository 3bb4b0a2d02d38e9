"""torch.compile(fullgraph=True) of functions that call the ops: no graph break on CPU."""
import pytest
import torch

from inputs import leaves, sap_inputs, wpr_inputs
from mulclip_kernels import subcaption_alignment_loss, subcaption_patch_scores, word_patch_reconstruction_loss


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_losses_match_eager(compiler):
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=9, P=17, d=16, dtype=torch.float32)
    subcaptions, _, subcaption_mask, _ = sap_inputs(B=2, M=3, P=17, d=16, dtype=torch.float32)

    def loss_fn(w, p, s):
        wpr = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend="torch")
        sap = subcaption_alignment_loss(s, p, 10.0, 4, subcaption_mask=subcaption_mask, patch_mask=patch_mask,
                                        backend="torch")
        cross = subcaption_patch_scores(s[:, 0], p, 4, patch_mask=patch_mask, backend="torch").sum()
        return wpr + sap + cross

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    results = []
    for fn in (loss_fn, compiled):
        w, p, s = leaves(words, patches, subcaptions)
        loss = fn(w, p, s)
        loss.backward()
        results.append((loss, w.grad, p.grad, s.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-6)
