"""Shared machinery of the op benchmarks: providers, one measured case, parity, work models.

A case is (op, provider, mode, shape, dtype). It is timed with pytest-benchmark (wall time,
synchronised on CUDA), its memory recorded (saved-for-backward bytes everywhere, peak CUDA
allocation on GPU), its parity asserted against a float64 reference in the same run, and its
matmul work and minimum memory traffic turned into TFLOP/s and GB/s and a fraction of the
device's peak. Everything lands in pytest-benchmark's extra_info, which `benchmarks.report`
reads back.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from mulclip_kernels.dispatch import available_backends
from mulclip_kernels.memory import record_saved_tensors
from mulclip_kernels.testing import PARITY_ATOL, assert_parity, max_error

MODES = ("forward", "backward", "full")

# Dense peaks per device name fragment: (TFLOP/s by dtype, memory GB/s). fp32 is the IEEE
# (CUDA core) rate, since the kernels keep fp32 dots out of TF32.
DEVICE_PEAKS = {
    "H100": ({torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}, 3350.0),
    "H200": ({torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 66.9}, 4800.0),
    "A100": ({torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 19.5}, 2039.0),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(device: torch.device) -> str:
    """A folder name for results: 'cpu' or e.g. 'nvidia-h100-80gb-hbm3'."""
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


def device_peaks(device: torch.device, dtype: torch.dtype):
    name = device_name(device)
    for key, (flops, bandwidth) in DEVICE_PEAKS.items():
        if key in name:
            return flops.get(dtype), bandwidth
    return None, None


@dataclass
class Case:
    """One op at one shape: how to build inputs and call each provider, and its work model."""

    op: str
    shape: Dict[str, int]
    make_inputs: Callable[[torch.device], List[torch.Tensor]]  # float64 masters, differentiable ones first
    n_differentiable: int
    call: Callable[[str, Sequence[torch.Tensor]], torch.Tensor]  # (provider, inputs) -> output
    forward_flops: float  # matmul FLOPs of one forward pass

    @property
    def label(self) -> str:
        return "-".join(f"{k}{v}" for k, v in self.shape.items())


def providers(op: str, device: torch.device, extra: Sequence[str] = ()) -> List[str]:
    """Backends that can run `op` on `device` here, plus baselines; the Triton interpreter is no benchmark."""
    names = [b for b in available_backends(op, device) if not (b == "triton" and device.type != "cuda")]
    return names + [name for name in extra if name not in names]


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cast(inputs: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    return [x.to(dtype) if x.is_floating_point() else x for x in inputs]


def _leaves(case: Case, inputs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [x.detach().clone().requires_grad_(i < case.n_differentiable) for i, x in enumerate(inputs)]


def run_once(case: Case, provider: str, inputs: List[torch.Tensor], grad_seed: torch.Tensor):
    """Forward and backward on fresh leaves; returns output and the grads of the differentiable inputs."""
    leaves = _leaves(case, inputs)
    out = case.call(provider, leaves)
    out.backward(grad_seed.to(out.dtype))
    return out.detach(), [x.grad for x in leaves[: case.n_differentiable]]


def check_parity(case: Case, provider: str, dtype: torch.dtype, result, master, grad_seed) -> Dict[str, float]:
    """The provider's output and grads against float64, bounded by the reference's own error in dtype."""
    exact = run_once(case, "reference", master, grad_seed)
    lowp = run_once(case, "reference", _cast(master, dtype), grad_seed)
    errors = {}
    names = ["output"] + [f"grad{i}" for i in range(case.n_differentiable)]
    for name, f, l, e in zip(names, [result[0], *result[1]], [lowp[0], *lowp[1]], [exact[0], *exact[1]]):
        assert_parity(f"{case.op}/{provider}/{name}", f, l, e, PARITY_ATOL[dtype])
        errors[f"max_error_{name}"] = max_error(f, e)
        errors[f"reference_error_{name}"] = max_error(l, e)
    return errors


def measure(benchmark, case: Case, provider: str, mode: str, dtype: torch.dtype, device: torch.device,
            rounds: int = 3, parity: bool = True):
    """Time `mode` of `provider` on `case`, record memory, parity and throughput in extra_info."""
    master = case.make_inputs(device)
    inputs = _cast(master, dtype)
    with torch.no_grad():  # warm-up: compiles, autotunes and builds happen here, untimed
        out_shape = case.call(provider, inputs).shape
    generator = torch.Generator().manual_seed(1234)
    grad_seed = (torch.rand(out_shape, generator=generator, dtype=torch.float64) + 0.5).to(device)
    result = run_once(case, provider, inputs, grad_seed)
    errors = check_parity(case, provider, dtype, result, master, grad_seed) if parity else {}
    del result, master

    leaves = _leaves(case, inputs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_allocated = torch.cuda.memory_allocated(device)
    with record_saved_tensors() as saved:
        out = case.call(provider, leaves)
    grad_seed = grad_seed.to(out.dtype)
    out.backward(grad_seed)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - start_allocated if device.type == "cuda" else None

    def forward():
        case.call(provider, leaves)
        _sync(device)

    def full():
        for x in leaves:
            x.grad = None
        case.call(provider, leaves).backward(grad_seed)
        _sync(device)

    del out
    if mode == "backward":
        def setup():  # the forward pass of each round, untimed
            return (case.call(provider, leaves),), {}

        def backward(out):
            out.backward(grad_seed)
            _sync(device)

        benchmark.pedantic(backward, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(forward if mode == "forward" else full, rounds=rounds, iterations=1, warmup_rounds=1)

    # Work model: backward does twice the forward's matmul work; the least traffic is reading
    # the inputs once per pass and writing their gradients once.
    flops = case.forward_flops * {"forward": 1, "backward": 2, "full": 3}[mode]
    input_bytes = sum(x.numel() * x.element_size() for x in inputs[: case.n_differentiable])
    traffic = {"forward": 1, "backward": 2, "full": 3}[mode] * input_bytes
    peak_flops, peak_bandwidth = device_peaks(device, dtype)
    if benchmark.stats is None:  # --benchmark-disable: the case ran once, untimed
        tflops = gbps = None
    else:
        seconds = benchmark.stats.stats.median
        tflops, gbps = flops / seconds / 1e12, traffic / seconds / 1e9
    benchmark.extra_info.update(
        op=case.op, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""), shape=case.label,
        **case.shape, device=device_name(device),
        saved_bytes=saved.total_bytes(), saved_bytes_beyond_inputs=saved.total_bytes(leaves),
        largest_saved_numel_beyond_inputs=saved.largest_numel(leaves), peak_cuda_bytes=peak,
        matmul_flops=flops, min_traffic_bytes=traffic, tflops=tflops, gbps=gbps,
        fraction_of_peak_flops=tflops / peak_flops if peak_flops and tflops else None,
        fraction_of_peak_bandwidth=gbps / peak_bandwidth if peak_bandwidth and gbps else None,
        **errors,
    )


def bench_dtypes(device: torch.device) -> List[torch.dtype]:
    """bf16 is the training dtype on GPU; the CPU runs fp32 (CPU bf16 matmuls say little)."""
    return [torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]


def log2_sweep(start: int, stop: int) -> List[int]:
    return [2 ** i for i in range(int(math.log2(start)), int(math.log2(stop)) + 1)]


def sweep(op: str, base: Dict[str, int], variations: Dict[str, List[int]], device: torch.device,
          baselines: Sequence[str], base_only: Sequence[str] = ("compiled",), dtypes: Sequence[torch.dtype] = ()):
    """pytest params (shape, provider, mode, dtype): every mode at the base shape, "full" along
    each one-dimension variation of it, and the other `dtypes` at the base shape.

    Providers in `base_only` (slow to build, like torch.compile) run at the base shape only.
    """
    import pytest

    main_dtype = bench_dtypes(device)[0]
    shapes = [dict(base)] + [dict(base, **{key: value}) for key, values in variations.items() for value in values]
    params = []
    for index, shape in enumerate(shapes):
        for provider in providers(op, device, baselines):
            if index and provider in base_only:
                continue
            modes = MODES if index == 0 else ("full",)
            runs = [(mode, main_dtype) for mode in modes]
            if index == 0:
                runs += [("full", dtype) for dtype in dtypes if dtype != main_dtype]
            for mode, dtype in runs:
                label = "-".join(f"{k}{v}" for k, v in shape.items())
                dtype_name = str(dtype).replace("torch.", "")
                params.append(pytest.param((shape, provider, mode, dtype), id=f"{provider}-{mode}-{dtype_name}-{label}"))
    return params
