"""Data parallel training under torchrun: one process per device, DDP or FSDP, rank 0 writes.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op. The
backend is NCCL on GPUs and gloo on CPU (which is how the distributed path is tested here).

Every rank reads its own micro-batches of each step (data.Batches.micro_batch), so one process with
``--grad-accum W``, DDP on W ranks and FSDP on W ranks average the gradients of the same sequences
and compute the same run (tests/train/test_train_dist.py holds them to 1e-5).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)

    def init(self, device: torch.device) -> None:
        if not self.enabled or tdist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)

    def device_for(self, device: torch.device) -> torch.device:
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def mean(self, value: float, device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return t.item() / self.world

    def sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        tdist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device) -> bool:
        """True on every rank if it is True on any (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def broadcast_obj(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            # collected first: work handles caught in reference cycles (FSDP's state has them) would otherwise be
            # freed at interpreter exit, with gloo's threads gone (seen once under load: "terminate called
            # without an active exception", SIGABRT in a rank that had finished)
            gc.collect()
            tdist.destroy_process_group()


def wrap(model, dist: Dist, device: torch.device, fsdp: bool, amp_dtype: torch.dtype = torch.float32):
    """DDP (or FSDP2 with --fsdp) around ``model``; returns (wrapped, raw).

    Every rank must hold the same weights before this (a seeded init or a loaded checkpoint). FSDP2
    replaces each parameter with a sharded one: whatever lists parameters (the optimizer, clipping)
    must take them from ``raw`` after this call, never from before it.
    """
    if not dist.enabled:
        return model, model
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # here: FSDP's modules take a second or two to import

        kw = {"mp_policy": mixed_precision(amp_dtype)}
        for block in model.transformer.h:
            fully_shard(block, **kw)
        fully_shard(model, **kw)  # the root holds wte (tied to lm_head: one parameter, sharded once), wpe, ln_f
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids), model


def mixed_precision(amp_dtype: torch.dtype):
    """FSDP2's policy: 16-bit copies for compute, fp32 master weights, fp32 gradient reduce-scatter.

    With bf16 the all-gathered weights are bf16 (half the traffic and memory of fp32) while the
    sharded parameters the optimizer updates stay fp32, and gradients are averaged in fp32 so the
    sum over ranks loses nothing. fp16 keeps fp32 parameters under autocast: its GradScaler
    unscales fp32 gradients, and fp16 weight copies would overflow where bf16 does not.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy  # here: see wrap

    if amp_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def full_state(model, optimizer, fsdp: bool, dist: Dist):
    """Full (unsharded) model and optimizer state dicts on CPU; under FSDP every rank must call this."""
    if fsdp and dist.enabled:
        # here: torch.distributed.checkpoint takes a second or two to import, and only FSDP needs it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model.state_dict(), optimizer.state_dict()


def load_full_state(model, optimizer, model_sd, optim_sd, fsdp: bool, dist: Dist) -> None:
    if fsdp and dist.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        if model_sd is not None:
            set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    if model_sd is not None:
        model.load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)
