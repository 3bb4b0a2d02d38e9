"""Training checkpoints: atomic writes, `weights_only` loads, and the random state of every rank.

A checkpoint is a dict of plain types and tensors (so `torch.load(weights_only=True)` reads it):
"state_dict" holds the open_clip model's weights under open_clip's own keys (context length
248), which is what `open_clip.create_model(name, pretrained=file, force_context_length=248)`
reads; "calibration" the calibration module's weights; "optimizer", "scaler", "step",
"epoch", "batch_in_epoch", "num_batches" and "rng" (one entry per rank) the training state.
"""
import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

LATEST = "latest.pt"


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then os.replace: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_copy(src: str, dst: str) -> None:
    """Make `dst` a copy of `src` through a temporary name and os.replace (a hard link where possible)."""
    import shutil

    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint with `weights_only=True` (no arbitrary code from the file)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python random states, as plain types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's random state, in rank order (one entry without a process group)."""
    import torch.distributed as dist

    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def find_resume(spec: Optional[str], checkpoint_dir: str) -> Optional[str]:
    """The checkpoint to resume from: a given file, `latest.pt` for "latest" (None if absent), or None."""
    if spec is None:
        return None
    if spec == "latest":
        path = os.path.join(checkpoint_dir, LATEST)
        return path if os.path.isfile(path) else None
    return spec
