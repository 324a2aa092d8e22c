"""GGUF files: the key/value metadata and the tensor table, tensors as zero-copy views.

`read_gguf_metadata(path)` reads only the metadata (what the tokenizer needs: ~0.5 s for a
262k vocabulary, where gguf-py's GGUFReader takes ~25 s building a numpy view per element).
`GGUFFile(path)` also reads the tensor table and maps the file: `raw(name)` is a uint8 view
of one tensor's bytes in the mapping, so loading never copies the whole file.

The file is untrusted: every header field is bounded before anything is built from it
(counts and lengths against the bytes left, n_dims against ggml's 4, element and byte counts
as Python ints against the file's size), so a hostile header costs memory and time in
proportion to the file. A malformed, truncated or foreign file is a `CheckpointError` naming
the file, the field and its byte offset.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .types import TYPES, type_name

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
GGML_MAX_DIMS = 4
_MAX_NESTING = 8  # arrays of arrays: gguf-py writes them, ggml reads none
# the fewest bytes each entry can take: an array header (type, length), a key/value (key
# length, value type, a 1-byte value), a tensor entry (name length, n_dims, type, offset)
_ARRAY_HEAD, _MIN_KV, _MIN_TENSOR = 4 + 8, 8 + 4 + 1, 8 + 4 + 4 + 8
_INT64_MAX = 2**63 - 1  # ggml holds dims and element counts in int64
_MAX_KEY, _MAX_NAME = 2**16 - 1, 64  # the GGUF spec's longest key and tensor name, in bytes


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF lists the contiguous dim first, we list it last
    type: int  # ggml type id (types.py)
    offset: int  # from the file's start
    nbytes: int


def _open(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CheckpointError(f"{path} is not a GGUF file (it is empty)")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e


class _Header:
    """A cursor over the header bytes: every read is bounds-checked and names its field."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.size, self.off = buf, path, len(buf), 0
        self.set_order("<")

    def set_order(self, end: str) -> None:
        self.end = end
        self.structs = {c: struct.Struct(end + c) for c in set(_SCALARS.values())}

    def malformed(self, field: str, why: str, at: int | None = None) -> CheckpointError:
        at = self.off if at is None else at
        return CheckpointError(f"{self.path}: malformed GGUF header: {field} at byte {at}: {why}")

    def short(self, field: str, need: int, at: int | None = None) -> CheckpointError:
        at = self.off if at is None else at
        return CheckpointError(f"{self.path}: truncated or malformed GGUF header: {field} at byte {at} needs "
                               f"{need} bytes, but the file ends at byte {self.size}")

    def take(self, n: int, field: str) -> int:
        """Step over n bytes; return where they start."""
        at = self.off
        if n > self.size - at:
            raise self.short(field, n)
        self.off = at + n
        return at

    def room(self, count: int, each: int, field: str) -> None:
        """Refuse a count of entries that cannot fit in the bytes left, before building any."""
        if count * each > self.size - self.off:
            raise self.short(f"{field} ({count:,} entries of at least {each} bytes)", count * each)

    def scalar(self, code: str, field: str):
        s = self.structs[code]
        return s.unpack_from(self.buf, self.take(s.size, field))[0]

    def string(self, field: str, limit: int | None = None) -> str:
        n = self.scalar("Q", f"{field} length")
        if limit is not None and n > limit:
            raise self.malformed(f"{field} length", f"{n:,} bytes, more than the {limit:,} GGUF allows", self.off - 8)
        at = self.take(n, field)
        return self.buf[at:at + n].decode("utf-8", "replace")

    def value(self, vtype: int, field: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(field)
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], field)
        if vtype != _ARRAY:  # only a key's own type gets here: element types are checked below
            raise self.malformed(f"{field} value type", f"unknown value type {vtype}", self.off - 4)
        if depth == _MAX_NESTING:
            raise self.malformed(field, f"arrays nested more than {_MAX_NESTING} deep")
        etype = self.scalar("I", f"{field} element type")
        if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
            raise self.malformed(f"{field} element type", f"unknown value type {etype}", self.off - 4)
        n = self.scalar("Q", f"{field} array length")
        if etype in _SCALARS:
            dtype = np.dtype(self.end + _SCALARS[etype])
            at = self.take(n * dtype.itemsize, f"{field} ({n:,} values)")
            return np.frombuffer(self.buf, dtype, n, at).copy()
        self.room(n, 8 if etype == _STRING else _ARRAY_HEAD, field)
        if etype == _ARRAY:
            return [self.value(_ARRAY, f"{field}[{i}]", depth + 1) for i in range(n)]
        # the hot loop: 777k strings in a Gemma 4 vocabulary
        buf, size, off, u64 = self.buf, self.size, self.off, self.structs["Q"].unpack_from
        items = []
        for i in range(n):
            if off + 8 > size:
                raise self.short(f"{field}[{i}] length", 8, off)
            (k,) = u64(buf, off)
            off += 8
            if k > size - off:
                raise self.short(f"{field}[{i}]", k, off)
            items.append(buf[off:off + k].decode("utf-8", "replace"))
            off += k
        self.off = off
        return items


