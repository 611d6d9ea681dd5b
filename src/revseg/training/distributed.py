"""DistributedDataParallel plumbing for ``torchrun --nproc_per_node=N train.py trainer=ddp``.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous variables; each process
trains on its shard of the data (``DistributedSampler``), DDP averages the gradients, every rank
validates, rank 0 takes the decisions (best checkpoint, early stopping) and broadcasts them, and
only rank 0 logs and writes files. A one-process torchrun wraps the model in DDP too, so the DDP
path can be checked on a one-GPU node. NCCL is the backend on CUDA, gloo on CPU.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from revseg.errors import ConfigError

__all__ = [
    "DistInfo",
    "end_process_group",
    "init_distributed",
    "local_cuda_index",
    "training_device",
    "shard_loader",
    "all_ranks_agree",
    "broadcast_object",
    "gather_objects",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, GPU ``local_rank``;
    ``backend`` is set once this process joined a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """Distributed: several processes, or a process group of one (``trainer.strategy=ddp``
        under a one-process torchrun): the model is wrapped in DDP and the collectives run."""
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(strategy: str, backend: str = "auto", device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun prepared (``strategy="ddp"``, even of one process), or
    run alone (``strategy="single"``).

    Raises:
        ConfigError: ``trainer.strategy=ddp`` without torchrun's environment, an unknown
            strategy or backend, or a ``LOCAL_RANK`` without a GPU of its own.
    """
    if strategy == "single":
        return DistInfo()
    if strategy != "ddp":
        raise ConfigError(f"trainer.strategy must be single or ddp, got {strategy!r}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "trainer.strategy=ddp needs torchrun: "
            "torchrun --nproc_per_node=N train.py trainer=ddp ..."
        )
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"trainer.ddp_backend must be auto, nccl or gloo, got {backend!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_cuda_index(local_rank))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def local_cuda_index(local_rank: int) -> int:
    """The GPU of the process with ``LOCAL_RANK=local_rank``: that index where this process
    sees a GPU per local rank, ``0`` where it sees one GPU (a scheduler giving each task its own
    through ``CUDA_VISIBLE_DEVICES``).

    Raises:
        ConfigError: more processes on this node than visible GPUs (two ranks would share one).
    """
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if 0 <= local_rank < count:
        return local_rank
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={visible}): start at most {count} processes per node "
        f"(torchrun --nproc_per_node={count}), or give each task one GPU"
    )


def training_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device this process trains on, made CUDA's current device: the local rank's GPU
    when distributed, else ``device`` (``trainer.device=cuda:N``). Without ``set_device``,
    pinned batches, ``torch.cuda.synchronize()`` and new streams would open a context on GPU 0."""
    if device.type != "cuda":
        return device
    if info.enabled:
        device = torch.device("cuda", local_cuda_index(info.local_rank))
    if device.index is not None:
        torch.cuda.set_device(device)
    return device


def shard_loader(
    loader: DataLoader, info: DistInfo, seed: int, epoch: int, shuffle: bool
) -> DataLoader:
    """The same loader over this rank's shard: a ``DistributedSampler`` reshuffled per epoch
    (it repeats a few samples so that every rank takes as many steps).

    The loader keeps its class (MONAI's ``DataLoader`` seeds the random transforms of each
    worker through ``worker_init_fn``, and of the main process from the generator), its worker
    settings, and a generator seeded from the data module's (``seed + epoch``) and the rank: the
    random augmentation differs between epochs and between ranks, and a resumed epoch draws the
    same stream again.
    """
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    base = loader.generator.initial_seed() if loader.generator is not None else seed + epoch
    generator = torch.Generator().manual_seed(base * info.world_size + info.rank)
    workers: dict[str, Any] = {}
    if loader.num_workers > 0:
        workers = {
            "persistent_workers": loader.persistent_workers,
            "prefetch_factor": loader.prefetch_factor,
            "multiprocessing_context": loader.multiprocessing_context,
            "timeout": loader.timeout,
        }
    return type(loader)(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=generator,
        **workers,
    )


def all_ranks_agree(flag: bool | torch.Tensor, info: DistInfo, device: torch.device) -> bool:
    """``True`` only if ``flag`` holds on every rank (so that all ranks take the same branch).

    A tensor ``flag`` (a boolean on ``device``) is read once, after the reduction: the one
    host synchronisation of the call.
    """
    value = torch.as_tensor(flag, device=device).reshape(1).to(torch.int32)
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def max_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def end_process_group(synchronize: bool = True) -> None:
    """Destroy the default process group so that no rank hangs or aborts on the way out.

    Drop every reference to the DistributedDataParallel wrappers first: they are freed here
    (reference cycles collected) while the group lives. A wrapper freed after the group was
    destroyed takes the group's last reference with it, and the group's destructor then joins
    gloo's threads while holding the GIL: one of them may need the GIL to free a finished work's
    thread-local Python object (a hang), and at interpreter exit a thread left running aborts the
    process ("terminate called without an active exception").

    Args:
        synchronize: the ranks first leave together, through a barrier and a pause that lets
            go of the GIL so that gloo's threads finish freeing their work (False after an
            error, when another rank may never arrive).
    """
    if synchronize:
        dist.barrier()
        time.sleep(0.05)
    gc.collect()
    dist.destroy_process_group()
