"""Backend choice for every op.

A backend is a module that defines a function named after the op, taking validated inputs
(bool masks always present) in the order of `mulclip_kernels.reference`. A backend module may
define `is_available(device) -> (bool, reason)`; without it the backend runs everywhere.

`load_backends()` imports every backend module once, when the package is imported, so that
choosing a backend is a dictionary lookup that torch.compile can trace. A module that fails to
import (a missing toolchain) is kept as its error and reported when asked for. Importing a
backend module must stay cheap: builds and compilations happen on first use, not on import.
"""
import importlib
from typing import Callable, Dict, List, Tuple, Union

import torch

_BACKEND_MODULES: Dict[str, Dict[str, str]] = {
    "word_patch_reconstruction": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_word_patch",
        "triton": "mulclip_kernels.ops.triton_word_patch",
    },
    "subcaption_patch_align": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_subcaption_patch",
        "cpp": "mulclip_kernels.ops.cpp_subcaption_patch",
        "cuda": "mulclip_kernels.ops.cuda_subcaption_patch",
        "triton": "mulclip_kernels.ops.triton_subcaption_patch",
    },
    "subcaption_patch_scores": {
        "reference": "mulclip_kernels.reference",
        "torch": "mulclip_kernels.ops.torch_subcaption_patch",
        "cpp": "mulclip_kernels.ops.cpp_subcaption_patch",
        "cuda": "mulclip_kernels.ops.cuda_subcaption_patch",
        "triton": "mulclip_kernels.ops.triton_subcaption_patch",
    },
}

# What "auto" tries, fastest first, per device type; the first available backend wins.
# The "cuda" extension's kernels have compiled but never run on a GPU here (the algorithm is
# tested through the "cpp" build of the same header): until a GPU run passes its tests it is
# opt-in, behind "torch".
_AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["triton", "torch", "cuda"],
    "cpu": ["cpp", "torch"],
}
_AUTO_FALLBACK = ["torch"]


_LOADED: Dict[str, Union[object, str]] = {}  # module path -> module, or why it failed to import


def load_backends() -> None:
    for modules in _BACKEND_MODULES.values():
        for path in modules.values():
            if path not in _LOADED:
                try:
                    _LOADED[path] = importlib.import_module(path)
                except ImportError as error:
                    _LOADED[path] = f"importing {path} failed: {error}"


def backends(op: str) -> List[str]:
    """Names accepted by `backend=` for `op`, "auto" first."""
    return ["auto", *_BACKEND_MODULES[op]]


def availability(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    """Whether `backend` can run `op` on `device`, and why not."""
    module = _LOADED[_BACKEND_MODULES[op][backend]]
    if isinstance(module, str):
        return False, module
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
    return getattr(_LOADED[modules[backend]], op)
