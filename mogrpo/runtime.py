"""Where a training run executes, for every trainer (the policy algorithms and the reward
model): the accelerator (one process, DDP, FSDP or DeepSpeed, all through accelerate), the
device, CPU threads, seeds, and the collectives that gather sharded state whole to save it
and scatter it back to load it. Without sharding these are the modules' own state dicts.

Multi-process (`accelerate launch`): whatever a trainer needs over the processes it reduces
with `all_sum` / `acc.gather`; `owned_share` weights a process's part of a minibatch so that
the averaged gradient equals the single-process one.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager, nullcontext
from typing import Callable

import numpy as np
import torch

NO_DEEPSPEED_CHECKPOINTS = ("resumable checkpoints are not written under DeepSpeed: set "
                            "save_every=0 (final/ "
                            "is still saved), or shard with FSDP (configs/accelerate/fsdp.yaml)")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_sum(acc):
    """x -> the elementwise sum of x over the processes (identity for one process)."""
    if acc.num_processes == 1:
        return lambda x: x
    return lambda x: acc.reduce(x, reduction="sum")  # a new tensor; x is left as it is


def sharding(acc) -> str | None:
    """'fsdp' or 'deepspeed' when the processes shard the weights (accelerate's FSDP or
    DeepSpeed plugin), else None (one process, DDP)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp",
            DistributedType.DEEPSPEED: "deepspeed"}.get(acc.distributed_type)


@contextmanager
def full_weights(model: torch.nn.Module, acc):
    """Every weight of `model` whole on this process inside the context, for what bypasses
    the sharded forward (sampling with `generate`, reading LoRA weights to merge): FSDP2
    all-gathers its modules once (and keeps them gathered through the forwards inside),
    DeepSpeed ZeRO-3 gathers its partitions. A no-op without sharding. Collective: every
    process must enter it. Costs one full copy of the weights per process while inside."""
    kind = sharding(acc)
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        reshard = getattr(acc.state.fsdp_plugin, "reshard_after_forward", True) is not False
        for m in units:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(reshard, recurse=False)
    elif kind == "deepspeed" and getattr(acc.state.deepspeed_plugin, "zero_stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
    else:
        yield


@contextmanager
def _deepspeed_boundary(acc, sync: bool):
    acc.gradient_state._set_sync_gradients(sync)
    try:
        yield
    finally:
        acc.gradient_state._set_sync_gradients(True)


def owned_share(members: list[int], n_local: int, rank: int, sizes: torch.Tensor
                ) -> tuple[list[int], float]:
    """This process's part of a global minibatch, and the weight of its local mean loss.

    `members` are global row indices; process r holds rows [r * n_local, (r + 1) * n_local).
    `sizes` [N] are the global per-row denominators of a mean loss (token counts for a
    token mean, ones for a per-row mean). Returns (local row indices, weight) with weight =
    world * (this process's share of the minibatch's total size), so that the gradient
    average DDP takes over the processes of (weight * local mean) equals the gradient of
    the single-process mean over the whole minibatch. The weight is 0 when no row is owned.
    """
    world = sizes.numel() // n_local
    mine = [i - rank * n_local for i in members if rank * n_local <= i < (rank + 1) * n_local]
    total = float(sizes[members].sum())
    part = float(sizes[[rank * n_local + j for j in mine]].sum()) if mine else 0.0
    return mine, (world * part / total if total > 0 else 0.0)


def norm_tensor(norm, device: torch.device) -> torch.Tensor:
    """A gradient norm as a plain 0-dim float tensor: FSDP2 returns a DTensor (its full value
    is taken), DeepSpeed None (it clips inside its own step; the norm is then NaN)."""
    if norm is None:
        return torch.full((), float("nan"), device=device)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return torch.as_tensor(norm, device=device).detach().float()


class Runtime:
    """The accelerator and what follows from it: world, rank, main, device, threads (cores /
    processes unless `num_threads`), and state gathered or scattered as the modules are
    sharded. `device`: auto (CUDA when there is one) | cpu | cuda. `check_world(world)` runs
    before anything is loaded or written."""

    def __init__(self, *, num_threads: int = 0, device: str = "auto",
                 check_world: Callable[[int], None] | None = None):
        from accelerate import Accelerator

        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        # A prepared scheduler otherwise steps once per process per optimiser step (accelerate
        # assumes the batch grew with the processes); here the global batch is fixed, so 1 step.
        self.acc = acc = Accelerator(cpu=cpu, step_scheduler_with_optimizer=False)
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.device = acc.device
        self.sharding = sharding(acc)
        if check_world is not None:
            check_world(self.world)
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // self.world))

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return all_sum(self.acc)(x)

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    def close(self) -> None:
        """The end of a run, called by every process: wait until every process gets here, then
        tear down the process group (when one was initialised), so that a process that is
        done first does not exit while another still talks to it (gloo then aborts that one).
        Safe to call again, and with one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self.acc.wait_for_everyone()
        self.acc.state.destroy_process_group()  # not when fork-launched (a notebook's processes)

    def no_sync(self, model, sync: bool):
        """Gradient accumulation: skip DDP's all-reduce except on the micro-batch that syncs.
        Under DeepSpeed the engine steps inside `backward` at an accumulation boundary, so
        only the micro-batch that syncs may be one (the engine's own accumulation is 1)."""
        if self.sharding == "deepspeed":
            return _deepspeed_boundary(self.acc, sync)
        return nullcontext() if sync or self.world == 1 else self.acc.no_sync(model)

    def gathered_state(self, module) -> dict | None:
        """The whole state dict of `module` on the main process when the weights are sharded
        (a collective: every process calls it), else None."""
        if self.sharding is None:
            return None
        full = self.acc.get_state_dict(module)
        # A tied weight (an output head sharing the embedding) is gathered under both names; keep
        # one, as an unsharded save does.
        inner = self.acc.unwrap_model(module)
        names = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}
        return {k: v for k, v in full.items() if k in names}

    def module_state(self, module) -> dict:
        """A module's whole state dict for a checkpoint, gathered when sharded."""
        full = self.gathered_state(module)
        return full if full is not None else self.acc.unwrap_model(module).state_dict()

    def load_module_state(self, module, state: dict, strict: bool = True) -> None:
        """Load whole tensors into a module, sharding them as the module is sharded."""
        if self.sharding == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True,
                                                                         strict=strict))
        else:
            self.acc.unwrap_model(module).load_state_dict(state, strict=strict)

    def optimizer_state(self, opt, root: torch.nn.Module) -> dict:
        """The optimiser's state, whole (keyed by parameter names when sharded: a collective;
        `root` holds every module the optimiser steps)."""
        if self.sharding is None:
            return opt.state_dict()
        if self.sharding == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            return get_optimizer_state_dict(root, opt.optimizer,
                                            options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        raise ValueError(NO_DEEPSPEED_CHECKPOINTS)

    def load_optimizer_state(self, opt, root: torch.nn.Module, state: dict) -> None:
        if self.sharding == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(root, opt.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state)
