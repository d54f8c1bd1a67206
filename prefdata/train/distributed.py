"""Data parallel training under ``accelerate launch`` (or ``torchrun``): same config, N processes.

Every process holds the whole model and takes rows ``rank::world`` of each global batch;
after the backward pass the gradients are summed across processes with one all-reduce
over a flat buffer per step — what DDP computes, without its bucketed overlap — so N
processes take exactly the steps one process takes with the same global ``batch_size``.
Process 0 writes the reference cache (the others wait, then read it), the logs, the
checkpoints and the final model; evaluation runs on process 0. One process (no
``WORLD_SIZE`` in the environment) needs none of this and starts no process group.
"""

from __future__ import annotations

import os

import numpy as np
import torch


class Ranks:
    def __init__(self, cfg):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device = 0, None
        self.bucket_bytes = int(float(os.environ.get("PREFDATA_ALLREDUCE_BUCKET_MB", "25")) * 2**20)
        if self.world > 1:
            from accelerate import PartialState

            check_launch(cfg, self.world)
            state = PartialState(cpu=cfg.device == "cpu")
            self.rank, self.world = state.process_index, state.num_processes
            self.device = "cpu" if cfg.device == "cpu" else str(state.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, batch: np.ndarray) -> np.ndarray:
        return batch[self.rank::self.world]

    def sum_gradients(self, params) -> None:
        """Sum gradients across processes in buckets of at most ``bucket_bytes``.

        One flat copy of every gradient would double gradient memory (28 GB more for a 7B
        model in fp32); buckets bound the extra memory, as DDP's do, at the cost of a few
        more collective calls. Summation is elementwise, so the result does not depend on
        the bucket size (tested).
        """
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in grad_buckets([p.grad for p in params], self.bucket_bytes):
            if len(bucket) == 1:
                torch.distributed.all_reduce(bucket[0])
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g))
                offset += n

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather(self, parts: list[dict]) -> list[dict]:
        """Every process's per-micro-batch stats, on CPU (for the step's reward accuracy, margins)."""
        if self.world == 1:
            return parts
        local = [{k: v.cpu() for k, v in p.items()} for p in parts]
        everyone = [None] * self.world
        torch.distributed.all_gather_object(everyone, local)
        return [p for rank_parts in everyone for p in rank_parts]


def grad_buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive gradients grouped so that each group holds at most ``bucket_bytes``
    (a single larger gradient is its own group); groups never mix dtypes or devices."""
    buckets, current, size = [], [], 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if current and (size + nbytes > bucket_bytes or g.dtype != current[0].dtype
                        or g.device != current[0].device):
            buckets.append(current)
            current, size = [], 0
        current.append(g)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def check_launch(cfg, world: int) -> None:
    """A launcher setting that contradicts the recipe is an error naming both."""
    if cfg.batch_size % world:
        raise ValueError(f"train config: batch_size {cfg.batch_size} is not a multiple of the {world} launched "
                         "processes; the global batch is split evenly across them")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise ValueError("accelerate launch with FSDP or DeepSpeed: the bundled trainer shards data, not weights "
                         "(every process holds the whole model, as DDP does); launch with --multi_gpu, or train "
                         "a large model with LoRA (lora_r) so one process fits it")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = "bf16" if cfg.precision == "bf16" else "no"
    if launched != wanted:
        raise ValueError(f"accelerate launch --mixed_precision {launched} conflicts with the recipe's precision: "
                         f"{cfg.precision}; set them to agree (precision: bf16 <-> --mixed_precision bf16)")
