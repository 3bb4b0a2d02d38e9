"""Benchmark of the WPR loss: every backend against the eager reference, torch.compile of it and
the SDPA version a user would write. Speed, memory and parity in one run (see common.py)."""
import pytest
import torch

from benchmarks import baselines
from benchmarks.common import Case, measure, sweep
from mulclip_kernels import word_patch_reconstruction_loss
from mulclip_kernels.memory import record_saved_tensors

OP = "word_patch_reconstruction"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_case(B, K, P, d):
    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        words = torch.randn(B, K, d, generator=g, dtype=torch.float64)
        patches = torch.randn(B, P, d, generator=g, dtype=torch.float64)
        # Captions of varied length: words sit strictly between SOT (0) and EOT (length - 1).
        lengths = torch.randint(max(3, K // 4), K + 1, (B,), generator=g)
        position = torch.arange(K)
        word_mask = (position > 0) & (position < lengths[:, None] - 1)
        patch_mask = torch.ones(B, P, dtype=torch.bool)
        return [x.to(device) for x in (words, patches, word_mask, patch_mask)]

    def call(provider, inputs):
        words, patches, word_mask, patch_mask = inputs
        if provider == "sdpa":
            return baselines.word_patch_reconstruction_sdpa(words, word_mask, patches, patch_mask)
        if provider == "compiled":
            return baselines.compiled_reference(OP)(words, word_mask, patches, patch_mask, 0.05, 0.07, True)
        return word_patch_reconstruction_loss(words, word_mask, patches, patch_mask, backend=provider,
                                              reduction="none")

    return Case(OP, dict(B=B, K=K, P=P, d=d), make_inputs, 2, call, forward_flops=2 * d * B * (3 * K * P + K * K + P * P))


CASES = {
    "cpu": sweep(OP, dict(B=4, K=77, P=49, d=64), dict(K=[32, 154], P=[196], B=[8], d=[128]), torch.device("cpu"),
                 baselines=["sdpa", "compiled"]),
    "gpu": sweep(OP, dict(B=64, K=248, P=196, d=512), dict(B=[256], P=[576], d=[768]), DEVICE,
                 baselines=["sdpa", "compiled"], base_only=(), dtypes=[torch.float16, torch.float32]),
}


def test_word_patch_reconstruction(benchmark, case_params):
    shape, provider, mode, dtype = case_params
    device = DEVICE if DEVICE.type == "cuda" and dtype != torch.float64 else torch.device("cpu")
    measure(benchmark, make_case(**shape), provider, mode, dtype, device, parity=mode == "full")


def test_saved_bytes_ratio_at_paper_shape(benchmark):
    """Saved-for-backward bytes, torch path over reference, WPR at B=32, K=248, P=196, d=512 (fp32)."""
    case = make_case(B=32, K=248, P=196, d=512)
    words, patches, word_mask, patch_mask = [x.float() if x.is_floating_point() else x for x in case.make_inputs("cpu")]
    saved = {}

    def forward(backend):
        w, p = words.clone().requires_grad_(), patches.clone().requires_grad_()
        with record_saved_tensors() as record:
            word_patch_reconstruction_loss(w, word_mask, p, patch_mask, backend=backend)
        saved[backend] = (record.total_bytes(), record.total_bytes((w, p)))

    forward("reference")
    benchmark.pedantic(forward, args=("torch",), rounds=1)  # the time is the torch path's forward
    ratio = saved["torch"][0] / saved["reference"][0]
    benchmark.extra_info.update(op=OP, provider="torch", mode="forward", dtype="float32", shape=case.label,
                                **case.shape, saved_bytes_reference=saved["reference"][0],
                                saved_bytes_torch=saved["torch"][0], saved_bytes_torch_beyond_inputs=saved["torch"][1],
                                saved_bytes_ratio_torch_over_reference=ratio)
    print(f"\nWPR saved-for-backward bytes at {case.label}: reference {saved['reference'][0]:,}, "
          f"torch {saved['torch'][0]:,} (beyond its inputs {saved['torch'][1]:,}), ratio {ratio:.4f}")
    assert saved["torch"][1] < saved["reference"][1] / 100
