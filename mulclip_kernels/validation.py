"""Input checks shared by every op and every backend.

Each check raises TypeError (wrong type or dtype) or ValueError (wrong shape, device or value)
with a message naming the argument and what was expected, so every backend sees the same,
already validated inputs.
"""
import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, x, ndim: int, shape_doc: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    for axis, size in enumerate(x.shape):
        if size == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} (dimension {axis} is 0)")


def check_same_dtype_device(**tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        other = tensors[name]
        if other.device != first.device:
            raise ValueError(f"{name} is on {other.device} but {names[0]} is on {first.device}; move both to one device")
        if other.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {other.dtype} but {names[0]} has dtype {first.dtype}; use one dtype")


def check_mask(name: str, mask: Optional[torch.Tensor], shape: tuple, shape_doc: str, device: torch.device) -> torch.Tensor:
    """Return a bool mask of `shape` (all True when `mask` is None), after checking it."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape_doc}, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = valid), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}")
    return mask


def check_width(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.shape[-1] != other.shape[-1]:
        raise ValueError(
            f"{name} has width d={x.shape[-1]} but {other_name} has width d={other.shape[-1]}; both must share d"
        )


def check_batch(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.shape[0] != other.shape[0]:
        raise ValueError(
            f"{name} has batch size B={x.shape[0]} but {other_name} has B={other.shape[0]}; both must share B"
        )


def check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)


def check_k(k, patch_mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> int:
    """k must satisfy 1 <= k <= number of valid patches of every image that is used.

    `rows` (bool, (B,)) restricts the check to the images that have something to align; None
    checks every image. This reads the patch counts back to the host once, which a compiled
    graph cannot do: under torch.compile only the static part of the check runs.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    total = patch_mask.shape[1]
    if k > total:
        raise ValueError(f"k={k} is larger than the number of patches P={total}")
    if torch.compiler.is_compiling():
        return k
    counts = patch_mask.sum(dim=1)
    if rows is not None:
        counts = torch.where(rows, counts, torch.full_like(counts, total))
    smallest, image = counts.min(dim=0)
    smallest = int(smallest)
    if k > smallest:
        raise ValueError(
            f"k={k} is larger than the {smallest} valid patches of image {int(image)}; "
            f"k must be between 1 and the number of valid patches of every image"
        )
    return k


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
