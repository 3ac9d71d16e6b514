"""Multi-process training through PyTorch's own engine: ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK,
this module joins the process group (gloo on CPU, nccl on CUDA) and wraps the model in
``DistributedDataParallel`` or FSDP2's ``fully_shard`` (torch.distributed.fsdp). Nothing is home-made:
gradient averaging, sharding and the all-gathers are PyTorch's."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> World:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return World(rank, size, local_rank, device)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """DDP (every rank holds the whole model; gradients all-reduced) or FSDP2 (each block and the root
    sharded with ``fully_shard``; parameters become DTensors). A world of one returns ``model``."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    # find_unused_parameters: some mechanisms hold parameters the LM loss does not reach (e.g. a
    # lightning indexer, which only selects entries)
    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def no_sync(wrapped: nn.Module, last_micro_batch: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not last_micro_batch:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
