"""torch.distributed glue: cdp_fast runs under ``torchrun`` without anything home-made.

``torchrun --nproc_per_node=N -m cdp_fast sample ...`` (or any script calling
:func:`cdp_fast.sample` with ``out=``) starts N processes with ``WORLD_SIZE``/``RANK`` set; the
sampler then joins (or initialises) the default process group — nccl for CUDA devices, gloo
otherwise — and rank r generates shards k with k % WORLD_SIZE == r. A shard is a function of
the seed and its rows only (never of the rank), so the dataset is byte-identical to a
single-process run, and a run can be resumed with any number of processes.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["world_info", "maybe_init", "barrier", "is_main", "all_gather_object", "local_device"]


def world_info() -> tuple[int, int]:
    """(rank, world_size) of this process: from an initialised process group, else from
    torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def local_device(device=None) -> torch.device:
    """The device this rank should use: ``device`` if given; under torchrun with CUDA,
    ``cuda:LOCAL_RANK``; else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def maybe_init(device: torch.device | None = None) -> tuple[int, int]:
    """Join the default process group when running under torchrun (WORLD_SIZE > 1).

    Backend: nccl when this rank works on a CUDA device, gloo otherwise. An existing group
    is reused. Returns (rank, world_size)."""
    rank, world = world_info()
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if (device is not None and torch.device(device).type == "cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def is_main() -> bool:
    return world_info()[0] == 0


def all_gather_object(obj):
    """Small Python objects from every rank (statistics, never images)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
