"""Data-parallel fine-tuning under torchrun: which rows a rank trains, and the collectives.

    torchrun --nproc-per-node 2 -m unigemma finetune --model M --data D --out O [--fsdp]

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `from_env` then joins the process group (gloo on
CPU, nccl with CUDA, each rank on cuda:LOCAL_RANK). Without them nothing here does anything.

The global batch is `--batch-size`, whatever the world size: every rank draws the same batch
order (one seed) and trains rows rank, rank + N, ... of each micro-batch. So N ranks take the
same steps as one process with the whole batch, and a checkpoint's data position means the same
on any N: N ranks resume on M. The loss is a sum over label tokens divided by the label count of
the whole global batch (all-reduced), and each rank's gradients are summed over ranks, so the
gradient is exactly one process's (up to float summation order). A rank whose share of a short
batch is empty runs one row with no labels: it contributes nothing but still joins every
collective.

Two ways to hold the model:
- replicated (default, DDP): every rank has the whole model; the adapters' gradients are
  all-reduced in one flat buffer after the step's backward. Not torch's DistributedDataParallel
  wrapper: its reducer hooks `model.forward`, which the training forward (loss.py) does not call
  (it runs the layers itself, to checkpoint them); the adapters are small, so overlapping their
  reduction with backward would save little.
- `--fsdp` (FSDP2): `fully_shard` per decoder layer, so each rank holds 1/N of every layer's
  weights (base and adapter) and all-gathers a layer only while running it, for a model that
  does not fit one device. Gradients are reduce-scattered with sums (divide factor 1). The
  embedding, head and norms stay replicated (frozen, and the training forward calls them
  outside any sharded module).

Checkpoints hold full tensors (gathered on every rank, written by rank 0), the same files a
single process writes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import InputError


@dataclass
class Dist:
    """This process's place among the ranks and the collectives the trainer calls; with one
    process (the default) every one of them is a no-op."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    fsdp: bool = False
    layers: list = field(default_factory=list)  # the fully_shard'ed decoder layers (fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, rows: list[int]) -> list[int]:
        """This rank's rows of a global micro-batch (possibly none)."""
        return rows[self.rank::self.world]

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks (float64 on the wire: token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients FSDP has not already reduced (plain tensors) over ranks, in one buffer."""
        if not self.active:
            return
        plain = [p for p in params if not isinstance(p, DTensor)]
        for p in plain:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not plain:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in plain])
        dist.all_reduce(flat)
        for p, g in zip(plain, flat.split([p.numel() for p in plain])):
            p.grad.copy_(g.view_as(p))

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # -- FSDP2 ------------------------------------------------------------------------------------
    def shard(self, model, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """fully_shard each decoder layer (its shard moves to this rank's device), the rest of the
        model moved whole; returns `params` as the sharded parameters that replaced them."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in model.named_parameters()}
        names = [names[id(p)] for p in params]
        mesh = init_device_mesh(torch.device(self.device).type, (self.world,))
        for layer in model.text.layers:
            fully_shard(layer, mesh=mesh)
            layer.set_gradient_divide_factor(1.0)  # sum: the loss is already divided globally
            layer.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
            self.layers.append(layer)
        model.to(self.device)  # the sharded layers are there already
        now = dict(model.named_parameters())
        return [now[n] for n in names]

    @contextlib.contextmanager
    def gathered(self):
        """Every sharded layer unsharded (plain full tensors) for the duration: what saving reads."""
        for layer in self.layers:
            layer.unshard()
        try:
            yield
        finally:
            for layer in self.layers:
                layer.reshard()


@contextlib.contextmanager
def joined(fsdp: bool = False):
    """`from_env` for the duration of a `with`; the process group is left at its end."""
    d = from_env(fsdp)
    try:
        yield d
    finally:
        d.close()


def from_env(fsdp: bool = False) -> Dist:
    """The process group torchrun's environment describes, joined; world 1 without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if fsdp:
            raise InputError("--fsdp shards the model over ranks: run under torchrun with --nproc-per-node 2 or more")
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, device, fsdp)


# -- full tensors for checkpoints ---------------------------------------------------------------
def full(t):
    """A DTensor's whole value (a collective: every rank calls it in the same order); else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_optimizer_state(state: dict) -> dict:
    """optimizer.state_dict() with every sharded moment gathered: the same on every world size."""
    return {**state, "state": {i: {k: full(v) for k, v in s.items()} for i, s in state["state"].items()}}


def shard_optimizer_state(state: dict, params: list) -> dict:
    """The inverse for this run's params: moments of a sharded param distributed like it."""
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {**state, "state": out}


def load_into(p: torch.nn.Parameter, saved: torch.Tensor) -> None:
    """Copy a full saved tensor into `p`, sharded like it when it is."""
    with torch.no_grad():
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(saved.to(p.device), p.device_mesh, p.placements))
        else:
            p.copy_(saved)


def clip_grad_norm(params: list, max_norm: float) -> float:
    """torch's clip_grad_norm_ rule (scale by max_norm / (norm + 1e-6) when above) over gradients
    some of which are sharded: each one's norm is of the whole tensor, gathered."""
    norms = [full(p.grad.detach().norm(2)).to(torch.float64) for p in params if p.grad is not None]
    total = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
