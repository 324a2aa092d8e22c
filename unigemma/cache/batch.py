"""The decode batch's KV cache: up to `rows` independent sequences, each with its own length.

Continuous batching needs rows that join and leave between decode steps. A row is prefilled
alone in a one-sequence `KVCache` (chunked, media-safe; see generate/engine.py), then copied in
with `insert`; it leaves with `remove`, which moves the last row into its place so the active
rows are always `[0, n)` and a step runs on views of the buffers, never on copies.

Per row the layout is the one of `KVCache`: token `i` lives in slot `i % capacity`; full layers
hold `max_len` slots, sliding layers a ring of `window - 1 + reserve`. Bookkeeping is per row:
`slot_idx[type][r, s]` is the sequence index in slot `s` of row `r` (-1: empty). Rows hold no
padding, so a row's RoPE position is its length and every filled slot is a valid key.

A step writes S tokens per row (S = 1 when decoding; a few when verifying speculative drafts,
at most `reserve`, so a ring never overwrites a key that a new query still needs).

It speaks cache/kv.py's protocol (`trim(n, row)`, `kv_for(layer, row)`, `positions`), and
`save(row, dst)` copies a row back out into a one-sequence cache: a chat session is a row that
leaves the batch when its reply is done and is inserted again for the next turn.
"""

from __future__ import annotations

import torch

from ..config import FULL, SLIDING, TextConfig
from ..tp.mirror import mirrored
from .kv import (KEY_BLOCK, RESERVE, KVCache, Step, as_attended, as_float, as_stored, layer_dtypes, make_layer,
                 ring_capacity)
from .quant import scale_bytes


def bytes_per_row(config: TextConfig, max_len: int, dtype: torch.dtype, reserve: int = RESERVE,
                  kv_dtype: str = "auto", quant_layers: str | None = None) -> int:
    """KV bytes one row of `max_len` tokens takes (K and V of every layer, and for a layer
    stored in int8 its scales: an fp16 per token, KV head and 32 channels; cache/quant.py). dtype: the model's float dtype;
    kv_dtype / quant_layers as for KVCache (cache/kv.py `layer_dtypes`)."""
    cap = ring_capacity(max_len, config.sliding_window, reserve)
    dtypes = layer_dtypes(dtype, kv_dtype, quant_layers)
    total = 0
    for i, t in enumerate(config.layer_types):
        d = config.layer_head_dims[i]
        per_vector = d + scale_bytes(d) if dtypes[t] == torch.int8 else d * dtypes[t].itemsize
        total += 2 * config.layer_kv_heads[i] * cap[t] * per_vector
    return total


