"""Automatic prefix caching: K/V of prompts seen before, reused by later requests, LRU by bytes.

An entry is a token-key sequence (ids; media placeholders keyed by their item's digest,
inputs.py `token_keys`) with the K/V that computing it left:
- full-attention layers: every token's K/V, `[1, H, L, D]` per tensor of the layer's tuple;
- sliding layers: a ring only holds the last window - 1 + reserve tokens, so one snapshot
  cannot restore an arbitrary prefix. The entry keeps *pieces*: the sliding layers' K/V of
  the tokens the ring holds at each snapshot point (the chunk bounds of the prefill that
  built it, the prompt's end, the end of the reply: at least the window before it, up to
  window - 1 + reserve tokens), minus what an earlier piece already holds. Consecutive
  points closer than a window apart leave contiguous pieces.
A point P can be restored when the pieces cover tokens [P - window + 1, P) (what a query at P
attends on a sliding layer) and P does not cut a vision block (its tokens attend each other
both ways: the caller passes the request's vision flags). A hit restores the longest such
point within the common prefix into a fresh one-sequence KVCache; the rest is prefilled, with
a chunk bound (so a snapshot) where the prompt parts from the entries: a third client with the
second one's system prompt restores all of it, like a radix tree splitting a node.

Copies are generic over the tensors of `cache.layers[i]` (K, V and whatever a quantized cache
adds): every one has its batch axis at dim 0 and its slot axis at dim 2. An entry's tensors
are never written after it is built, so an entry made by extending another shares its
pieces (bytes are counted once per piece). Entries whose keys and pieces another entry holds
are dropped as it is inserted (a reply's entry supersedes its prompt's). The store only
changes in `insert` (a prefill that fails or is cancelled never gets there) and belongs to one
thread (the scheduler's); it knows nothing of models, requests or rows beyond the cache layout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..config import FULL, SLIDING, TextConfig


@dataclass(eq=False)
class Piece:
    """Sliding layers' K/V of tokens [start, end): layer index -> its tensors `[1, H, n, D]`."""
    start: int
    end: int
    layers: dict[int, tuple[torch.Tensor, ...]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.layers.values() for t in ts)


@dataclass(eq=False)
class Entry:
    keys: list
    full: dict[int, tuple[torch.Tensor, ...]]  # full layer index -> tensors [1, H, L, D]
    pieces: list[Piece]  # sorted by start, disjoint
    used: int = 0  # LRU clock

    @property
    def full_bytes(self) -> int:
        return sum(t.nbytes for ts in self.full.values() for t in ts)

    def segments(self) -> list[tuple[int, int]]:
        """The token ranges the pieces cover, adjacent pieces merged."""
        out: list[list[int]] = []
        for p in self.pieces:
            if out and out[-1][1] == p.start:
                out[-1][1] = p.end
            else:
                out.append([p.start, p.end])
        return [(a, b) for a, b in out]


@dataclass
class Hit:
    entry: Entry | None
    length: int  # tokens to restore (0: a miss)
    # tokens some entry shares with the prompt, media-safe: when more than `length`, the
    # prefill cuts a chunk there, so the next prompt sharing them restores them all
    shared: int = 0


@dataclass
class Recorder:
    """Pieces gathered while one sequence is prefilled (or decoded), for the entry it becomes."""
    window: int
    limit: int  # bytes: past this the entry could not be kept anyway, so recording stops
    pieces: list[Piece] = field(default_factory=list)
    nbytes: int = 0
    off: bool = False  # over the limit: nothing more is recorded (a very long prompt)

    @property
    def covered(self) -> int:
        return self.pieces[-1].end if self.pieces else 0

    def snapshot(self, cache, end: int, row: int = 0) -> bool:
        """Keep the sliding K/V of the tokens before `end` that the cache's rings hold: at least
        the window a query at `end` attends, and as many more as the ring holds (up to its
        reserve), so the points just before `end` can be restored too (a next prompt that
        differs in its last tokens: a chat template's generation prompt, a retry). `cache` has
        written tokens [0, end) (and a row may have more). False when the ring no longer
        holds the window (nothing is kept then)."""
        if self.off:
            return False
        need = max(self.covered, end - self.window, 0)
        start = max(self.covered, end - cache.capacity[SLIDING], 0)
        if need >= end:
            return True
        slots, start = _held_slots(cache, row, start, end)
        if start > need:
            return False
        layers = {i: tuple(buf[row:row + 1, :, slots].clone() for buf in cache.layers[i])
                  for i, t in enumerate(cache.config.layer_types) if t == SLIDING}
        self.pieces.append(Piece(start, end, layers))
        self.nbytes += self.pieces[-1].nbytes
        if self.nbytes > self.limit:  # keeps the prefill's memory flat however long the prompt
            self.pieces, self.off = [], True
            return False
        return True


