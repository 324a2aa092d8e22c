"""Audio in, model features out: decode, downmix, resample to 16 kHz, cut into 640-sample frames.

The unified model has no audio encoder (spec §6): every 40 ms frame of raw 16 kHz samples
is one soft token. `preprocess_audio`/`batch_audio` reproduce transformers'
`Gemma4UnifiedAudioFeatureExtractor` exactly. `load_audio` reproduces the reference loader's
soundfile path (`transformers.audio_utils.load_audio(..., backend="soundfile")`, i.e.
`librosa.load`): libsndfile decode to float32, downmix by averaging, soxr "HQ" resampling,
length ceil(n * 16000 / rate). Same file, same samples, bit for bit. Formats libsndfile
cannot read (m4a/aac, webm, ...) go through FFmpeg (PyAV); the reference would use
torchcodec there, whose resampler differs slightly.

Encoded input (bytes, data URIs, files) is sniffed against container.py's allow-list first, and
FFmpeg only ever opens it with that demuxer named: FFmpeg's own probing would let an ffconcat
or SDP text open local files or sockets.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import av
import numpy as np
import soundfile as sf
import soxr
import torch

from unigemma.errors import InputError
from unigemma.processing.container import ACCEPTED, HEAD_BYTES, SNDFILE_KINDS, open_input, sniff

SAMPLING_RATE = 16_000  # the model hears 16 kHz mono
SAMPLES_PER_TOKEN = 640  # 40 ms of 16 kHz audio per soft token
# The unified processor itself does not cap length; 30 s = 750 tokens is the processor's
# `audio_seq_length` default and vLLM's per-item maximum, i.e. what the model was built for.
DEFAULT_MAX_SECONDS = 30.0
# soxr "HQ" (20-bit precision) is what librosa and the reference loader use; "VHQ" would be
# marginally cleaner but would no longer give the reference's samples bit for bit.
RESAMPLE_QUALITY = "HQ"
# Sanity bounds on what a (possibly damaged) header may claim, so decoding stays cheap.
MAX_CHANNELS = 32  # also: the short axis of a 2-D array counts as channels up to this many
MAX_RATE = 768_000  # the highest PCM rate in use (32x 24 kHz)
BLOCK_FRAMES = 1 << 16  # decoded and downmixed at a time (32 channels: 8 MB of float32)

_INT_SCALE = {np.dtype(np.int8): 2.0 ** 7, np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31}
# libsndfile logs "data : <header size> (should be <real size>)" for a WAV cut short; 0 and
# 0xFFFFFFFF are the "unknown length" sizes streaming writers put there, not truncation.
_WAV_SHORT = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = (0, 0xFFFFFFFF, 0xFFFFFFFF - 8)


@dataclass(frozen=True)
class ProcessedAudio:
    """One clip as the model takes it; `num_soft_tokens` placeholders go into the prompt."""
    input_features: np.ndarray  # float32 [T, 640]: frame t = samples 640t .. 640t+639, tail zero-padded
    mask: np.ndarray  # bool [T], all True (the padded last frame is a real token)
    num_soft_tokens: int  # T = ceil(num_samples / 640)


# --- loading ----------------------------------------------------------------------------
def load_audio(source: Any, *, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Any supported audio source -> float32 mono samples at 16 kHz.

    `source` is a path (str or Path), encoded bytes, a binary file object, a
    `data:audio/...;base64,` URI, or samples: a numpy array / torch tensor (1-D mono, or 2-D
    with channels on the shorter axis) or list, bare (assumed to be 16 kHz already), as
    `(samples, sample_rate)`, or as a dict `{"array": ..., "sampling_rate": ...}` (Hugging Face
    datasets; `{"bytes": ...}` / `{"path": ...}` work too). Integer PCM is scaled to [-1, 1).
    Audio longer than `max_seconds` (None: no limit) and anything unreadable raise InputError.
    """
    if max_seconds is not None and not max_seconds > 0:
        raise InputError(f"max_seconds must be positive or None, got {max_seconds!r}")
    wave, rate, name = _decode(source, max_seconds)
    if wave.shape[1] == 0:
        raise InputError(f"{name}: audio is empty (0 samples)")
    finite = np.isfinite(wave)
    if not finite.all():
        # Checked before resampling: one NaN would smear over the filter's whole support.
        first = int(np.argmin(finite.all(axis=0)))
        raise InputError(f"{name}: audio has {int((~finite).sum())} NaN/infinite sample(s), "
                         f"the first at frame {first} ({first / rate:.3f} s)")
    _check_length(wave.shape[1], rate, max_seconds, name)
    mono = _mono(wave)  # encoded input arrives downmixed already ([1, frames])
    if rate != SAMPLING_RATE:
        length = math.ceil(mono.shape[-1] * SAMPLING_RATE / rate)
        mono = soxr.resample(mono, rate, SAMPLING_RATE, quality=RESAMPLE_QUALITY)
        mono = np.pad(mono, (0, max(0, length - len(mono))))[:length]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_length(frames: int, rate: float, max_seconds: float | None, name: str, partial: bool = False) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        # `partial`: decoding stopped here, so the real length is unknown but larger.
        length = f"over {max_seconds:g} s" if partial else f"{frames / rate:.2f} s"
        raise InputError(f"{name}: audio is {length} long; the limit is {max_seconds:g} s "
                         f"({int(max_seconds * SAMPLING_RATE) // SAMPLES_PER_TOKEN} audio tokens)")


