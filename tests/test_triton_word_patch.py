"""Triton WPR backend against the eager reference: parity rule, edge cases, saved bytes, compile.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 first) on small odd shapes with small tiles; on a GPU the same checks run at
paper-like shapes in every dtype.
"""
import pytest
import torch

from inputs import leaves, wpr_inputs
from mulclip_kernels import word_patch_reconstruction_loss
from mulclip_kernels.dispatch import availability
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels.ops import triton_word_patch
from mulclip_kernels.testing import PARITY_ATOL, assert_parity

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = triton_word_patch._INTERPRETED
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="interpreter tests: a GPU runs the large ones instead")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")

# Interpreter tiles: 16 rows per program, d contracted in 16-wide chunks. "default" covers an
# output row of (padded) width <= 32 in one program; "narrow" splits every output row over
# programs, each recomputing its tiles and applying the calibration backward to its chunk.
_NARROW = triton_word_patch.Tiles(16, 16, 16, 16, num_warps=1, num_stages=1)
PLANS = {
    "default": None,
    "narrow": triton_word_patch.Plan(recon=_NARROW, contrast=_NARROW, contrast_backward=_NARROW, grad_rows=_NARROW,
                                     rows=triton_word_patch.Tiles(16, 16, 16, 0, num_warps=1, num_stages=1)),
}


def run_wpr(backend, words, word_mask, patches, patch_mask, seed_grad, **kwargs):
    w, p = leaves(words, patches)
    loss = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend, reduction="none", **kwargs)
    (loss * seed_grad.to(device=loss.device, dtype=loss.dtype)).sum().backward()
    return loss, w.grad, p.grad


def check_parity(shape, dtype, device=DEVICE, **kwargs):
    """Loss and both gradients of the triton backend within the parity rule, exact zeros where masked."""
    words, word_mask, patches, patch_mask = wpr_inputs(**shape)
    word_mask[0] = False
    word_mask[0, 3] = True  # a sample with one word
    word_mask[-1] = False  # a sample with no word: zero loss and zero gradients
    seed_grad = torch.rand(shape["B"], dtype=torch.float64) + 0.5
    exact = run_wpr("reference", words, word_mask, patches, patch_mask, seed_grad, **kwargs)
    cast = [words.to(dtype), word_mask, patches.to(dtype), patch_mask]
    lowp = run_wpr("reference", *cast, seed_grad, **kwargs)
    fused = run_wpr("triton", *[x.to(device) for x in cast], seed_grad, **kwargs)
    fused = [x.cpu() for x in fused]
    for name, f, l, e in zip(["loss", "grad_words", "grad_patches"], fused, lowp, exact):
        assert f.dtype == (torch.float32 if name == "loss" else dtype)
        assert_parity(name, f, l, e, PARITY_ATOL[dtype])
    loss, grad_words, grad_patches = fused
    assert loss[-1] == 0 and not grad_words[-1].any() and not grad_patches[-1].any()
    assert not grad_words[~word_mask].any() and not grad_patches[~patch_mask].any()


@pytest.fixture(params=list(PLANS))
def plan(request, monkeypatch):
    if PLANS[request.param] is not None:
        monkeypatch.setattr(triton_word_patch, "default_plan", lambda D, dtype: PLANS[request.param])
    return request.param


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_parity_interpreter(dtype, plan):
    check_parity(dict(B=3, K=13, P=29, d=24), dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype, plan", [(torch.float32, "default"), (torch.float16, "narrow")], ids=str,
                         indirect=["plan"])
def test_parity_interpreter_several_row_blocks(dtype, plan):
    """Two row blocks per side, d = 40 in three contraction chunks and two or three output chunks."""
    check_parity(dict(B=2, K=19, P=37, d=40), dtype)


@needs_interpreter
def test_parity_without_normalisation():
    check_parity(dict(B=3, K=13, P=29, d=24), torch.float32, normalize=False, recon_temperature=0.5,
                 contrast_temperature=0.3)