class BatchCache:
    @mirrored  # tensor parallelism: rank 0 makes every rank run it (tp/mirror.py)
    def __init__(self, config: TextConfig, rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", reserve: int = RESERVE,
                 kv_dtype: str = "auto", quant_layers: str | None = None):
        """dtype: the model's float dtype; kv_dtype / quant_layers: the storage (cache/kv.py)."""
        self.config, self.rows, self.max_len, self.reserve = config, rows, max_len, reserve
        self.dtype, self.kv_dtype, self.quant_layers = dtype, kv_dtype, quant_layers
        self.layer_dtypes = layer_dtypes(dtype, kv_dtype, quant_layers)
        self.window = config.sliding_window
        self.device = torch.device(device)
        self.n = 0  # active rows: [0, n)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.host_lengths = [0] * rows  # the same on the host: planning a step needs no sync
        self.capacity = ring_capacity(max_len, self.window, reserve)
        self.slot_idx = {t: torch.full((rows, c), -1, dtype=torch.long, device=self.device)
                         for t, c in self.capacity.items()}
        self.layers = [make_layer(rows, config.layer_kv_heads[i], self.capacity[t], config.layer_head_dims[i],
                                  self.layer_dtypes[t], self.device) for i, t in enumerate(config.layer_types)]
        self.steps: dict[str, Step] = {}
        self._pending = 0
        self.broken = False

    # -- rows joining and leaving ---------------------------------------------------------
    def can_insert(self, length: int) -> bool:
        return self.n < self.rows and length <= self.max_len

    @mirrored
    @torch.inference_mode()  # the buffers are inference tensors
    def insert(self, src: KVCache) -> int:
        """Copy a prefilled one-sequence cache (no padding) into a new row; returns its index."""
        if src.batch != 1 or not bool(src.valid[0, :src.length].all()):
            raise ValueError("insert takes a one-sequence cache without padding")
        if src.broken:
            raise ValueError("insert got a cache left half-written by a failed forward")
        if src.layer_dtypes != self.layer_dtypes:
            raise ValueError(f"insert got a cache stored as {src.layer_dtypes}, the batch stores {self.layer_dtypes}")
        if not self.can_insert(src.length):
            raise ValueError(f"no room for a row of {src.length} tokens ({self.n}/{self.rows} rows used, "
                             f"{self.max_len} tokens per row)")
        r, L = self.n, src.length
        for t, cap in self.capacity.items():
            held = src.slot_idx[t]
            keep = held >= max(0, L - cap)  # the newest `cap` tokens: what a ring of ours holds
            src_slots, idx = keep.nonzero()[:, 0], held[keep]
            dst_slots = idx % cap  # fewer than `cap` consecutive indices: no collisions
            self.slot_idx[t][r].fill_(-1)
            self.slot_idx[t][r, dst_slots] = idx
            for i, lt in enumerate(self.config.layer_types):
                if lt == t:
                    for dst, s in zip(self.layers[i], src.layers[i]):
                        dst[r, :, dst_slots] = s[0, :, src_slots]
        self.lengths[r], self.host_lengths[r] = L, L
        self.n += 1
        return r

    @mirrored
    @torch.inference_mode()  # the buffers are inference tensors
    def save(self, row: int, dst: KVCache) -> None:
        """Copy one row out into a one-sequence cache (a chat session kept between turns); `dst`
        is grown to hold it. Its ring may not promise more rollback than ours holds."""
        if dst.batch != 1 or dst.reserve > self.reserve:
            raise ValueError("save takes a one-sequence cache whose ring reserve is at most the batch's")
        if dst.layer_dtypes != self.layer_dtypes:
            raise ValueError(f"save got a cache stored as {dst.layer_dtypes}, the batch stores {self.layer_dtypes}")
        L = self.host_lengths[row]
        dst.grow(L)
        for t, cap in dst.capacity.items():
            held = self.slot_idx[t][row]
            keep = held >= max(0, L - cap)  # the newest `cap` tokens: what a ring of theirs holds
            src_slots, idx = keep.nonzero()[:, 0], held[keep]
            dst_slots = idx % cap
            dst.slot_idx[t].fill_(-1)
            dst.slot_idx[t][dst_slots] = idx
            for i, lt in enumerate(self.config.layer_types):
                if lt == t:
                    for d, s in zip(dst.layers[i], self.layers[i]):
                        d[0, :, dst_slots] = s[row, :, src_slots]
        dst.valid.fill_(False)
        dst.valid[0, :L] = True
        dst.length, dst.broken = L, False

    @mirrored
    @torch.inference_mode()  # the buffers are inference tensors
    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (the caller mirrors this move)."""
        if not 0 <= row < self.n:
            raise ValueError(f"row must be in [0, {self.n}), got {row}")
        last = self.n - 1
        if row != last:
            for t, cap in self.capacity.items():
                used = min(cap, self.host_lengths[last])  # a row fills slots from 0 until it wraps
                self.slot_idx[t][row] = self.slot_idx[t][last]
                for i, lt in enumerate(self.config.layer_types):
                    if lt == t:
                        for buf in self.layers[i]:
                            buf[row, :, :used] = buf[last, :, :used]
            self.lengths[row], self.host_lengths[row] = self.lengths[last], self.host_lengths[last]
        self.slot_idx[FULL][last].fill_(-1)
        self.slot_idx[SLIDING][last].fill_(-1)
        self.lengths[last], self.host_lengths[last] = 0, 0
        self.n = last

    # -- one forward over the active rows: begin → update per layer → end ------------------
    @property
    def length(self) -> int:
        """The longest row (how many slots a step may attend)."""
        return max([0, *self.host_lengths[:self.n]])  # (no `default=`: torch.compile traces this)

    def begin(self, valid_new: torch.Tensor) -> dict[str, Step]:
        n, S = valid_new.shape
        if self.broken:
            raise RuntimeError("this KV cache was left half-written by a failed forward")
        if n != self.n:
            raise ValueError(f"a step over {n} rows; the batch has {self.n} active rows")
        if S > self.reserve:
            raise ValueError(f"a decode batch writes at most {self.reserve} tokens per row per step, got {S}")
        if not torch.compiler.is_compiling() and not bool(valid_new.all()):  # a host sync: eager only
            raise ValueError("rows of a decode batch hold no padding")
        lengths = self.lengths[:n]
        if self.length + S > self.max_len:
            raise ValueError(f"KV cache rows hold {self.max_len} tokens; a row has {self.length}, {S} more requested")
        new_idx = lengths[:, None] + torch.arange(S, device=self.device)  # [n, S]
        longest = self.length + S
        self.steps, self._pending = {}, S
        for t, cap in self.capacity.items():
            slots = new_idx % cap
            after = self.slot_idx[t][:n].clone()
            after.scatter_(1, slots, new_idx)
            num_keys = min(cap, -(-longest // KEY_BLOCK) * KEY_BLOCK)  # whole key blocks (cache/kv.py)
            k_idx = after[:, :num_keys]
            self.steps[t] = Step(False, new_idx, slots, None, num_keys, k_idx, k_idx >= 0)
        return self.steps

    def query_index(self, S: int) -> torch.Tensor:
        return self.steps[FULL].new_idx if FULL in self.steps else self.steps[SLIDING].new_idx

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [n, H, S, D] at each row's own slots; return the keys/values to attend
        (float tensors, or two `Int8KV` for an int8 layer: see KVCache.update)."""
        step = self.steps[self.config.layer_types[layer]]
        bufs = self.layers[layer]
        n = k.shape[0]
        rows = torch.arange(n, device=self.device)[:, None]
        for buf, x in zip(bufs, as_stored(k, v, bufs)):
            buf[rows, :, step.write_slots] = x.transpose(1, 2)  # [n, S, H, D|1] at (row, slot)
        return as_attended(tuple(buf[:n, :, :step.num_keys] for buf in bufs))

    def end(self) -> None:
        for t, step in self.steps.items():
            self.slot_idx[t][:self.n].scatter_(1, step.write_slots, step.new_idx)
        self.lengths[:self.n] += self._pending
        for r in range(self.n):
            self.host_lengths[r] += self._pending
        self.steps, self._pending = {}, 0

    def abort(self) -> None:
        self.steps, self._pending, self.broken = {}, 0, True

    # -- rollback (speculative decoding) ----------------------------------------------------
    def can_trim(self, n: int, row: int = 0) -> bool:
        length, cap = self.host_lengths[row], self.capacity[SLIDING]
        return n <= length and (length <= cap or n <= cap - (self.window - 1))

    @mirrored
    @torch.inference_mode()  # the buffers are inference tensors
    def trim(self, n: int, row: int = 0) -> None:
        """Forget the last n tokens of one row."""
        if not self.can_trim(n, row):
            raise ValueError(f"cannot roll back {n} tokens of row {row} (length {self.host_lengths[row]})")
        self.host_lengths[row] -= n
        self.lengths[row] = self.host_lengths[row]
        for slots in self.slot_idx.values():
            slots[row][slots[row] >= self.host_lengths[row]] = -1

    @mirrored
    def kv_for(self, layer: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row's K/V of `layer` ([1, kv_heads, capacity, head_dim], in the model's dtype:
        an int8 layer is dequantized) and the sequence index each slot holds ([capacity], -1: empty)."""
        k, v = as_float(self.layers[layer], row, self.dtype)
        return k, v, self.slot_idx[self.config.layer_types[layer]][row]

    @property
    def positions(self) -> torch.Tensor:
        """[n] RoPE position of each active row's next token: its length (rows hold no padding)."""
        return self.lengths[:self.n].clone()
