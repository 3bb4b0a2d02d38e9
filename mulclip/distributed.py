"""Process group set-up from torchrun (or SLURM) environment variables."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, local rank, world size and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def world_info_from_env():
    """(local rank, global rank, world size) from torchrun, SLURM or MPI variables; (0, 0, 1) without."""

    def first(names, default):
        return next((int(os.environ[n]) for n in names if n in os.environ), default)

    local_rank = first(("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK"), 0)
    rank = first(("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"), 0)
    world_size = first(("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"), 1)
    return local_rank, rank, world_size


def init_distributed(device: Optional[str] = None, dist_backend: Optional[str] = None, dist_url: str = "env://") -> DistEnv:
    """Join the process group when launched with more than one process; pick this process's device.

    Args:
        device: "cuda", "cpu" or None (CUDA when available). With CUDA each process takes
            `cuda:<local rank>`.
        dist_backend: None picks "nccl" on CUDA and "gloo" on CPU.
        dist_url: rendezvous; "env://" reads MASTER_ADDR/MASTER_PORT (torchrun sets them).
    """
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank, rank, world_size = world_info_from_env()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        backend = dist_backend or ("nccl" if device_type == "cuda" else "gloo")
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            dist.init_process_group(backend, init_method=dist_url, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend, init_method=dist_url)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, local_rank, world_size, torch_device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