def _parse(buf, path: Path, with_tensors: bool) -> tuple[dict[str, Any], list[TensorInfo]]:
    if buf[:4] != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    h = _Header(buf, path)
    h.off = 4
    version = h.scalar("I", "version")
    if version & 0xFFFF == 0:  # a big-endian file (ggml's own check)
        h.set_order(">")
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in (2, 3):
        raise h.malformed("version", f"GGUF version {version} is not supported (need 2 or 3)", 4)
    num_tensors = h.scalar("Q", "tensor count")
    num_kv = h.scalar("Q", "key/value count")
    h.room(num_kv, _MIN_KV, "key/value count")
    h.room(num_tensors, _MIN_TENSOR, "tensor count")
    need = num_kv * _MIN_KV + num_tensors * _MIN_TENSOR
    if need > h.size - h.off:
        raise h.short(f"{num_kv:,} keys and {num_tensors:,} tensors", need)
    meta, align = _metadata(h, num_kv)
    if not with_tensors:
        return meta, []
    h.room(num_tensors, _MIN_TENSOR, "tensor count")  # again, now that the metadata's size is known
    entries = [_tensor_entry(h, i) for i in range(num_tensors)]
    return meta, _place(h, entries, align)


def _metadata(h: _Header, num_kv: int) -> tuple[dict[str, Any], int]:
    """The key/value pairs, and the data alignment they set."""
    meta: dict[str, Any] = {}
    align = 32
    for i in range(num_kv):
        at = h.off
        key = h.string(f"key #{i}", _MAX_KEY)
        shown = repr(key) if len(key) <= 80 else repr(key[:80]) + "..."  # for messages
        if key in meta:
            raise h.malformed(f"key #{i}", f"duplicate key {shown}", at)
        vtype = h.scalar("I", f"{shown} value type")
        at = h.off
        meta[key] = h.value(vtype, shown)
        if key == "general.alignment":
            align = meta[key]
            # ggml reads it as a uint32 and requires a power of two
            if vtype != _UINT32 or align == 0 or align & (align - 1):
                why = f"{align!r} is not a power of two" if vtype == _UINT32 else f"value type {vtype}, not uint32"
                raise h.malformed("general.alignment", why, at)
    return meta, align


