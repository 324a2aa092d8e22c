"""What rank r of N holds of a Gemma text decoder, and the layers that put the pieces together.

    q/k/v_proj, gate/up_proj   column-parallel: rank r keeps its heads' rows / its 1/N of the MLP
    o_proj, down_proj          row-parallel: the matching input columns; the block's output is a
                               partial sum, all-reduced (a forward hook on self_attn and mlp)
    embed_tokens (tied head)   vocabulary-parallel: rows [r V/N, (r+1) V/N); a lookup is masked
                               to the rank's rows and all-reduced; the head's logits are gathered
    norms, media embedders     replicated

Query heads split evenly. A layer's KV heads are split with them when N divides them (Gemma 4
12B's 8 sliding KV heads); with fewer KV heads than ranks each rank keeps the one its query
heads read (Gemma 4 12B's full layers and Gemma 3 270M have 1 KV head: every rank holds it,
as vLLM does; K=V full layers need nothing else). Other splits (3 KV heads on 2 ranks) are
refused. `local_config` is the config each rank builds its modules from (heads, MLP width and
KV heads per rank), so attention reshapes, the KV caches and their byte counts see the local
sizes without knowing about parallelism. `ShardedSource` hands the loader each tensor's slice
only (rows read straight from the file), so a rank never holds more than its share plus one
matrix in transit.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, CheckpointError
from ..models.layers import Embedding
from .group import Group


def _local_kv(heads: int, kv: int, world: int) -> int:
    if kv % world == 0:
        return kv // world
    if world % kv == 0:
        return 1
    raise ConfigError(f"--tp {world}: a layer's {kv} key/value heads can neither be split over {world} ranks nor "
                      f"shared by them (use a --tp that divides {kv}, or that {kv} divides)")


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The config rank r builds its modules from: heads, MLP width and KV heads divided by N."""
    t = config.text
    for name in ("num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(t, name) % world:
            raise ConfigError(f"--tp {world}: {name} = {getattr(t, name)} is not divisible by {world}")
    if t.attention_bias:
        raise ConfigError("--tp: attention biases are not supported (the row-parallel o_proj would add its bias N times)")
    H = t.num_attention_heads
    changes = dict(num_attention_heads=H // world, intermediate_size=t.intermediate_size // world,
                   num_key_value_heads=_local_kv(H, t.num_key_value_heads, world))
    if getattr(t, "num_global_key_value_heads", None) is not None:
        changes["num_global_key_value_heads"] = _local_kv(H, t.num_global_key_value_heads, world)
    if getattr(t, "per_layer_config", None):
        changes["per_layer_config"] = {
            k: {**v, **({"num_key_value_heads": _local_kv(H, v["num_key_value_heads"], world)}
                        if "num_key_value_heads" in v else {})}
            for k, v in t.per_layer_config.items()}
    return replace(config, text=replace(t, **changes))


def kv_is_split(config: ModelConfig, world: int) -> list[bool]:
    """Per layer: whether its KV heads are divided among the ranks (else every rank holds them all)."""
    return [kv % world == 0 and kv >= world for kv in config.text.layer_kv_heads]


def tensor_slices(model: nn.Module, config: ModelConfig, rank: int, world: int) -> dict[str, tuple[int, int, int]]:
    """Our tensor name → (dim, start, stop) of the global tensor rank `rank` keeps. `model` is
    the rank's module tree (for the text stack's prefix), `config` the global config."""
    t = config.text
    text = next(n for n, m in model.named_modules() if m is model.text)
    pre = f"{text}." if text else ""
    H, Hl = t.num_attention_heads, t.num_attention_heads // world
    Il, Vl = t.intermediate_size // world, t.vocab_size // world
    out = {f"{pre}embed_tokens.weight": (0, rank * Vl, (rank + 1) * Vl)}
    if not t.tie_word_embeddings:
        out["lm_head.weight"] = (0, rank * Vl, (rank + 1) * Vl)
    for i in range(t.num_hidden_layers):
        hd, kv = t.layer_head_dims[i], t.layer_kv_heads[i]
        first = rank * Hl // (H // kv)  # the KV head the rank's first query head reads
        n_kv = _local_kv(H, kv, world)
        attn, mlp = f"{pre}layers.{i}.self_attn.", f"{pre}layers.{i}.mlp."
        q = (rank * Hl * hd, (rank + 1) * Hl * hd)
        k = (first * hd, (first + n_kv) * hd)
        out[attn + "q_proj.weight"] = (0, *q)
        out[attn + "k_proj.weight"] = (0, *k)
        out[attn + "v_proj.weight"] = (0, *k)  # (absent on K=V layers: never asked for)
        out[attn + "o_proj.weight"] = (1, *q)
        out[mlp + "gate_proj.weight"] = out[mlp + "up_proj.weight"] = (0, rank * Il, (rank + 1) * Il)
        out[mlp + "down_proj.weight"] = (1, rank * Il, (rank + 1) * Il)
    return out


def _slice(t, dim: int, a: int, b: int):
    """A source's tensor record narrowed to [a, b) on `dim` (rows read alone where the source can)."""
    if t.native is not None or len(t.shape) != 2:
        raise CheckpointError(f"{t.file}: tensor {t.key!r} is stored quantized: --tp loads float weights only "
                              "(use a float checkpoint, or --dequantize for a GGUF)")
    rows = t.read_rows

    def read_rows(r0: int, r1: int) -> torch.Tensor:
        if dim == 0:
            return rows(a + r0, a + r1) if rows is not None else t.read()[a + r0:a + r1].clone()
        block = rows(r0, r1) if rows is not None else t.read()[r0:r1]
        return block[:, a:b].contiguous()

    shape = (b - a, t.shape[1]) if dim == 0 else (t.shape[0], b - a)
    return replace(t, shape=shape, read=lambda: read_rows(0, shape[0]), read_rows=read_rows)


class ShardedSource:
    """A tensor source (weights/sources.py) whose tensors are this rank's slices."""

    def __init__(self, source, slices: dict[str, tuple[int, int, int]]):
        self.source, self.slices = source, slices
        self.config, self.describes, self.label = source.config, source.describes, source.label
        self.read_errors = source.read_errors

    def native(self, name: str):
        return None  # float weights only: quantized tensors are dequantized as they are read

    def requantize(self, name: str):
        return None

    def tensors(self):
        for t in self.source.tensors():
            s = self.slices.get(t.name)
            yield t if s is None else _slice(t, *s)

    def close(self) -> None:
        self.source.close()


class VocabParallelEmbedding(Embedding):
    """Rows [lo, lo + rows) of the token table. A lookup takes the rank's rows (zeros for tokens
    elsewhere) and all-reduces: every token's row comes from exactly one rank, so the sum is
    exact. As the tied head, each rank's logits for its rows are gathered on rank 0."""

    def __init__(self, rows: int, hidden: int, lo: int, group: Group):
        super().__init__(rows, hidden)
        self.lo, self.group = lo, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.num_embeddings)
        e = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return self.group.all_reduce(e * inside[..., None].to(e.dtype))

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        return self.group.gather_last(F.linear(h, self.weight))

    def extra_repr(self) -> str:
        return f"rows [{self.lo}, {self.lo + self.num_embeddings}) of the vocabulary, {self.embedding_dim}"


class GatheredHead(nn.Module):
    """An LM head over this rank's vocabulary rows (a packed head, an untied Linear) whose
    logits are gathered on rank 0 in vocabulary order."""

    def __init__(self, inner: nn.Module, group: Group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.group.gather_last(self.inner(h))


def shard_embedding(model: nn.Module, config: ModelConfig, group: Group) -> None:
    """Swap the (meta) token table for this rank's vocabulary-parallel one, before loading."""
    rows = config.text.vocab_size // group.world
    old = model.text.embed_tokens
    with torch.device(old.weight.device):
        model.text.embed_tokens = VocabParallelEmbedding(rows, old.embedding_dim, group.rank * rows, group)


def reduce_partial_sums(model: nn.Module, group: Group) -> None:
    """All-reduce each block's row-parallel outputs (attention after o_proj, the MLP after
    down_proj): hooks on the block's modules, which survive the loader's swaps of their Linears."""
    def hook(module, args, out):
        return group.all_reduce(out)

    for layer in model.text.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


__all__ = ["GatheredHead", "ShardedSource", "VocabParallelEmbedding", "kv_is_split", "local_config",
           "reduce_partial_sums", "shard_embedding", "tensor_slices"]