@needs_interpreter
def test_nan_padding_never_leaks():
    """Masked positions full of NaN give exactly the results of zero padding."""
    words, word_mask, patches, patch_mask = wpr_inputs(B=3, K=13, P=29, d=24, dtype=torch.float32)
    seed_grad = torch.rand(3)
    clean = run_wpr("triton", words, word_mask, patches, patch_mask, seed_grad)
    words[~word_mask] = float("nan")
    patches[~patch_mask] = float("nan")
    dirty = run_wpr("triton", words, word_mask, patches, patch_mask, seed_grad)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@needs_interpreter
def test_batch_without_words_is_zero():
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=5, P=17, d=16, dtype=torch.float32)
    word_mask[:] = False
    loss, grad_words, grad_patches = run_wpr("triton", words, word_mask, patches, patch_mask, torch.ones(2))
    assert not loss.any() and not grad_words.any() and not grad_patches.any()
    w, p = leaves(words, patches)
    mean = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend="triton")
    mean.backward()
    assert mean.item() == 0 and not w.grad.any() and not p.grad.any()


@needs_interpreter
def test_sample_chunks_agree_with_one_pass(monkeypatch):
    """Temporaries for one sample at a time (the batch in chunks) change no bit of the results."""
    words, word_mask, patches, patch_mask = wpr_inputs(B=3, K=13, P=29, d=24, dtype=torch.float16)
    seed_grad = torch.rand(3)
    whole = run_wpr("triton", words, word_mask, patches, patch_mask, seed_grad)
    monkeypatch.setenv("MULCLIP_TRITON_SCRATCH_ELEMENTS", "1")
    chunked = run_wpr("triton", words, word_mask, patches, patch_mask, seed_grad)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@needs_interpreter
def test_float64_runs_the_torch_path():
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=7, P=11, d=16)
    seed_grad = torch.rand(2, dtype=torch.float64)
    triton_run = run_wpr("triton", words, word_mask, patches, patch_mask, seed_grad)
    exact = run_wpr("reference", words, word_mask, patches, patch_mask, seed_grad)
    assert triton_run[0].dtype == torch.float64
    for a, b in zip(triton_run, exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_saves_row_statistics_only():
    B, K, P, d = 3, 21, 37, 16
    words, word_mask, patches, patch_mask = wpr_inputs(B=B, K=K, P=P, d=d, dtype=torch.float32)
    w, p = leaves(words, patches)
    with record_saved_tensors() as saved:
        loss = word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend="triton", reduction="none")
    inputs = (w, p, word_mask, patch_mask)
    # |X|, lse(S), |y|, lse(G) per row of both sides (planes rounded up to 4 floats) and two
    # weights per sample, in fp32.
    plane = lambda n: -(-B * n // 4) * 4  # noqa: E731
    assert saved.total_bytes(inputs) == 4 * (4 * plane(K) + 4 * plane(P) + 2 * B)
    assert saved.largest_numel(inputs) == 4 * plane(P) < B * K * P
    loss.sum().backward()
    assert w.grad is not None and p.grad is not None


@needs_interpreter
def test_compiles_without_graph_break():
    words, word_mask, patches, patch_mask = wpr_inputs(B=2, K=9, P=17, d=16, dtype=torch.float32)

    def loss_fn(w, p):
        return 2 * word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        w, p = leaves(words, patches)
        loss = fn(w, p)
        loss.backward()
        results.append((loss, w.grad, p.grad))
    for eager, graph in zip(*results):
        torch.testing.assert_close(graph, eager, rtol=1e-6, atol=1e-7)


def test_availability_follows_the_interpreter_flag():
    ok_cpu, reason = availability("word_patch_reconstruction", "triton", torch.device("cpu"))
    assert ok_cpu == INTERPRETED
    assert ok_cpu or "TRITON_INTERPRET" in reason


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [
    pytest.param(dict(B=4, K=248, P=197, d=768), id="B4-K248-P197-d768"),
    pytest.param(dict(B=3, K=248, P=577, d=512), id="B3-K248-P577-d512"),
    pytest.param(dict(B=3, K=77, P=50, d=100), id="B3-K77-P50-d100"),
    pytest.param(dict(B=2, K=512, P=1024, d=1024), id="B2-K512-P1024-d1024"),
])
def test_parity_gpu(shape, dtype):
    check_parity(shape, dtype, device=torch.device("cuda"))


@needs_gpu
def test_auto_picks_triton_on_cuda():
    assert availability("word_patch_reconstruction", "triton", torch.device("cuda"))[0]
