"""The C++ CPU backend "cpp" of SAP at the issue's moderate CPU shape (N=512 subcaptions,
B=32 images, P=196, d=256, k=16), forward+backward, against the eager reference and the torch
path; parity is asserted in the same run (see common.py). Target: cpp at least 3x faster than
the reference. CPU only: on the GPU scale this file has no cases.
"""
import pytest
import torch

from benchmarks.common import measure
from benchmarks.test_bench_subcaption_patch import align_case, scores_case

CPU = torch.device("cpu")
PROVIDERS = ["reference", "torch", "cpp"]
SHAPES = [("scores", dict(N=512, B=32, P=196, d=256)), ("align", dict(B=32, M=16, P=196, d=256))]
CASES = {
    "cpu": [pytest.param((op, shape, provider), id=f"{op}-{provider}-" + "-".join(f"{k}{v}" for k, v in shape.items()))
            for op, shape in SHAPES for provider in PROVIDERS],
    "gpu": [],
}


def test_cpp_subcaption_patch(benchmark, case_params):
    op, shape, provider = case_params
    case = scores_case(**shape) if op == "scores" else align_case(**shape)
    measure(benchmark, case, provider, "full", torch.float32, CPU)
