"""Backend choice for every op.

A backend is a module that defines a function named after the op, taking validated inputs
(bool masks always present) in the order of `mulclip_kernels.reference`. A backend module may
define `is_available(device) -> (bool, reason)`; without it the backend runs everywhere.
Modules are imported on first use, so an unavailable toolchain costs nothing until asked for.
"""
import importlib
from typing import Callable, Dict, List, Tuple

import torch

_BACKEND_MODULES: Dict[str, Dict[str, str]] = {
    "word_patch_reconstruction": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_word_patch",
    },
    "subcaption_patch_align": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_subcaption_patch",
    },
    "subcaption_patch_scores": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_subcaption_patch",
    },
}

# What "auto" tries, fastest first, per device type; the first available backend wins.
_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "cuda", "torch"],
    "cpu": ["torch"],
}
_AUTO_FALLBACK = ["torch"]


def backends(op: str) -> List[str]:
    """Names accepted by `backend=` for `op`, "auto" first."""
    return ["auto", *_BACKEND_MODULES[op]]


def availability(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether `backend` can run `op` on `device`, and why not."""
    module = importlib.import_module(_BACKEND_MODULES[op][backend])
    check = getattr(module, "is_available", None)
    return (True, "") if check is None else check(torch.device(device))


def available_backends(op: str, device) -> List[str]:
    """The concrete backends that can run `op` on `device` now."""
    return [name for name in _BACKEND_MODULES[op] if availability(op, name, device)[0]]


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The function implementing `op` with `backend` ("auto" or a name) for tensors on `device`."""
    modules = _BACKEND_MODULES[op]
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if name in modules and availability(op, name, device)[0]:
                backend = name
                break
        else:
            backend = "torch"
    if not isinstance(backend, str) or backend not in modules:
        raise ValueError(f"backend must be one of {backends(op)} for {op}, got {backend!r}")
    ok, reason = availability(op, backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} cannot run {op} on {device}: {reason}")
    return getattr(importlib.import_module(modules[backend]), op)
