"""Loading rank r's shard of a checkpoint, and the two roles a loaded rank takes.

    model = load_shard(path, group, dtype="bfloat16")   # every rank: its 1/N of the weights
    lead(model, group)                                   # rank 0: mirror its model calls (tp/mirror.py)
    follow_model(model, group)                           # the others: run them, until told to stop

The rank's modules are built on the meta device from `local_config` (tp/shard.py), the token
table swapped for its vocabulary-parallel slice, and weights/placer.py places the slices the
sharded source reads: the same strict, one-tensor-at-a-time load as one process, packing the
decoder's Linears for oneDNN (the CPU fast path) as they come. Float weights only (fp32, bf16;
a GGUF's quantized tensors with `dequantize`); quantizing under TP is refused. Afterwards the
LM head gathers its logits on rank 0 and every block all-reduces its partial sums.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import UnigemmaError
from ..models.packed import PackedHead
from ..weights.hub import resolve
from ..weights.loader import build_model, open_source
from ..weights.options import LoadOptions
from ..weights.placer import Placer
from .group import Group
from .mirror import Leader, follow
from .shard import (GatheredHead, ShardedSource, kv_is_split, local_config, reduce_partial_sums, shard_embedding,
                    tensor_slices)


def load_shard(path: str | os.PathLike, group: Group, dtype="bfloat16", block_mask: str = "sliding",
               progress: bool = False, pack: bool = True, mmproj=None, dequantize: bool = False,
               quant: str | None = None) -> nn.Module:
    """This rank's shard of the checkpoint at `path` (a directory, a GGUF file or a hub id).
    `model.config` is the rank's local config; `model.full_config` the checkpoint's."""
    if quant is not None:
        raise UnigemmaError("--tp loads float weights: quantizing a sharded model (--quant) is not supported yet")
    options = LoadOptions.parse(dtype, group.device, None, dequantize, pack, block_mask, progress and group.is_leader)
    source = open_source(resolve(path), mmproj)
    try:
        config = source.config
        if options.scheme_for(config, source.describes) is not None:
            raise UnigemmaError(f"{source.describes}: a quantized checkpoint cannot be loaded with --tp (float only)")
        model = build_model(local_config(config, group.world), options.block_mask, None, options.dtype)
        shard_embedding(model, config, group)
        slices = tensor_slices(model, config, group.rank, group.world)
        model = Placer(model, options, source.describes).stream(ShardedSource(source, slices))
    finally:
        source.close()
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, (PackedHead, nn.Linear)):  # a tied table's packed copy, or an untied head
        model.lm_head = GatheredHead(lm_head, group)
    reduce_partial_sums(model, group)
    model.full_config, model.tp_group = config, group
    return model


def _after(model: nn.Module, group: Group) -> dict:
    """What every rank does after a top-level call: `kv_for` (the MTP drafter reads the
    target's K/V on rank 0) gathers the heads a split layer holds on each rank."""
    split = kv_is_split(model.full_config, group.world)

    def kv_for(cache, args, kwargs, out):
        layer = args[0] if args else kwargs["layer"]
        if not split[layer]:
            return out
        k, v, idx = out
        return group.all_gather(k, 1), group.all_gather(v, 1), idx
    return {"kv_for": kv_for}


def _targets(model: nn.Module) -> dict:
    return {"model": model, "text": model.text}


def lead(model: nn.Module, group: Group, grace_s: float | None = 2.0) -> Leader:
    """Rank 0: from now on the model's entry points and the KV caches drive the other ranks."""
    leader = Leader(group, _targets(model), _after(model, group), grace_s)
    for name in ("forward", "embed", "head"):
        leader.wrap(model, name)
    leader.wrap(model.text, "embed")  # the MTP drafter's token lookup
    return leader


def follow_model(model: nn.Module, group: Group) -> int:
    """A non-zero rank: run rank 0's calls until it stops (returns 0) or is lost (1)."""
    return follow(group, _targets(model), _after(model, group))


def run_rank(path: str | os.PathLike, group: Group, **load) -> int:
    """A non-zero rank's whole life: load its shard, follow rank 0; the exit status."""
    return follow_model(load_shard(path, group, **load), group)


__all__ = ["follow_model", "lead", "load_shard", "run_rank"]
