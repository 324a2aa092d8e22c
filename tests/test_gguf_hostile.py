"""Hostile GGUF headers (security review D8): every malformed field is a CheckpointError naming
the file, the field and its byte offset, found in bounded memory and time; random mutations and
truncations of a valid file give a file that reads or a CheckpointError, never anything else."""

from __future__ import annotations

import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unigemma.errors import CheckpointError
from unigemma.gguf.reader import GGUFFile, read_gguf_metadata

gguf = pytest.importorskip("gguf", reason="the gguf package writes the valid file the fuzz test mutates")

U32, STR, ARR, U64, F32_T, Q8_0_T = 4, 8, 9, 10, 0, 8
MAX_PEAK, MAX_SECONDS = 50 << 20, 1.0


# --- building hostile files byte by byte ----------------------------------------------------
def string(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", vtype) + payload


def tensor(name: str, dims, ttype: int = F32_T, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset))


def gguf_bytes(kvs=(), tensors=(), data: bytes = b"", counts=None, version: int = 3) -> bytes:
    n_tensors, n_kv = counts if counts is not None else (len(tensors), len(kvs))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(tensors)
    if data:
        out += b"\0" * (-len(out) % 32) + data
    return out


def refuse(path, match: str, metadata_too: bool = False) -> tuple[float, int]:
    """Assert GGUFFile (and read_gguf_metadata) raise a CheckpointError naming the file and
    matching `match`; return the seconds and peak traced bytes it took."""
    readers = [GGUFFile, read_gguf_metadata] if metadata_too else [GGUFFile]
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        for read in readers:
            with pytest.raises(CheckpointError, match=match) as e:
                read(path)
            assert str(path) in str(e.value), e.value
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK and seconds < MAX_SECONDS, (peak, seconds)
    return seconds, peak


