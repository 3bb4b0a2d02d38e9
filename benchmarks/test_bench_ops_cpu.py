"""CPU benchmark of the lean torch path against the eager reference, WPR and SAP (paired, cross).

Each case asserts parity (float32 against the float64 reference, by the method's parity rule)
and records forward+backward time and saved-for-backward bytes in pytest-benchmark's extra_info.
"""
import pytest
import torch

from benchmarks.common import forward_backward, record_run
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores, word_patch_reconstruction_loss
from mulclip_kernels.testing import PARITY_ATOL, assert_parity

BACKENDS = ["reference", "torch"]


def wpr_case(B, K, P, d):
    g = torch.Generator().manual_seed(0)
    words = torch.randn(B, K, d, generator=g)
    patches = torch.randn(B, P, d, generator=g)
    word_mask = torch.rand(B, K, generator=g) < 0.8
    return words, word_mask, patches


def check_parity(fn_for, inputs, grad_seed, out, grads):
    """The float32 run against the float64 reference, bounded by the float32 reference's error."""
    exact_out, exact_grads, _, _ = forward_backward(fn_for("reference"), [x.double() for x in inputs], grad_seed.double())
    lowp_out, lowp_grads, _, _ = forward_backward(fn_for("reference"), inputs, grad_seed)
    for name, f, l, e in zip(["out", "grad0", "grad1"], [out, *grads], [lowp_out, *lowp_grads], [exact_out, *exact_grads]):
        assert_parity(name, f, l, e, PARITY_ATOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_word_patch_reconstruction_cpu(benchmark, backend):
    B, K, P, d = 8, 77, 196, 128
    words, word_mask, patches = wpr_case(B, K, P, d)

    def fn_for(name):
        return lambda w, p: word_patch_reconstruction_loss(w, word_mask, p, backend=name, reduction="none")

    grad_seed = torch.ones(B)
    out, grads = record_run(benchmark, fn_for(backend), [words, patches], grad_seed,
                            op="word_patch_reconstruction", backend=backend, B=B, K=K, P=P, d=d)
    check_parity(fn_for, [words, patches], grad_seed, out, grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subcaption_patch_align_cpu(benchmark, backend):
    B, M, P, d, k = 16, 8, 196, 128, 16
    g = torch.Generator().manual_seed(1)
    subcaptions, patches = torch.randn(B, M, d, generator=g), torch.randn(B, P, d, generator=g)

    def fn_for(name):
        return lambda s, p: subcaption_patch_align(s, p, k, backend=name)

    grad_seed = torch.randn(B, M, d, generator=g)
    out, grads = record_run(benchmark, fn_for(backend), [subcaptions, patches], grad_seed,
                            op="subcaption_patch_align", backend=backend, B=B, M=M, P=P, d=d, k=k)
    check_parity(fn_for, [subcaptions, patches], grad_seed, out, grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subcaption_patch_scores_cpu(benchmark, backend):
    N, B, P, d, k = 128, 16, 196, 128, 16
    g = torch.Generator().manual_seed(2)
    subcaptions, patches = torch.randn(N, d, generator=g), torch.randn(B, P, d, generator=g)

    def fn_for(name):
        return lambda s, p: subcaption_patch_scores(s, p, k, backend=name)

    grad_seed = torch.randn(N, B, generator=g)
    out, grads = record_run(benchmark, fn_for(backend), [subcaptions, patches], grad_seed,
                            op="subcaption_patch_scores", backend=backend, N=N, B=B, P=P, d=d, k=k)
    check_parity(fn_for, [subcaptions, patches], grad_seed, out, grads)


def test_saved_bytes_ratio_at_paper_shape(benchmark):
    """Saved-for-backward bytes, torch path over reference, WPR at B=32, K=248, P=196, d=512."""
    B, K, P, d = 32, 248, 196, 512
    words, word_mask, patches = wpr_case(B, K, P, d)
    saved = {}

    def forward(backend):
        w, p = words.clone().requires_grad_(), patches.clone().requires_grad_()
        with record_saved_tensors() as record:
            word_patch_reconstruction_loss(w, word_mask, p, backend=backend)
        saved[backend] = record.total_bytes()

    forward("reference")
    benchmark.pedantic(forward, args=("torch",), rounds=1)  # the time is the torch path's forward
    ratio = saved["torch"] / saved["reference"]
    benchmark.extra_info.update(op="word_patch_reconstruction", backend="torch", B=B, K=K, P=P, d=d,
                                saved_bytes_reference=saved["reference"], saved_bytes_torch=saved["torch"],
                                saved_bytes_ratio_torch_over_reference=ratio)
    print(f"\nsaved-for-backward bytes at B={B} K={K} P={P} d={d}: reference {saved['reference']:,} "
          f"torch {saved['torch']:,} ratio {ratio:.4f}")
    assert saved["torch"] < saved["reference"]