def _check_format(channels: int, rate: float, name: str) -> None:
    if not 0 < channels <= MAX_CHANNELS:
        raise InputError(f"{name}: audio has {channels} channels; 1 to {MAX_CHANNELS} are supported")
    if not 0 < rate <= MAX_RATE:
        raise InputError(f"{name}: sample rate {rate:g} Hz is outside 1 Hz .. {MAX_RATE} Hz")


def _decode(source: Any, max_seconds: float | None) -> tuple[np.ndarray, float, str]:
    """Source -> (float32 [channels, frames] (encoded input: [1, frames], downmixed), rate, a name for errors)."""
    if isinstance(source, tuple) and len(source) == 2:
        return _from_array(source[0], source[1], "audio array") + ("audio array",)
    if isinstance(source, Mapping):
        if "array" in source:
            rate = source.get("sampling_rate", source.get("sample_rate"))
            if rate is None:
                raise InputError("audio dict has 'array' but no 'sampling_rate'")
            return _from_array(source["array"], rate, "audio array") + ("audio array",)
        if source.get("bytes") is not None:
            return _decode(source["bytes"], max_seconds)
        if source.get("path") is not None:
            return _decode(source["path"], max_seconds)
        raise InputError(f"audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {list(source)[:10]}")
    if isinstance(source, (np.ndarray, torch.Tensor, list)):
        return _from_array(source, SAMPLING_RATE, "audio array") + ("audio array",)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_encoded(bytes(source), f"audio bytes ({len(source)} B)", max_seconds)
    if isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(f"audio data URI must be 'data:<type>;base64,<data>', got {header[:60]!r}")
        return _decode_encoded(_b64(payload, "audio data URI"), "audio data URI", max_seconds)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        # Fetching is the caller's business (timeouts, size limits, which hosts to trust).
        raise InputError(f"audio URLs are not fetched; download {source[:80]!r} and pass the file or its bytes")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if _is(path, Path.is_file):
            return _decode_encoded(str(path), f"audio file {path.name!r}", max_seconds)
        # Like the reference: a string that is no file may be bare base64 of a file.
        if isinstance(source, str) and len(source) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", source):
            return _decode_encoded(_b64(source, "audio base64 string"), "audio base64 string", max_seconds)
        what = "is a directory" if _is(path, Path.is_dir) else "does not exist"
        raise InputError(f"audio file {str(path)[:200]!r} {what}")
    if hasattr(source, "read"):
        try:
            data = source.read()
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the audio file object: {type(e).__name__}: {e}") from e
        if not isinstance(data, (bytes, bytearray)):
            raise InputError("audio file object must be opened in binary mode")
        return _decode_encoded(bytes(data), f"audio file object ({len(data)} B)", max_seconds)
    raise InputError(f"unsupported audio source type {type(source).__name__} (expected a path, bytes, a file "
                     "object, a data URI, an array, (array, sampling_rate) or {'array', 'sampling_rate'})")


def _is(path: Path, test) -> bool:
    try:
        return test(path)
    except (OSError, ValueError):  # a name too long, or with a NUL, is no file
        return False


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name} is not valid base64: {e}") from e