def _held_slots(cache, row: int, start: int, end: int) -> tuple[torch.Tensor, int]:
    """Ring slots of the longest run of tokens [s, end), s >= start, that one row of a KVCache
    or BatchCache still holds (token i lives in slot i % capacity), and that s."""
    held = cache.slot_idx[SLIDING]
    held = held[row] if held.dim() == 2 else held
    idx = torch.arange(start, end, device=held.device)
    slots = idx % cache.capacity[SLIDING]
    missing = (held[slots] != idx).nonzero()
    first = int(missing[-1]) + 1 if len(missing) else 0
    return slots[first:], start + first


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix (slices compare in C, a block at a time)."""
    n, i, step = min(len(a), len(b)), 0, 256
    while i < n:
        j = min(i + step, n)
        if a[i:j] != b[i:j]:  # the first differing block: find the token
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


def media_safe(vision: list[bool] | None, p: int) -> bool:
    """Restoring p tokens does not cut a vision block (the rule of inputs.py chunk_bounds)."""
    return vision is None or p <= 0 or p >= len(vision) or not (vision[p - 1] and vision[p])


class PrefixCache:
    """Entries of K/V by token prefix, at most `budget` bytes, least recently used evicted."""

    def __init__(self, config: TextConfig, budget: int):
        if budget < 0:
            raise ValueError(f"the prefix cache budget is a byte count >= 0, got {budget}")
        self.config, self.budget, self.window = config, budget, config.sliding_window
        self.entries: list[Entry] = []
        self.bytes = 0
        self._clock = itertools.count(1)
        self.lookups = self.hits = self.saved_tokens = self.evictions = 0

    # -- reading ---------------------------------------------------------------------------
    def point(self, entry: Entry, common: int, vision: list[bool] | None) -> int:
        """The longest restorable prefix of `entry` of at most `common` tokens (0: none)."""
        segments = entry.segments()
        c = min(common, len(entry.keys))
        while c > 0:
            best = 0
            for s, e in segments:
                p = min(c, e)
                if p > s and (s == 0 or p - (self.window - 1) >= s):  # the window before p is held
                    best = max(best, p)
            p = best
            while not media_safe(vision, p):  # back to the block's start
                p -= 1
            if p == best:
                return p
            c = p
        return 0

    def lookup(self, keys: list, vision: list[bool] | None, limit: int) -> Hit:
        """The entry sharing the longest restorable prefix with `keys` (at most `limit` tokens;
        length 0: none), and how far any entry shares them (`shared`); counted in the hit
        statistics."""
        self.lookups += 1
        best, shared = Hit(None, 0), 0
        for entry in self.entries:
            common = min(limit, common_prefix(entry.keys, keys))
            shared = max(shared, common)
            p = self.point(entry, common, vision)
            if p > best.length:
                best = Hit(entry, p)
        while not media_safe(vision, shared):
            shared -= 1
        best.shared = shared
        if best.length:
            self.hits += 1
            self.saved_tokens += best.length
            best.entry.used = next(self._clock)
        return best

    @torch.inference_mode()  # cache buffers are inference tensors
    def restore(self, hit: Hit, cache) -> None:
        """Write the hit's first `length` tokens into a fresh one-sequence KVCache."""
        P, entry = hit.length, hit.entry
        if cache.batch != 1 or cache.length != 0 or P > cache.max_len:
            raise ValueError("restore takes a fresh one-sequence cache with room for the prefix")
        for i, tensors in entry.full.items():
            for dst, src in zip(cache.layers[i], tensors):
                dst[:, :, :P] = src[:, :, :P]
        cache.slot_idx[FULL][:P] = torch.arange(P, device=cache.valid.device)
        cap = cache.capacity[SLIDING]
        lo = max(0, P - min(cap, self.window - 1))  # what a query at P attends on a sliding layer
        for piece in entry.pieces:
            a, b = max(lo, piece.start), min(P, piece.end)
            if a >= b:
                continue
            idx = torch.arange(a, b, device=cache.valid.device)
            for i, tensors in piece.layers.items():
                for dst, src in zip(cache.layers[i], tensors):
                    dst[:, :, idx % cap] = src[:, :, a - piece.start:b - piece.start]
            cache.slot_idx[SLIDING][idx % cap] = idx
        cache.valid[0, :P] = True
        cache.length = P

    def recorder(self, hit: Hit | None = None) -> Recorder:
        """A recorder for a sequence that starts with the hit's prefix: its pieces there are
        the hit entry's (shared, cut at the restored length)."""
        rec = Recorder(self.window, self.budget)
        if hit is not None and hit.entry is not None:
            for p in hit.entry.pieces:
                if p.end <= hit.length:
                    rec.pieces.append(p)
                elif p.start < hit.length:  # the piece the restore point cuts: a copy of its head
                    n = hit.length - p.start
                    rec.pieces.append(Piece(p.start, hit.length,
                                            {i: tuple(t[:, :, :n].clone() for t in ts) for i, ts in p.layers.items()}))
        return rec

    # -- writing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def insert(self, keys: list, cache, rec: Recorder, row: int = 0) -> Entry | None:
        """Keep the sequence `keys` (cache row `row` holds their K/V in full layers, `rec` the
        sliding pieces) as an entry, evicting least recently used ones to stay in budget.
        None when it would not fit alone, or another entry holds it already."""
        L = len(keys)
        if L == 0 or rec.covered != L:
            return None
        new = Entry(keys, {}, list(rec.pieces))
        for e in self.entries:
            if self._holds(e, new):  # already there: mark it used instead
                e.used = next(self._clock)
                return None
        full = [buf[row:row + 1, :, :L] for i, t in enumerate(self.config.layer_types) if t == FULL
                for buf in cache.layers[i]]
        full_bytes = sum(t.nbytes for t in full)
        if full_bytes + sum(p.nbytes for p in new.pieces) > self.budget:
            return None
        for e in [e for e in self.entries if self._holds(new, e)]:  # superseded (a reply's prompt)
            self._drop(e)
        while True:
            held = {id(p) for e in self.entries for p in e.pieces}  # pieces shared with the new entry count once
            cost = full_bytes + sum(p.nbytes for p in new.pieces if id(p) not in held)
            if self.bytes + cost <= self.budget:
                break
            self._drop(min(self.entries, key=lambda e: e.used))
            self.evictions += 1
        new.full = {i: tuple(buf[row:row + 1, :, :L].clone() for buf in cache.layers[i])
                    for i, t in enumerate(self.config.layer_types) if t == FULL}
        new.used = next(self._clock)
        self.entries.append(new)
        self.bytes += cost
        return new

    def remember(self, keys: list, cache, row: int = 0) -> Entry | None:
        """Keep a sequence a cache row holds after decoding (a finished reply): its prefix's
        pieces from the entry it extends, plus a snapshot at its end."""
        base = None
        for e in self.entries:
            p = self.point(e, common_prefix(e.keys, keys), None)  # decoded tokens are text
            if p > 0 and (base is None or p > base.length):
                base = Hit(e, p)
        rec = self.recorder(base)
        if not rec.snapshot(cache, len(keys), row):
            return None
        return self.insert(keys, cache, rec, row)

    def _holds(self, big: Entry, small: Entry) -> bool:
        """`big` restores everything `small` does: its keys start with small's and its pieces
        cover small's."""
        if len(small.keys) > len(big.keys) or big.keys[:len(small.keys)] != small.keys:
            return False
        segs = big.segments()
        return all(any(s <= a and b <= e for s, e in segs) for a, b in small.segments())

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        held = {id(p) for e in self.entries for p in e.pieces}
        self.bytes -= entry.full_bytes + sum(p.nbytes for p in entry.pieces if id(p) not in held)

    def clear(self) -> None:
        self.entries, self.bytes = [], 0

    def stats(self) -> dict:
        return {"prefix_cache_lookups": self.lookups, "prefix_cache_hits": self.hits,
                "prefix_cache_saved_tokens": self.saved_tokens, "prefix_cache_bytes": self.bytes,
                "prefix_cache_budget": self.budget, "prefix_cache_entries": len(self.entries),
                "prefix_cache_evictions": self.evictions}

