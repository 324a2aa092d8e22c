"""Preallocated KV cache: full layers sized to the request, sliding layers as ring buffers.

Every layer's K/V live in a fixed buffer `[B, kv_heads, capacity, head_dim]`. A token at
sequence index `i` is stored in slot `i % capacity`. Full layers get `capacity = max_len`, so
they never wrap; sliding layers get `window - 1 + reserve` slots, so their memory is capped
however long the conversation. `reserve` is how many tokens can be written in one step without
a copy, and how many can be rolled back (`trim`) while every query still sees its whole window
(speculative decoding rolls back rejected drafts).

Bookkeeping is per layer *type* (all layers of a type are written identically): `slot_idx[s]`
is the sequence index held by slot `s`, or -1. Masks are built from it (models/masks.py), so
the attention never needs the ring in order. The cache knows nothing about the model's math.

The protocol both caches (this one and cache/batch.py's rows) speak to the engine: `begin` /
`update` / `end` / `abort` around one forward, `positions`, `length`, `can_trim(n, row=0)` /
`trim(n, row=0)`, and `kv_for(layer, row)` (the drafter reads the target's K/V through it).
`ring_capacity` is the one place the size of a ring is decided.

Storage per layer is a tuple of tensors, each with its row axis at dim 0 and its slot axis at
dim 2, so code that copies rows or slots (cache/batch.py insert/save/remove, `grow`) copies
every tensor of the tuple alike: `(k, v)` in a float dtype, or, for a layer stored in int8
(`kv_dtype="int8"`, cache/quant.py), `(k_codes, v_codes, k_scale, v_scale)` with fp16 scales
`[B, H, capacity, head_dim // 32]`. `layer_dtypes` decides which layers get which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import FULL, SLIDING, TextConfig
from ..tp.mirror import mirrored
from .quant import SCALE_DTYPE, Int8KV, group_size, quantize


# Keys are attended in whole blocks of this many slots (see `begin`): one of the tricks behind
# "a token's output does not depend on how many tokens share its forward" (models/attention.py).
KEY_BLOCK = 64
# Spare ring slots past the window: tokens one forward may write without a copy, and tokens a
# rollback may give back. A chat session wants more (generate/engine.py CHAT_RESERVE).
RESERVE = 16


# --kv-cache-dtype: "auto" stores K/V in the model's float dtype; int8 adds scales per token, KV
# head and 32 channels (cache/quant.py). fp8 is left out: no CPU kernel reads it, and int8 with
# its scales is as small.
KV_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
             "int8": torch.int8}
# --kv-quant-layers: the layer types the KV dtype applies to; the others keep the model's dtype.
# Sliding layers are capped at their window, full layers grow with the context, so "full" is
# the long-context saving and "sliding" the many-rows one (spec field notes section 4).
QUANT_LAYERS = {"all": (FULL, SLIDING), "full": (FULL,), "sliding": (SLIDING,)}
# None: int8 on the full layers only (measured on Gemma 3 270M, bench/kv_quality.py: there it
# stays within bf16's own rounding noise, KL 0.0007 and top-1 99%, where the sliding layers
# double the KL and lose 1% of top-1), a float dtype on all layers.
DEFAULT_QUANT_LAYERS = {"int8": "full"}


def layer_dtypes(dtype: torch.dtype, kv_dtype: str = "auto", quant_layers: str | None = None) -> dict[str, torch.dtype]:
    """Layer type → storage dtype (torch.int8: codes plus scales) for a model in `dtype`."""
    quant_layers = quant_layers or DEFAULT_QUANT_LAYERS.get(kv_dtype, "all")
    if kv_dtype not in KV_DTYPES:
        hint = " (fp8 needs a GPU kernel this engine does not have; int8 is as small)" if "fp8" in str(kv_dtype) else ""
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}{hint}")
    if quant_layers not in QUANT_LAYERS:
        raise ValueError(f"kv_quant_layers must be one of {', '.join(QUANT_LAYERS)}, got {quant_layers!r}")
    chosen = KV_DTYPES[kv_dtype] or dtype
    return {t: chosen if t in QUANT_LAYERS[quant_layers] else dtype for t in (FULL, SLIDING)}


def ring_capacity(max_len: int, window: int, reserve: int = RESERVE) -> dict[str, int]:
    """Slots per layer type for a sequence of up to `max_len` tokens: full layers hold every
    token, sliding layers a ring of the window (less the query itself) plus `reserve`."""
    return {FULL: max_len, SLIDING: min(max_len, window - 1 + reserve)}


@dataclass
class Step:
    """What one forward of S new tokens does to the slots of one layer type."""

    concat: bool  # attend over cat(old slots, new K/V): writing first would evict needed keys
    new_idx: torch.Tensor  # [n] sequence indices of the last n = min(S, capacity) new tokens
    write_slots: torch.Tensor  # [n] their slots (new_idx % capacity)
    write_start: int | None  # first slot when they are contiguous (a plain slice write)
    num_keys: int  # slots attended after writing (when not concat)
    k_idx: torch.Tensor  # [K] sequence index of each attended key, -1 for an empty slot
    k_valid: torch.Tensor  # [B, K] False for padding keys


class KVCache:
    @mirrored  # tensor parallelism: rank 0 makes every rank run it (tp/mirror.py)
    def __init__(self, config: TextConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", reserve: int = RESERVE,
                 kv_dtype: str = "auto", quant_layers: str | None = None):
        """dtype: the model's float dtype (what `update` gets and `kv_for` returns);
        kv_dtype / quant_layers: how K/V are stored (`layer_dtypes`)."""
        self.config, self.batch, self.max_len = config, batch, max_len
        self.dtype, self.kv_dtype, self.quant_layers = dtype, kv_dtype, quant_layers
        self.layer_dtypes = layer_dtypes(dtype, kv_dtype, quant_layers)
        self.length = 0  # tokens written so far (sequence index of the next token)
        self.reserve = reserve
        self.window = config.sliding_window
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # padding mask by index
        self.capacity = ring_capacity(max_len, self.window, reserve)
        self.slot_idx = {t: torch.full((c,), -1, dtype=torch.long, device=device) for t, c in self.capacity.items()}
        self.layers = [make_layer(batch, config.layer_kv_heads[i], self.capacity[t], config.layer_head_dims[i],
                                  self.layer_dtypes[t], device) for i, t in enumerate(config.layer_types)]
        self.steps: dict[str, Step] = {}
        self._pending = 0
        self.broken = False

    # -- one forward: begin → update per layer → end -------------------------------------
    def begin(self, valid_new: torch.Tensor) -> dict[str, Step]:
        """Plan writing S new tokens (valid_new [B, S]: False for left padding) for every type."""
        S = valid_new.shape[1]
        if self.broken:
            raise RuntimeError("this KV cache was left half-written by a failed forward; start a new one")
        if self.length + S > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.length} used, {S} more requested")
        start, device = self.length, valid_new.device
        self.valid[:, start:start + S] = valid_new
        self.steps, self._pending = {}, S
        for t, cap in self.capacity.items():
            n = min(S, cap)
            first = start + S - n
            new_idx = torch.arange(first, start + S, device=device)
            contiguous = first // cap == (start + S - 1) // cap
            # Writing first is safe unless the step overwrites a slot that the first new query
            # still needs (its window reaches back window-1 tokens). Full layers never wrap.
            concat = t == SLIDING and start + S > cap and S > cap - (self.window - 1)
            slots = self.slot_idx[t]
            if concat:
                k_idx = torch.cat([slots, torch.arange(start, start + S, device=device)])
                num_keys = cap
            else:
                # Attend a whole number of KEY_BLOCKs (the rest masked): attention kernels sum
                # in an order that depends on the key count, so with it fixed, a token's output
                # does not depend on how many tokens share its forward (a one-token step equals
                # the same token in a verify forward, bit for bit).
                num_keys = min(cap, -(-(start + S) // KEY_BLOCK) * KEY_BLOCK)
                after = slots.clone()
                after[new_idx % cap] = new_idx
                k_idx = after[:num_keys]
            k_valid = self.valid[:, k_idx.clamp(min=0)] & (k_idx >= 0)
            self.steps[t] = Step(concat, new_idx, new_idx % cap, first % cap if contiguous else None,
                                 num_keys, k_idx, k_valid)
        return self.steps

    def query_index(self, S: int) -> torch.Tensor:
        """[S] sequence indices of the tokens this step writes (call between begin and end)."""
        return torch.arange(self.length, self.length + S, device=self.valid.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v [B, H, S, D] for `layer`; return the keys/values to attend:
        float tensors, or for an int8 layer two `Int8KV` (what the cache holds, this step's
        tokens included: a token is read back exactly as it will be read by later steps)."""
        step = self.steps[self.config.layer_types[layer]]
        bufs = self.layers[layer]
        new = as_stored(k, v, bufs)
        n = step.new_idx.shape[0]
        if step.concat:
            attended = tuple(torch.cat([buf, x], dim=2) for buf, x in zip(bufs, new))
        for buf, x in zip(bufs, new):
            if step.write_start is not None:
                buf[:, :, step.write_start:step.write_start + n] = x[:, :, -n:]
            else:
                buf[:, :, step.write_slots] = x[:, :, -n:]
        if not step.concat:
            attended = tuple(buf[:, :, :step.num_keys] for buf in bufs)
        return as_attended(attended)

    def end(self) -> None:
        """Commit the slot bookkeeping once every layer has written."""
        for t, step in self.steps.items():
            self.slot_idx[t][step.write_slots] = step.new_idx
        self.length += self._pending
        self.steps, self._pending = {}, 0

    def abort(self) -> None:
        """A forward failed between begin() and end(): some layers may have overwritten ring
        slots that the bookkeeping still lists, so the cache can no longer be trusted."""
        self.steps, self._pending, self.broken = {}, 0, True

    @mirrored
    def grow(self, max_len: int) -> None:
        """Make room for `max_len` tokens in all (a chat's next turn), keeping what is cached."""
        if max_len <= self.max_len:
            return
        valid = torch.zeros(self.batch, max_len, dtype=torch.bool, device=self.valid.device)
        valid[:, :self.max_len] = self.valid
        capacity = ring_capacity(max_len, self.window, self.reserve)
        for i, t in enumerate(self.config.layer_types):
            old = self.capacity[t]
            if capacity[t] != old:
                # A capacity only changes while it was >= the length (no slot has wrapped), so
                # slot s still holds token s in the bigger buffer.
                grown = []
                for buf in self.layers[i]:
                    new = buf.new_zeros(*buf.shape[:2], capacity[t], buf.shape[3])
                    new[:, :, :old] = buf
                    grown.append(new)
                self.layers[i] = tuple(grown)
        for t in self.slot_idx:
            if capacity[t] != self.capacity[t]:
                slots = torch.full((capacity[t],), -1, dtype=torch.long, device=self.valid.device)
                slots[:self.capacity[t]] = self.slot_idx[t]
                self.slot_idx[t] = slots
        self.capacity, self.valid, self.max_len = capacity, valid, max_len

    # -- rollback ----------------------------------------------------------------------
    def can_trim(self, n: int, row: int = 0) -> bool:
        """A ring can give back at most `reserve` tokens and still hold a full window. (The
        rows of a KVCache share one length: `row` is there for the protocol's sake.)"""
        if n > self.length:
            return False
        cap = self.capacity[SLIDING]
        return self.length <= cap or n <= cap - (self.window - 1)

    @mirrored
    def trim(self, n: int, row: int = 0) -> None:
        """Forget the last n tokens (rejected speculative drafts, a chat turn rewritten)."""
        if not self.can_trim(n, row):
            raise ValueError(f"cannot roll back {n} tokens (length {self.length}, ring reserve {self.reserve})")
        self.length -= n
        for slots in self.slot_idx.values():
            slots[slots >= self.length] = -1
        self.valid[:, self.length:] = False

    @mirrored
    def kv_for(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row's K/V of `layer` ([1, kv_heads, capacity, head_dim], in the model's dtype:
        an int8 layer is dequantized) and the sequence index each slot holds ([capacity], -1: empty)."""
        k, v = as_float(self.layers[layer], row, self.dtype)
        return k, v, self.slot_idx[self.config.layer_types[layer]]

    @property
    def positions(self) -> torch.Tensor:
        """[B] RoPE position of the next token of each row: count of its real tokens so far."""
        return self.valid[:, :self.length].sum(-1)


# -- the storage tuple of one layer (shared with cache/batch.py) -----------------------------
def make_layer(rows: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype,
               device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Zeroed storage of one layer: (k, v), or (k_codes, v_codes, k_scale, v_scale) for int8."""
    shape = (rows, heads, slots, head_dim)
    if dtype == torch.int8:
        scale = (rows, heads, slots, head_dim // group_size(head_dim))
        return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(scale, dtype=SCALE_DTYPE, device=device),
                torch.zeros(scale, dtype=SCALE_DTYPE, device=device))
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def as_stored(k: torch.Tensor, v: torch.Tensor, bufs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """This step's k, v [B, H, S, D] in the layout and dtype of the layer's storage `bufs`."""
    if len(bufs) == 4:
        (kq, ks), (vq, vs) = quantize(k), quantize(v)
        return kq, vq, ks, vs
    return k.to(bufs[0].dtype), v.to(bufs[1].dtype)


def as_attended(bufs: tuple[torch.Tensor, ...]):
    """Storage slices → what the attention reads: (k, v) float, or two `Int8KV`."""
    if len(bufs) == 4:
        return Int8KV(bufs[0], bufs[2]), Int8KV(bufs[1], bufs[3])
    return bufs


def as_float(bufs: tuple[torch.Tensor, ...], row: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of a layer's storage as float (k, v) [1, H, slots, D] in `dtype`."""
    if len(bufs) == 4:
        k, v = as_attended(tuple(b[row:row + 1] for b in bufs))
        return k.dequantize(dtype), v.dequantize(dtype)
    return bufs[0][row:row + 1].to(dtype), bufs[1][row:row + 1].to(dtype)