def _from_array(array: Any, rate: Any, name: str) -> tuple[np.ndarray, float]:
    """User-given samples -> (float32 [channels, frames], rate)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) \
            or not math.isfinite(rate) or rate <= 0:
        raise InputError(f"{name}: sampling rate must be a positive number, got {rate!r}")
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        # numpy has no bfloat16: floats go through float32, integers keep their width for scaling.
        array = (array.float() if array.is_floating_point() else array).numpy()
    try:
        array = np.asarray(array)
    except (ValueError, TypeError) as e:  # e.g. ragged nested lists
        raise InputError(f"{name}: not an array of samples: {e}") from e
    if array.dtype in _INT_SCALE:
        array = array.astype(np.float32) / np.float32(_INT_SCALE[array.dtype])
    elif array.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        array = (array.astype(np.float32) - 128) / np.float32(128)
    elif array.dtype.kind != "f":
        raise InputError(f"{name}: samples must be float (in [-1, 1]) or int8/16/32 PCM, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.size == 0 and array.ndim in (1, 2):
        array = array.reshape(1, 0)  # reported as empty by the caller
    elif array.ndim == 1 or (array.ndim == 2 and 1 in array.shape):
        array = array.reshape(1, -1)
    elif array.ndim != 2:
        raise InputError(f"{name}: samples must be 1-D or 2-D (channels x frames), got shape {array.shape}")
    else:
        short = int(np.argmin(array.shape))
        if array.shape[short] == array.shape[1 - short] or array.shape[short] > MAX_CHANNELS:
            raise InputError(f"{name}: cannot tell channels from samples in shape {array.shape}; pass "
                             f"[channels, frames] with at most {MAX_CHANNELS} channels, or mono 1-D")
        array = array if short == 0 else array.T
    _check_format(array.shape[0], float(rate), name)
    return array, float(rate)


def _decode_encoded(src: str | bytes, name: str, max_seconds: float | None) -> tuple[np.ndarray, float, str]:
    """An encoded file (path or bytes) -> (float32 [channels, frames], rate, name)."""
    if isinstance(src, bytes) and not src:
        raise InputError(f"{name}: audio is empty (0 bytes)")
    try:
        head = src[:HEAD_BYTES] if isinstance(src, bytes) else _head(src)
    except OSError as e:
        raise InputError(f"{name}: cannot open audio: {type(e).__name__}: {e}") from e
    kind = sniff(head, f"{name}: not a readable audio file")
    if kind not in SNDFILE_KINDS:
        return _decode_ffmpeg(src, kind, name, max_seconds, sf_error="not tried") + (name,)
    try:
        opened = sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else src)
    except sf.LibsndfileError as e:
        # Only a format libsndfile does not know goes to FFmpeg; a file it knows but finds
        # malformed is broken (FFmpeg would happily return a truncated Ogg's first half).
        if e.code not in (1, 4):  # SF_ERR_UNRECOGNISED_FORMAT, SF_ERR_UNSUPPORTED_ENCODING
            raise InputError(f"{name}: corrupt or truncated audio ({e.error_string})") from e
        return _decode_ffmpeg(src, kind, name, max_seconds, sf_error=e.error_string) + (name,)
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        raise InputError(f"{name}: cannot open audio: {type(e).__name__}: {e}") from e
    with opened as f:
        _check_format(f.channels, f.samplerate, name)  # before decoding a huge file
        _check_length(f.frames, f.samplerate, max_seconds, name)
        try:
            wave = _read_mono(f)[None]
        except (RuntimeError, OSError, ValueError) as e:
            raise InputError(f"{name}: corrupt or truncated audio: {e}") from e
        declared, log, rate = f.frames, f.extra_info, f.samplerate
    if wave.shape[1] == 0:
        # libsndfile reports 0 frames for e.g. an Ogg cut before its last page.
        raise InputError(f"{name}: no samples could be decoded (empty, truncated or corrupt file)")
    short = _WAV_SHORT.search(log)
    if short and int(short[1]) not in _STREAMING_SIZES and int(short[1]) > int(short[2]):
        raise InputError(f"{name}: truncated audio: the header declares {short[1]} data bytes, "
                         f"the file holds {short[2]}")
    # MP3 without a Xing header only has an estimated length, hence the slack (~2 % + 4 frames).
    if wave.shape[1] < 0.98 * declared - 4 * 1152:
        raise InputError(f"{name}: truncated audio: decoded {wave.shape[1]} of the {declared} frames "
                         "the header declares")
    return wave, float(rate), name


def _mono(wave: np.ndarray) -> np.ndarray:
    """float32 [channels, frames] -> [frames]: the reference's average, column by column, so a
    block-wise downmix gives the same bits as downmixing the whole file at once."""
    return wave.mean(axis=0) if wave.shape[0] > 1 else wave[0]


def _read_mono(f: sf.SoundFile) -> np.ndarray:
    """All of `f` as float32 mono. Over two channels it is read and downmixed block by block, so
    memory follows the mono output, not a 32-channel 768 kHz input; up to two (all MP3s) in one
    read, as the reference does: libsndfile's MP3 decoder gives other bits when read in pieces."""
    if f.channels <= 2:
        return _mono(f.read(dtype="float32", always_2d=True).T)
    blocks = []
    while len(block := f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):  # only what was read
        blocks.append(_mono(block.T))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def _decode_ffmpeg(src: str | bytes, kind: str, name: str, max_seconds: float | None,
                   sf_error: str) -> tuple[np.ndarray, float]:
    """Decode through FFmpeg (PyAV) what libsndfile cannot: m4a/aac, webm, mkv audio, ...

    `kind` is the allow-listed demuxer `sniff` chose; a file is read through our own file
    object, so FFmpeg's file protocol (and every other) stays off."""
    with ExitStack() as stack:
        try:
            file = src if isinstance(src, bytes) else stack.enter_context(open(src, "rb"))
            container = stack.enter_context(open_input(file, kind))
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
            raise InputError(f"{name}: not a readable audio file ({ACCEPTED[kind]}; libsndfile: {sf_error}; "
                             f"FFmpeg: {e})") from e
        if not container.streams.audio:
            raise InputError(f"{name}: the file has no audio stream ({container.format.name})")
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # a codec id FFmpeg cannot decode (or a damaged header)
            raise InputError(f"{name}: FFmpeg has no decoder for its audio stream ({container.format.name})")
        # Convert to planar float32 only: rate and channels stay, downmix and resampling are ours.
        converter = av.AudioResampler(format="fltp")
        chunks, frames, rate, first = [], 0, stream.codec_context.sample_rate, None
        try:
            for decoded in container.decode(stream):
                # A damaged stream can switch layout mid-way (seen: AAC going from 1 to 29
                # channels); PyAV then reads planes that are not there and crashes the process.
                shape = (len(decoded.layout.channels), decoded.sample_rate or 0)
                if first is None:
                    _check_format(*shape, name)
                    first = shape
                planes = shape[0] if decoded.format.is_planar else 1
                if shape != first or len(decoded.planes) != planes:
                    raise InputError(f"{name}: corrupt audio: the stream changes from {first[0]} channels at "
                                     f"{first[1]} Hz to {shape[0]} channels at {shape[1]} Hz mid-way")
                for frame in converter.resample(decoded):
                    chunks.append(_mono(frame.to_ndarray()))  # downmixed as decoded
                    frames, rate = frames + frame.samples, frame.sample_rate
                    if rate:
                        _check_length(frames, rate, max_seconds, name, partial=True)  # stop early
            for frame in converter.resample(None):
                chunks.append(_mono(frame.to_ndarray()))
        except InputError:
            raise
        except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
            raise InputError(f"{name}: corrupt or truncated audio (FFmpeg: {e})") from e
    if not chunks or not rate:
        raise InputError(f"{name}: audio is empty (FFmpeg decoded no samples from {container.format.name})")
    return np.concatenate(chunks)[None].astype(np.float32, copy=False), float(rate)


