"""Shared pieces of the benchmarks: one forward+backward run, its saved bytes, parity against float64."""
import torch

from mulclip_kernels.memory import record_saved_tensors


def forward_backward(fn, inputs, grad_seed):
    """Run fn on fresh leaves of `inputs`, backpropagate `grad_seed`; return output, grads, saved record."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with record_saved_tensors() as saved:
        out = fn(*leaves)
    (out * grad_seed.to(out.dtype)).sum().backward()
    return out.detach(), [x.grad for x in leaves], saved, leaves


def record_run(benchmark, fn, inputs, grad_seed, **info):
    """Time forward+backward with pytest-benchmark and record saved-for-backward bytes in extra_info."""
    out, grads, saved, leaves = forward_backward(fn, inputs, grad_seed)

    def step():
        args = [x.detach().requires_grad_(True) for x in inputs]
        (fn(*args) * grad_seed.to(inputs[0].dtype)).sum().backward()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(info)
    benchmark.extra_info["saved_bytes"] = saved.total_bytes()
    benchmark.extra_info["saved_bytes_beyond_inputs"] = saved.total_bytes(leaves)
    benchmark.extra_info["largest_saved_numel_beyond_inputs"] = saved.largest_numel(leaves)
    return out, grads
