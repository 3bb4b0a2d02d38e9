"""Measure what autograd keeps for backward: the bytes of every tensor saved by a forward pass."""
from contextlib import contextmanager
from typing import Dict, Tuple

import torch


def _storage_key(tensor: torch.Tensor) -> Tuple:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), str(tensor.device)


class SavedTensors:
    """Tensors saved for backward inside `record_saved_tensors()`, counted once per storage.

    Views count their whole storage once, so an input and a slice of it count as one tensor.
    """

    def __init__(self):
        self.numel: Dict[Tuple, int] = {}  # storage key -> largest numel saved from it

    def add(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        self.numel[key] = max(self.numel.get(key, 0), tensor.numel())

    def _keys(self, exclude):
        skip = {_storage_key(t) for t in exclude}
        return [key for key in self.numel if key not in skip]

    def total_bytes(self, exclude=()) -> int:
        """Bytes of all saved storages, those of the `exclude` tensors (e.g. the inputs) left out."""
        return sum(key[1] for key in self._keys(exclude))

    def largest_numel(self, exclude=()) -> int:
        """Elements of the largest saved tensor, the `exclude` tensors left out."""
        return max((self.numel[key] for key in self._keys(exclude)), default=0)


@contextmanager
def record_saved_tensors():
    """Record every tensor the autograd graph saves while the block runs."""
    record = SavedTensors()

    def pack(tensor):
        record.add(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield record
