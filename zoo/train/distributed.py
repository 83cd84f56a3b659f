"""torchrun integration: process group set-up, rank helpers and metric reduction."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["DistInfo", "init_distributed", "all_reduce_sum", "all_gather_objects", "barrier", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", need_group: bool = False) -> DistInfo:
    """Reads torchrun's environment; NCCL on GPUs, gloo on CPU. A plain ``python`` run is world size 1, with a
    process group of its own only when ``need_group`` (FSDP shards over a group, even a group of one)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                          "use --device cpu or --device auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif need_group and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Sums a few numbers over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
