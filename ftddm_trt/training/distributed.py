"""Training across processes: torch.distributed + DistributedDataParallel, started by ``torchrun``.

    torchrun --nproc-per-node 2 -m ftddm_trt.cli.main train --out RUN_DIR --task unet ...

``init_from_env`` reads what torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins the process group: NCCL when the processes train on CUDA (one GPU each, by
local rank), gloo on the CPU. Without those variables it returns a single-process context and
nothing changes.

The global batch of an iteration is ``shards`` shards of ``batch_size / shards`` examples. Shard j of
step k draws its examples and its noise from generators seeded by (seed, k, j), whichever process
computes it, so the global batch does not depend on how many processes share the work: each process
computes ``shards / world_size`` shards (gradient accumulation between them, DDP's all-reduce averaging
across processes), and the gradient is the mean over the shards in every layout. One process with
``shards = 2`` and two processes with one shard each therefore take the same steps, up to float
summation order. ``shards = 1`` is the single-process trainer's own draw, bit for bit.

Only rank 0 writes files (checkpoints, best weights, the log); every rank reads the checkpoint at a
resume. Validation runs on every rank (same weights, same batches), so every rank agrees on ``best``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

#: The trainer's per-step seeds (shard 0 of an unsharded run keeps them, so old runs stay reproducible).
STEP_SEED = 1_000_003


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank and world size (1 and 0 without torchrun), device, backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when several processes train (``world_size > 1``)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel when several processes train, else itself."""
        if not self.enabled:
            return module
        # device_ids=None: inputs are already on this process's device (DDP moves nothing)
        return nn.parallel.DistributedDataParallel(module, device_ids=None)

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of a few scalars (for logging)."""
        if not self.enabled or not values:
            return dict(values)
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist())}

    def any_true(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (e.g. one rank ran out of time)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        """Wait for every process (nothing in a single process)."""
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group (nothing in a single process)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or a single-process context.

    device: auto (CUDA when present), cpu or cuda. Under torchrun on CUDA each process takes
    ``cuda:LOCAL_RANK`` and NCCL; on the CPU gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda:"):
        use_cuda = True
    if world <= 1:
        dev = torch.device(device if device not in ("auto",) else ("cuda" if use_cuda else "cpu"))
        return DistContext(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {rank}: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend)


class ObjectiveModule(nn.Module):
    """``forward(batch, generator) = objective(net, batch, generator)``: the whole loss inside one
    forward, so that DDP sees every parameter use (the flow's loss calls ``nll`` and ``reverse``)."""

    def __init__(
        self, net: nn.Module, objective: Callable[[nn.Module, Any, torch.Generator], tuple[torch.Tensor, dict]]
    ) -> None:
        super().__init__()
        self.net = net
        self.objective = objective

    def forward(self, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """``(loss, logs)`` of ``objective(net, batch, generator)``."""
        return self.objective(self.net, batch, generator)


def shard_generators(seed: int, step: int, shard: int, shards: int) -> tuple[np.random.Generator, torch.Generator]:
    """(example generator, noise generator) of shard ``shard`` of step ``step``."""
    if shards == 1:  # the single-process trainer's draw, unchanged
        return np.random.default_rng([seed, step]), torch.Generator().manual_seed(seed * STEP_SEED + step)
    return (np.random.default_rng([seed, step, shard]),
            torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, shard, 1]).generate_state(1)[0])))


def check_shards(shards: int, batch_size: int, ctx: DistContext) -> None:
    """ValueError unless ``shards`` is a multiple of the process count and divides ``batch_size``."""
    if shards < 1 or shards % ctx.world_size or batch_size % shards:
        raise ValueError(f"shards ({shards}) must be a multiple of the process count ({ctx.world_size}) and divide "
                         f"the batch size ({batch_size})")


def backward_step(
    ctx: DistContext,
    step_model: nn.Module,
    draw: Callable[[np.random.Generator, int], Any],
    seed: int,
    step: int,
    batch_size: int,
    shards: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward of this process's shards of step ``step``; gradients end up averaged over
    all shards of all processes. ``draw(rng, n)`` returns a batch of n examples on the device.

    Returns (the global mean loss, a detached scalar; the global mean of the logged parts).
    """
    check_shards(shards, batch_size, ctx)
    local = shards // ctx.world_size
    per_shard = batch_size // shards
    losses: list[float] = []
    parts_sum: dict[str, float] = {}
    for i in range(local):
        j = ctx.rank * local + i
        rng, gen = shard_generators(seed, step, j, shards)
        batch = draw(rng, per_shard)
        sync = nullcontext() if (i == local - 1 or not ctx.enabled) else step_model.no_sync()
        with sync:
            loss, parts = step_model(batch, gen)
            (loss / local).backward()
        losses.append(float(loss.detach()))
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
    means = ctx.all_reduce_mean({"loss": float(np.mean(losses)), **{k: v / local for k, v in parts_sum.items()}})
    loss = torch.tensor(means.pop("loss"))
    return loss, means
