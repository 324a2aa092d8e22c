"""GGUF tensor sources: a llama.cpp model file (arch `gemma3` / `gemma4`) and its mmproj.

`GGUFSource(path, mmproj)` knows its config (rebuilt from the metadata, gguf/arch.py, with the
mmproj's embedders, gguf/mmproj.py) and yields every tensor under our name as a `Tensor`
(weights/sources.py): Q8_0 / Q4_0 matrices also offer their bits repacked exactly into our
int8 / int4 group-32 layouts (`native`), and every type reads as floats, bit-exact to ggml's
dequantization. Tensors are zero-copy views of the mapped file until read; the file pages
behind each tensor are released once it is placed, a block of rows at a time where it is read
in blocks, so a mapped file never counts whole in the process's memory. Which reader is used
is the placer's choice (weights/placer.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..gguf.arch import config_from_gguf, our_name
from ..hugepages import advise
from ..gguf.dequant import dequantize, repack
from ..gguf.mmproj import mmproj_path_check, mmproj_tensor
from ..gguf.reader import GGUFFile
from ..gguf.types import BF16, F16, F32, Q4_0, Q8_0
from .sources import Tensor

NATIVE = {Q8_0: (8, 32), Q4_0: (4, 32)}  # ggml types whose blocks are our group-32 layouts, bit for bit


def is_gguf(path: Path) -> bool:
    """A .gguf name, or a file that starts with the GGUF magic."""
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class MmprojSource:
    """An mmproj file's image / audio embedder tensors, under our names."""

    def __init__(self, path: str | os.PathLike):
        self.file = GGUFFile(mmproj_path_check(path))

    def tensors(self) -> Iterator[Tensor]:
        return _tensors(self.file, mmproj_tensor)

    def close(self) -> None:
        self.file.close()


class GGUFSource:
    """A GGUF model file, plus an optional mmproj (whose tensors follow the model's)."""

    read_errors = ()  # a malformed file is a CheckpointError from the reader itself

    def __init__(self, path: str | os.PathLike, mmproj: str | os.PathLike | None = None):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        self.file = GGUFFile(path)
        self.mmproj = None
        try:
            self.mmproj = MmprojSource(mmproj) if mmproj is not None else None
            try:
                self.config = ModelConfig.from_dict(config_from_gguf(self.file, self.mmproj and self.mmproj.file))
            except ConfigError as e:
                raise CheckpointError(f"{path}: the metadata describes an unsupported model ({e})") from e
        except BaseException:
            self.close()
            raise
        self.describes, self.label = f"{path.name}'s metadata", f"loading {path.name}"
        arch = self.file.arch
        self.types = {our_name(n, arch): t.type for n, t in self.file.tensors.items()}

    def native(self, name: str) -> tuple[int, int] | None:
        return NATIVE.get(self.types.get(name))

    def requantize(self, name: str) -> tuple[int, int] | None:
        """The layout a weight stored in another block type (Q4_K, Q5_0, Q6_K, ...) loads into
        when no quantization is asked and the int8-activation kernels run (the loader decides;
        else such weights load as floats): int8 in groups of 32, the nearest one our kernels read
        (its step, 1/254 of a group's largest weight, is far inside those types' own; Gemma 3
        270M's Q4_K_M: KL 0.004 from the float weights, bench/act_quality.py). None for float
        tensors and for our native types."""
        t = self.types.get(name)
        return (8, 32) if t is not None and t not in (F32, F16, BF16) and t not in NATIVE else None

    def tensors(self) -> Iterator[Tensor]:
        arch = self.file.arch
        yield from _tensors(self.file, lambda n: (our_name(n, arch), None))
        if self.mmproj is not None:
            yield from self.mmproj.tensors()

    def close(self) -> None:
        self.file.close()
        if self.mmproj is not None:
            self.mmproj.close()


def _tensors(f: GGUFFile, rename) -> Iterator[Tensor]:
    """rename: GGUF name → (our name or None to skip, value transform or None)."""
    for key, info in list(f.tensors.items()):
        name, transform = rename(key)
        if name is None:
            continue
        # a transform (an mmproj's reordering) may change the shape: the placed shape is checked
        shape = info.shape if transform is None else tuple(transform(torch.empty(info.shape, device="meta")).shape)
        raw = f.raw(key)

        def read(key=key, info=info, raw=raw, transform=transform):
            t = dequantize(raw, info.type, info.shape)
            if transform is not None:
                t = transform(t)
            # an F32 tensor is a view of the read-only mapping: copy it into memory of its own
            return t.clone() if t.data_ptr() == raw.data_ptr() else t

        def read_rows(a, b, key=key, info=info, raw=raw):
            row = info.nbytes // info.shape[0]
            w = dequantize(raw[a * row:b * row], info.type, (b - a, *info.shape[1:])).clone()
            f.release(key, a * row, (b - a) * row)  # those file pages are done with
            return w

        matrix = len(info.shape) == 2 and transform is None  # what row reads and repacks are for
        native = NATIVE.get(info.type) if matrix else None
        yield Tensor(name, key, shape, True, read, read_rows if matrix else None,
                     native, (lambda key=key, raw=raw: _repack_blocks(f, key, raw)) if native else None,
                     file=str(f.path))
        del raw
        f.release(key)


def _repack_blocks(f: GGUFFile, key: str, raw: torch.Tensor, rows: int = 4096):
    """repack() a block of rows at a time, releasing the file pages behind each block: the
    bytes of a large token table never sit in memory twice."""
    info = f.tensors[key]
    N, K = info.shape
    row = info.nbytes // N
    q = s = None
    for a in range(0, N, rows):
        b = min(N, a + rows)
        _, qb, sb = repack(raw[a * row:b * row], info.type, (b - a, K))
        if q is None:
            q, s = advise(torch.empty((N, *qb.shape[1:]), dtype=qb.dtype)), advise(torch.empty((N, *sb.shape[1:]), dtype=sb.dtype))
        q[a:b], s[a:b] = qb, sb
        f.release(key, a * row, (b - a) * row)
    return q, s