# --- features ---------------------------------------------------------------------------
def preprocess_audio(samples: np.ndarray) -> ProcessedAudio:
    """16 kHz mono samples -> [T, 640] frames, T = ceil(n / 640), the last one zero-padded."""
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.dtype.kind != "f":
        raise InputError(f"audio samples must be 1-D float (16 kHz mono), got {samples.dtype} {samples.shape}")
    if samples.size == 0:
        raise InputError("audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise InputError("audio has NaN/infinite samples")
    tokens = -(-samples.size // SAMPLES_PER_TOKEN)
    features = np.zeros((tokens, SAMPLES_PER_TOKEN), np.float32)
    features.reshape(-1)[: samples.size] = samples  # float32 cast, as the reference's astype
    return ProcessedAudio(features, np.ones(tokens, bool), tokens)


def batch_audio(items: list[ProcessedAudio]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips -> (`input_features` float32 [N, T_max, 640], `input_features_mask` bool [N, T_max]).

    Shorter clips are padded at the end with zero frames whose mask is False.
    """
    if not items:
        raise InputError("batch_audio needs at least one clip")
    longest = max(len(item.input_features) for item in items)
    features = torch.zeros(len(items), longest, SAMPLES_PER_TOKEN, dtype=torch.float32)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        features[i, : len(item.input_features)] = torch.from_numpy(np.asarray(item.input_features, np.float32))
        mask[i, : len(item.mask)] = torch.from_numpy(np.asarray(item.mask, bool))
    return features, mask
