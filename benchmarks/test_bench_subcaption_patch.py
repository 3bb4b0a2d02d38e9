"""Benchmark of SAP, paired (`subcaption_patch_align`) and cross (`subcaption_patch_scores`):
every backend against the eager reference and torch.compile of it. Speed, memory and parity in
one run (see common.py)."""
import torch

from benchmarks import baselines
from benchmarks.common import Case, measure, sweep
from mulclip_kernels import subcaption_patch_align, subcaption_patch_scores

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K_PATCHES = 16


def _patches(g, B, P, d):
    return torch.randn(B, P, d, generator=g, dtype=torch.float64), torch.ones(B, P, dtype=torch.bool)


def align_case(B, M, P, d):
    op = "subcaption_patch_align"

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        subcaptions = torch.randn(B, M, d, generator=g, dtype=torch.float64)
        patches, patch_mask = _patches(g, B, P, d)
        counts = torch.randint(1, M + 1, (B,), generator=g)  # samples with fewer sentences
        subcaption_mask = torch.arange(M) < counts[:, None]
        return [x.to(device) for x in (subcaptions, patches, subcaption_mask, patch_mask)]

    def call(provider, inputs):
        subcaptions, patches, subcaption_mask, patch_mask = inputs
        if provider == "compiled":
            return baselines.compiled_reference(op)(subcaptions, patches, K_PATCHES, subcaption_mask, patch_mask,
                                                    0.05, True)
        return subcaption_patch_align(subcaptions, patches, K_PATCHES, subcaption_mask=subcaption_mask,
                                      patch_mask=patch_mask, backend=provider)

    return Case(op, dict(B=B, M=M, P=P, d=d), make_inputs, 2, call,
                forward_flops=2 * d * B * M * (P + K_PATCHES))


def scores_case(N, B, P, d):
    op = "subcaption_patch_scores"

    def make_inputs(device):
        g = torch.Generator().manual_seed(0)
        subcaptions = torch.randn(N, d, generator=g, dtype=torch.float64)
        patches, patch_mask = _patches(g, B, P, d)
        return [x.to(device) for x in (subcaptions, patches, patch_mask)]

    def call(provider, inputs):
        subcaptions, patches, patch_mask = inputs
        if provider == "compiled":
            return baselines.compiled_reference(op)(subcaptions, patches, K_PATCHES, patch_mask, 0.05, True)
        return subcaption_patch_scores(subcaptions, patches, K_PATCHES, patch_mask=patch_mask, backend=provider)

    return Case(op, dict(N=N, B=B, P=P, d=d), make_inputs, 2, call,
                forward_flops=2 * d * N * B * (P + 2 * K_PATCHES))


GPU_DTYPES = [torch.float16, torch.float32]
CASES = {
    "cpu": sweep("subcaption_patch_align", dict(B=8, M=8, P=49, d=64), dict(B=[32], P=[196], d=[256]),
                 torch.device("cpu"), ["compiled"])
    + sweep("subcaption_patch_scores", dict(N=64, B=16, P=49, d=64), dict(N=[256], B=[64], P=[196], d=[256]),
            torch.device("cpu"), ["compiled"]),
    "gpu": sweep("subcaption_patch_align", dict(B=64, M=8, P=196, d=512), dict(B=[256], P=[576], d=[768]), DEVICE,
                 ["compiled"], base_only=(), dtypes=GPU_DTYPES)
    + sweep("subcaption_patch_scores", dict(N=512, B=64, P=196, d=512), dict(N=[2048], B=[256], P=[576], d=[768]),
            DEVICE, ["compiled"], base_only=(), dtypes=GPU_DTYPES),
}


def test_subcaption_patch(benchmark, case_params):
    shape, provider, mode, dtype = case_params
    case = scores_case(**shape) if "N" in shape else align_case(**shape)
    measure(benchmark, case, provider, mode, dtype, DEVICE if DEVICE.type == "cuda" else torch.device("cpu"),
            parity=mode == "full")
