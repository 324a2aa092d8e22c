"""GGUF files: the key/value metadata and the tensor table, tensors as zero-copy views.

`read_gguf_metadata(path)` reads only the metadata (what the tokenizer needs: ~0.5 s for a
262k vocabulary, where gguf-py's GGUFReader takes ~25 s building a numpy view per element).
`GGUFFile(path)` also reads the tensor table and maps the file: `raw(name)` is a uint8 view
of one tensor's bytes in the mapping, so loading never copies the whole file. A malformed,
truncated or foreign file is a `CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from .types import TYPES, type_name

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


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
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from e


def _parse(buf, path: Path, with_tensors: bool) -> tuple[dict[str, Any], list[TensorInfo]]:
    if buf[:4] != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    end = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # byte-swapped version
    version, num_tensors, num_kv = struct.unpack_from(end + "IQQ", buf, 4)
    if version < 2:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    u32, u64 = struct.Struct(end + "I"), struct.Struct(end + "Q")

    def string(off: int) -> tuple[str, int]:
        (n,) = u64.unpack_from(buf, off)
        if off + 8 + n > len(buf):
            raise ValueError("string runs past the end of the file")
        return buf[off + 8:off + 8 + n].decode("utf-8", "replace"), off + 8 + n

    def value(vtype: int, off: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return string(off)
        if vtype != _ARRAY:
            s = struct.Struct(end + _SCALARS[vtype])
            return s.unpack_from(buf, off)[0], off + s.size
        (etype,), (n,) = u32.unpack_from(buf, off), u64.unpack_from(buf, off + 4)
        off += 12
        if etype in _SCALARS:
            dtype = np.dtype(end + _SCALARS[etype])
            return np.frombuffer(buf, dtype, n, off).copy(), off + n * dtype.itemsize
        items = []
        if etype == _STRING:  # the hot loop: 777k strings in a Gemma 4 vocabulary
            for _ in range(n):
                (size,) = u64.unpack_from(buf, off)
                items.append(buf[off + 8:off + 8 + size].decode("utf-8", "replace"))
                off += 8 + size
            return items, off
        for _ in range(n):
            item, off = value(etype, off)
            items.append(item)
        return items, off

    try:
        meta, off = {}, 24
        for _ in range(num_kv):
            key, off = string(off)
            (vtype,) = u32.unpack_from(buf, off)
            meta[key], off = value(vtype, off + 4)
        if not with_tensors:
            return meta, []
        raw = []
        for _ in range(num_tensors):
            name, off = string(off)
            (n_dims,) = u32.unpack_from(buf, off)
            dims = struct.unpack_from(end + "Q" * n_dims, buf, off + 4)
            off += 4 + 8 * n_dims
            (ttype,), (rel,) = u32.unpack_from(buf, off), u64.unpack_from(buf, off + 4)
            off += 12
            raw.append((name, tuple(reversed(dims)), ttype, rel))
    except (struct.error, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or malformed GGUF header ({e!r})") from e
    align = int(meta.get("general.alignment", 32))
    start = (off + align - 1) // align * align
    tensors = []
    for name, shape, ttype, rel in raw:
        if ttype not in TYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has ggml type {type_name(ttype)}, which unigemma "
                                  f"cannot read (supported: {', '.join(t.name for t in TYPES.values())})")
        t = TYPES[ttype]
        n = int(np.prod(shape)) if shape else 1
        if shape and shape[-1] % t.block:
            raise CheckpointError(f"{path}: tensor {name!r} of type {t.name} has a row of {shape[-1]} "
                                  f"values, not a multiple of its {t.block}-value blocks")
        nbytes = n // t.block * t.size
        if start + rel + nbytes > len(buf):
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {start + rel + nbytes} but the file has "
                                  f"{len(buf)} bytes (truncated?)")
        tensors.append(TensorInfo(name, shape, ttype, start + rel, nbytes))
    return meta, tensors


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