F32_8 = np.arange(8, dtype=np.float32).tobytes()
BIG = 2**64 - 1
HEADER, TENSOR = "header", "tensor"  # where the flaw is: a header flaw fails read_gguf_metadata too
# name → (file bytes, what the message must say, where the flaw is)
CASES = {
    # D8: a 4 GB struct format string, then MemoryError after 18 s
    "n_dims_0xffffffff": (gguf_bytes(tensors=[tensor("w", [1] * 8, n_dims=0xFFFFFFFF)]),
                          r"tensor 'w' n_dims at byte 33: 4294967295 dims, more than ggml's 4", TENSOR),
    "n_dims_5": (gguf_bytes(tensors=[tensor("w", [1] * 5)]), r"tensor 'w' n_dims at byte 33: 5 dims", TENSOR),
    # D8: ZeroDivisionError / ValueError
    "alignment_0": (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 0))]),
                    r"general.alignment at byte 53: 0 is not a power of two", HEADER),
    "alignment_string": (gguf_bytes([kv("general.alignment", STR, string("abc"))]),
                         r"general.alignment at byte 53: value type 8, not uint32", HEADER),
    "alignment_48": (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 48))]),
                     r"general.alignment at byte 53: 48 is not a power of two", HEADER),
    "alignment_u64": (gguf_bytes([kv("general.alignment", U64, struct.pack("<Q", 32))]),
                      r"general.alignment at byte 53: value type 10, not uint32", HEADER),
    # D8: struct.error
    "8_bytes": (b"GGUF" + struct.pack("<I", 3),
                r"tensor count at byte 8 needs 8 bytes, but the file ends at byte 8", HEADER),
    "empty": (b"", r"is not a GGUF file \(it is empty\)", HEADER),
    "3_bytes": (b"GGU", r"is not a GGUF file \(magic b'GGU'", HEADER),
    "bad_magic": (b"GGUX" + bytes(20), r"is not a GGUF file \(magic b'GGUX'", HEADER),
    "version_1": (gguf_bytes(version=1), r"version at byte 4: GGUF version 1 is not supported", HEADER),
    "version_4": (gguf_bytes(version=4), r"version at byte 4: GGUF version 4 is not supported", HEADER),
    # D8: the int64 byte count overflowed to 0 and passed the bounds check
    "dims_2^32_2^32_16": (gguf_bytes(tensors=[tensor("w", [2**32, 2**32, 16])]),
                          r"tensor 'w' dims at byte 45: .* more than 2\^63 - 1 elements", TENSOR),
    # gguf-py's case: the uint64 product of these wraps to 4
    "dims_wrap_to_4": (gguf_bytes(tensors=[tensor("w", [4194305, 4194305, 211106198978564])]),
                       r"tensor 'w' dims at byte 53: .* more than 2\^63 - 1 elements", TENSOR),
    "dim_negative_in_int64": (gguf_bytes(tensors=[tensor("w", [2**63])]),
                              r"tensor 'w' dim 0 at byte 37: 9223372036854775808 is negative", TENSOR),
    "dims_4_terabytes": (gguf_bytes(tensors=[tensor("w", [2**20, 2**20])]),
                         r"tensor 'w' ends at byte 4398046511200 but the file has 65 bytes \(truncated\?\)", TENSOR),
    "tensor_count_2^64-1": (gguf_bytes(counts=(BIG, 0)),
                            r"tensor count \(18,446,744,073,709,551,615 entries of at least 24 bytes\)", HEADER),
    "kv_count_2^63": (gguf_bytes(counts=(0, 2**63)),
                      r"key/value count \(9,223,372,036,854,775,808 entries of at least 13 bytes\)", HEADER),
    "counts_together": (gguf_bytes(counts=(1, 1)) + bytes(30),
                        r"1 keys and 1 tensors at byte 24 needs 37 bytes", HEADER),
    "key_length_2^64-1": (gguf_bytes(counts=(0, 1)) + struct.pack("<Q", BIG) + bytes(8),
                          r"key #0 length at byte 24: 18,446,744,073,709,551,615 bytes, more than the 65,535", HEADER),
    # the spec's limits: a mutated length once read 251 MB of a real file as one key
    "key_of_70000_bytes": (gguf_bytes([kv("k" * 70000, U32, bytes(4))]),
                           r"key #0 length at byte 24: 70,000 bytes, more than the 65,535 GGUF allows", HEADER),
    "key_past_the_end": (gguf_bytes(counts=(0, 1)) + struct.pack("<Q", 100) + bytes(8),
                         r"key #0 at byte 32 needs 100 bytes, but the file ends at byte 40", HEADER),
    "tensor_name_of_65_bytes": (gguf_bytes(tensors=[tensor("t" * 65, [8])], data=F32_8),
                                r"tensor #0 name length at byte 24: 65 bytes, more than the 64 GGUF allows", TENSOR),
    "string_value_length": (gguf_bytes([kv("a.s", STR, struct.pack("<Q", 2**62) + b"xx")]),
                            r"'a.s' at byte 47 needs 4611686018427387904 bytes", HEADER),
    "numeric_array_length": (gguf_bytes([kv("a.arr", ARR, struct.pack("<IQ", U32, 2**61) + bytes(8))]),
                             r"'a.arr' \(2,305,843,009,213,693,952 values\) at byte 53 needs 9223372036854775808 bytes",
                             HEADER),
    "string_array_length": (gguf_bytes([kv("a.strs", ARR, struct.pack("<IQ", STR, 2**40) + string("x"))]),
                            r"'a.strs' \(1,099,511,627,776 entries of at least 8 bytes\)", HEADER),
    "string_array_item_length": (gguf_bytes([kv("a.strs", ARR, struct.pack("<IQ", STR, 2) + string("x")
                                                + struct.pack("<Q", BIG))]),
                                 r"'a.strs'\[1\] at byte 71 needs 18446744073709551615 bytes", HEADER),
    "nested_array_length": (gguf_bytes([kv("a.n", ARR, struct.pack("<IQ", ARR, 2**50) + bytes(12))]),
                            r"'a.n' \(1,125,899,906,842,624 entries of at least 12 bytes\)", HEADER),
    "nested_too_deep": (gguf_bytes([kv("a.n", ARR, struct.pack("<IQ", ARR, 1) * 100 + struct.pack("<IQ", U32, 0))]),
                        r"'a.n'(\[0\]){8} at byte 135: arrays nested more than 8 deep", HEADER),
    "unknown_value_type": (gguf_bytes([kv("a.x", 13, bytes(8))]),
                           r"'a.x' value type at byte 35: unknown value type 13", HEADER),
    "unknown_element_type": (gguf_bytes([kv("a.x", ARR, struct.pack("<IQ", 99, 0))]),
                             r"'a.x' element type at byte 39: unknown value type 99", HEADER),
    "duplicate_key": (gguf_bytes([kv("a", U32, bytes(4)), kv("a", U32, bytes(4))]),
                      r"key #1 at byte 41: duplicate key 'a'", HEADER),
    "unknown_ggml_type": (gguf_bytes(tensors=[tensor("w", [8], ttype=200)], data=F32_8),
                          r"tensor 'w' has ggml type #200 \(unknown\)", TENSOR),
    "row_not_whole_blocks": (gguf_bytes(tensors=[tensor("w", [33], ttype=Q8_0_T)], data=bytes(64)),
                             r"tensor 'w' dim 0 at byte 37: a row of 33 Q8_0 values, not a multiple of its 32", TENSOR),
    "offset_misaligned": (gguf_bytes(tensors=[tensor("w", [1], offset=4)], data=F32_8),
                          r"tensor 'w' offset at byte 49: 4 is not a multiple of the alignment 32", TENSOR),
    "offset_past_the_end": (gguf_bytes(tensors=[tensor("w", [8], offset=2**63)], data=F32_8),
                            r"tensor 'w' ends at byte 9223372036854775904 but the file has 96 bytes", TENSOR),
    "data_truncated": (gguf_bytes(tensors=[tensor("w", [8])], data=F32_8[:-1]),
                       r"tensor 'w' ends at byte 96 but the file has 95", TENSOR),
    "overlapping_tensors": (gguf_bytes(tensors=[tensor("a", [8]), tensor("b", [8], offset=0)], data=F32_8),
                            r"tensor 'b' \(bytes 96-128\) overlaps tensor 'a' \(bytes 96-128\)", TENSOR),
    "duplicate_tensor": (gguf_bytes(tensors=[tensor("a", [8]), tensor("a", [8], offset=32)], data=F32_8 * 2),
                         r"tensor #1 name at byte 57: duplicate tensor 'a'", TENSOR),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_header_is_a_named_checkpoint_error(name, tmp_path):
    data, match, where = CASES[name]
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    seconds, peak = refuse(path, match, metadata_too=where == HEADER)
    if where == TENSOR:  # the metadata-only reader never looks at the tensor table
        assert isinstance(read_gguf_metadata(path), dict)
    print(f"{name}: {len(data)} bytes, refused in {seconds * 1e3:.2f} ms, peak {peak / 1024:.1f} KiB")