def _tensor_entry(h: _Header, i: int) -> tuple[TensorInfo, int, int]:
    """One tensor entry, its dims and type checked as ggml checks them: its TensorInfo (offset
    still relative to the data section), and where its name and its offset are written."""
    at = h.off
    name = h.string(f"tensor #{i} name", _MAX_NAME)
    field = f"tensor {name!r}"
    n_dims = h.scalar("I", f"{field} n_dims")
    if n_dims > GGML_MAX_DIMS:
        raise h.malformed(f"{field} n_dims", f"{n_dims} dims, more than ggml's {GGML_MAX_DIMS}", h.off - 4)
    dims_at = h.off
    dims = [h.scalar("Q", f"{field} dim {j}") for j in range(n_dims)]  # contiguous dim first
    count = 1
    for j, d in enumerate(dims):
        if d > _INT64_MAX:
            raise h.malformed(f"{field} dim {j}", f"{d} is negative as ggml's int64", dims_at + 8 * j)
        count *= max(d, 1)
        if count > _INT64_MAX:
            raise h.malformed(f"{field} dims", f"{dims} hold more than 2^63 - 1 elements", dims_at + 8 * j)
    ttype = h.scalar("I", f"{field} type")
    t = TYPES.get(ttype)
    if t is None:
        raise CheckpointError(f"{h.path}: tensor {name!r} has ggml type {type_name(ttype)}, which unigemma "
                              f"cannot read (supported: {', '.join(t.name for t in TYPES.values())})")
    row = dims[0] if dims else 1
    if row % t.block:
        raise h.malformed(f"{field} dim 0", f"a row of {row} {t.name} values, not a multiple of its "
                          f"{t.block}-value blocks", dims_at)
    rel_at = h.off
    rel = h.scalar("Q", f"{field} offset")
    nbytes = math.prod(dims) // t.block * t.size  # Python ints: no overflow
    return TensorInfo(name, tuple(reversed(dims)), ttype, rel, nbytes), at, rel_at


def _place(h: _Header, entries: list[tuple[TensorInfo, int, int]], align: int) -> list[TensorInfo]:
    """Tensors at aligned offsets inside the file, none named twice, none overlapping."""
    start = -(-h.off // align) * align  # the data section, aligned after the header
    tensors, names = [], set()
    for i, (t, name_at, rel_at) in enumerate(entries):
        if t.name in names:
            raise h.malformed(f"tensor #{i} name", f"duplicate tensor {t.name!r}", name_at)
        names.add(t.name)
        if t.offset % align:
            raise h.malformed(f"tensor {t.name!r} offset", f"{t.offset} is not a multiple of the alignment {align}",
                              rel_at)
        t = replace(t, offset=start + t.offset)
        if t.offset + t.nbytes > h.size:
            raise CheckpointError(f"{h.path}: tensor {t.name!r} ends at byte {t.offset + t.nbytes} but the file has "
                                  f"{h.size} bytes (truncated?)")
        tensors.append(t)
    placed = sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset)
    for a, b in zip(placed, placed[1:]):
        if b.offset < a.offset + a.nbytes:
            raise CheckpointError(f"{h.path}: tensor {b.name!r} (bytes {b.offset}-{b.offset + b.nbytes}) overlaps "
                                  f"tensor {a.name!r} (bytes {a.offset}-{a.offset + a.nbytes})")
    return tensors


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (v2/v3, either byte order); tensors are not read.

    Strings become `str`, string arrays `list[str]`, numeric arrays numpy arrays.
    """
    buf = _open(Path(path))
    try:
        return _parse(buf, Path(path), with_tensors=False)[0]
    finally:
        buf.close()


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (name → TensorInfo) and `raw(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._buf = _open(self.path)
        try:
            self.metadata, infos = _parse(self._buf, self.path, with_tensors=True)
        except BaseException:
            self._buf.close()
            raise
        self.tensors = {t.name: t for t in infos}
        self._np = np.frombuffer(self._buf, dtype=np.uint8)

    @property
    def arch(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw(self, name: str) -> torch.Tensor:
        """uint8 [nbytes] view of the tensor's bytes (read-only mapping: never write to it)."""
        t = self.tensors[name]
        with warnings.catch_warnings():  # torch warns that the mapping is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self._np[t.offset:t.offset + t.nbytes])

    def release(self, name: str, start: int = 0, nbytes: int | None = None) -> None:
        """Drop (part of) the tensor's pages from this process's RSS once copied out (they are
        re-read from the file if touched again): a mapped 7 GB file would otherwise count whole
        in the RSS of the model built from it."""
        t = self.tensors[name]
        lo = t.offset + start
        hi = t.offset + (t.nbytes if nbytes is None else start + nbytes)
        page = lo // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._buf.madvise(mmap.MADV_DONTNEED, page, hi - page)
        except (AttributeError, OSError, ValueError):  # no madvise on this platform: only memory use
            pass

    def close(self) -> None:
        self._np = None
        self.tensors = {}
        try:
            self._buf.close()
        except BufferError:  # views still alive (tensors that alias the mapping): the GC closes it
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