def test_huge_n_dims_takes_no_memory(tmp_path):
    # D8: struct.unpack_from("<" + "Q" * n_dims) built a 4 GB format string, then MemoryError after 18 s
    path = tmp_path / "huge_ndims.gguf"
    path.write_bytes(CASES["n_dims_0xffffffff"][0])
    assert path.stat().st_size < 120
    seconds, peak = refuse(path, "n_dims")
    assert peak < 1 << 20 and seconds < 0.1, (peak, seconds)


def test_hostile_files_still_read_when_fixed(tmp_path):
    """The builders above make readable files: the refusals are about the field, not the builder."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 64)),
                                 kv("a.n", ARR, struct.pack("<IQ", ARR, 1) * 7 + struct.pack("<IQ", U32, 0))],
                                [tensor("a", [8]), tensor("b", [8], offset=64), tensor("empty", [0, 2**40])],
                                data=F32_8 + bytes(64) + F32_8))
    with GGUFFile(path) as f:
        assert f.metadata["general.alignment"] == 64 and len(f.tensors) == 3
        assert f.tensors["b"].offset % 64 == 0 and f.tensors["empty"].shape == (2**40, 0)
        assert f.raw("b").numpy().view(np.float32).tolist() == list(range(8))


# --- a valid file written by gguf-py, truncated and mutated ----------------------------------
def write_valid(path, endian=gguf.GGUFEndian.LITTLE):
    w = gguf.GGUFWriter(path, "gemma4", endianess=endian)
    w.add_uint32("a.u32", 7)
    w.add_float32("a.f32", 0.5)
    w.add_bool("a.b", True)
    w.add_string("a.s", "héllo")
    w.add_array("a.strs", ["x", "", "▁▁"])
    w.add_array("a.ints", [1, -2, 3])
    w.add_array("a.nest", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((2, 8)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal(16).astype(np.float16))
    w.add_tensor("q8", rng.integers(0, 256, (2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return write_valid(tmp_path_factory.mktemp("gguf") / "valid.gguf").read_bytes()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "mutated.gguf"


def test_big_endian_file_reads_like_little_endian(tmp_path, valid):
    big = write_valid(tmp_path / "big.gguf", gguf.GGUFEndian.BIG)
    little = tmp_path / "little.gguf"
    little.write_bytes(valid)
    with GGUFFile(big) as b, GGUFFile(little) as l:
        assert b.metadata.keys() == l.metadata.keys() and b.metadata["a.strs"] == ["x", "", "▁▁"]
        assert b.metadata["a.u32"] == 7 and b.metadata["a.ints"].tolist() == [1, -2, 3]
        assert [(t.name, t.shape, t.type, t.offset, t.nbytes) for t in b.tensors.values()] == \
            [(t.name, t.shape, t.type, t.offset, t.nbytes) for t in l.tensors.values()]


def test_every_truncation_is_a_checkpoint_error(tmp_path, valid):
    path = tmp_path / "cut.gguf"
    path.write_bytes(valid)
    with GGUFFile(path) as f:
        assert list(f.tensors) == ["f32", "f16", "q8"] and f.metadata["a.nest"][1].tolist() == [3]
        data_end = max(t.offset + t.nbytes for t in f.tensors.values())  # then only the last padding
    for cut in range(data_end):
        path.write_bytes(valid[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            GGUFFile(path)
    path.write_bytes(valid[:data_end])
    GGUFFile(path).close()


def read_or_refuse(path, size: int) -> None:
    """Read the file both ways: it reads (and its tensors lie inside it) or it is a CheckpointError."""
    try:
        read_gguf_metadata(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    try:
        with GGUFFile(path) as f:
            for t in f.tensors.values():
                assert 0 <= t.offset and t.offset + t.nbytes <= size and f.raw(t.name).numel() == t.nbytes
    except CheckpointError as e:
        assert str(path) in str(e)


# header-field values at the edges: lengths, counts, dims, offsets and types
EDGES = [0, 1, 3, 4, 5, 31, 32, 33, 0xFF, 0xFFFF, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_files_read_or_raise_checkpoint_error(valid, scratch, data):
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(0, 3), "word writes")):  # a u32/u64 field set to an edge value
        at = data.draw(st.integers(0, len(buf) - 8), "word at")
        width = data.draw(st.sampled_from([4, 8]), "width")
        value = data.draw(st.sampled_from(EDGES), "value") % (1 << 8 * width)
        buf[at:at + width] = value.to_bytes(width, "little")
    for _ in range(data.draw(st.integers(0, 6), "byte writes")):
        buf[data.draw(st.integers(0, len(buf) - 1), "byte at")] = data.draw(st.integers(0, 255), "byte")
    buf = buf[:data.draw(st.integers(0, len(buf)), "length")] if data.draw(st.booleans(), "truncate") else buf
    scratch.write_bytes(buf)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        read_or_refuse(scratch, len(buf))
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK and seconds < MAX_SECONDS, (peak, seconds)
