"""Which media containers client bytes may reach, and cheap header-level probes of them.

FFmpeg picks a demuxer from the content when none is named, and some demuxers open other
resources: an `ffconcat` text makes the concat demuxer read the files it lists (relative to the
process's working directory), an SDP text binds the UDP ports it names, HLS and DASH fetch what
their playlists list. So every byte string is sniffed here, from its own signature, against an
allow-list of plain containers, and FFmpeg is only ever opened with that demuxer named
(`format=`), with no protocol allowed for nested opens (`protocol_whitelist`) and no other
demuxer allowed to probe (`format_whitelist`). A refusal depends on the bytes alone, so it
reads the same whether or not a path they mention exists.

`probe_audio` / `probe_video` give duration and frame count without decoding samples or
pixels, for a request's cost model; they stop counting past the limits decoding enforces.
"""
from __future__ import annotations

import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import av

from unigemma.errors import InputError

# demuxer name -> what the error message calls it. Only these ever reach FFmpeg.
ACCEPTED = {"wav": "WAV", "flac": "FLAC", "ogg": "Ogg", "mp3": "MP3", "aac": "AAC (ADTS)",
            "mp4": "MP4/MOV", "matroska": "WebM/Matroska", "avi": "AVI"}
SNDFILE_KINDS = ("wav", "flac", "ogg", "mp3")  # what libsndfile reads itself (audio.py tries it first)
HEAD_BYTES = 64  # every signature below lies in the first bytes (after an ID3 tag for MP3/FLAC/AAC)

# Limits that decoding enforces; probes stop counting once past them. The frame cap does not
# trust the header's frame rate: a clip whose header claims 1000 fps still has to carry a
# packet per frame, and decoding cost grows with the packets, not with the 32 sampled frames.
MAX_SECONDS = 3600.0  # longest video clip, from its packets' timestamps
MAX_FRAMES = 10_000  # most video packets (frames) in one clip: ~7 min at 24 fps, 2.8 min at 60
MAX_FRAME_PIXELS = 7680 * 4320  # 8K
MAX_PROBE_SECONDS = 600.0  # audio: counting stops here (20x the 30 s default limit)

# Nested opens (concat entries, HLS segments, MOV data references) need a protocol; none is
# allowed. "none" is no protocol's name. The input itself is our own in-memory reader.
_OPTIONS = {"protocol_whitelist": "none", "enable_drefs": "0"}
_ISO_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")  # MP4/QuickTime first box
_IMAGES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
           (b"BM", "a BMP image"))


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    seconds: float  # from the packets' timestamps (frames / header rate when they have none)
    frames: int  # video packets counted, never the header's claim
    fps: float  # frames / seconds as torchcodec's exact mode reports it


def sniff(head: bytes, what: str) -> str:
    """The demuxer for bytes starting with `head`, or InputError saying what was refused.

    `what` starts the message ("audio bytes (12 B): not a readable audio file")."""
    if not isinstance(head, (bytes, bytearray)):
        raise InputError(f"{what}: expected bytes, got {type(head).__name__} (open files in binary mode)")
    kind = _container(bytes(head))
    if kind is None:
        raise InputError(f"{what}: {_describe(head)} is not an accepted format "
                         f"(accepted: {', '.join(ACCEPTED.values())})")
    return kind


def _container(head: bytes) -> str | None:
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[4:8] in _ISO_BOXES:
        return "mp4"
    if head[:3] == b"ID3" and len(head) >= 10:
        # An ID3v2 tag may front MP3, AAC or FLAC: look past it (size is 4 x 7 bits).
        size = 10 + int.from_bytes(bytes(b & 0x7F for b in head[6:10]), "big") + (10 if head[5] & 0x10 else 0)
        after = head[size:size + 4]
        return "flac" if after == b"fLaC" else "aac" if _adts(after) else "mp3"
    if _adts(head):
        return "aac"
    if _mpeg_audio(head):
        return "mp3"
    return None


def _adts(head: bytes) -> bool:
    # 12-bit sync, layer 00, sampling-frequency index below 13.
    return len(head) >= 4 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0 and (head[2] >> 2) & 0xF < 13


def _mpeg_audio(head: bytes) -> bool:
    # 11-bit sync; version, layer, bitrate and rate fields not the reserved/invalid values.
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    return (head[1] >> 3) & 3 != 1 and (head[1] >> 1) & 3 != 0 and head[2] >> 4 != 0xF and (head[2] >> 2) & 3 != 3


def _describe(head: bytes) -> str:
    """A name for refused bytes; a guess only, for the message."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lower = text.lower()
    for sig, name in _IMAGES:
        if text.startswith(sig):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if lower.startswith(b"ffconcat"):
        return "an FFmpeg concat script"
    if lower.startswith(b"v=0"):
        return "an SDP session description"
    if lower.startswith(b"#extm3u"):
        return "an HLS playlist"
    if lower.startswith((b"<?xml", b"<mpd")) and b"mpd" in lower:
        return "a DASH manifest"
    if head and all(32 <= b < 127 or b in b"\t\r\n" for b in text[:HEAD_BYTES]):
        return "text"
    return "unrecognised data" if head else "empty input"


def open_input(src: bytes | BinaryIO, kind: str):
    """PyAV input for allow-listed `kind` (from `sniff`): that demuxer only, nothing nested.

    A file object is read through PyAV's own I/O, never by FFmpeg's file protocol."""
    if kind not in ACCEPTED:  # a programming error: sniff() is the only source of kinds
        raise ValueError(f"container {kind!r} is not on the allow-list")
    stream = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    return av.open(stream, format=kind, options={**_OPTIONS, "format_whitelist": kind})


@contextmanager
def _readable(data: bytes | str | os.PathLike):
    """(first bytes, what open_input takes): bytes as they are; a path opened here and read
    through Python I/O as the demuxer asks, never loaded whole."""
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            head = f.read(HEAD_BYTES)
            f.seek(0)
            yield head, f
    else:
        yield bytes(data[:HEAD_BYTES]), data


def probe_audio(data: bytes | str | os.PathLike) -> float:
    """Seconds of audio in `data` (bytes or a file's path), from headers or packet durations,
    without decoding samples.

    Counting stops past MAX_PROBE_SECONDS (the result is then "at least that"). Refused or
    unreadable bytes raise InputError."""
    with _readable(data) as (head, src):
        return _probe_audio(head, src)


def _probe_audio(head: bytes, data) -> float:
    size = f"{len(data)} B" if isinstance(data, (bytes, bytearray, memoryview)) else "a file"
    kind = sniff(head, f"audio bytes ({size}): not a readable audio file")
    if kind in SNDFILE_KINDS:
        import soundfile as sf
        try:
            info = sf.info(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
            # (a header parse; libsndfile never opens other files)
            if info.samplerate > 0 and info.frames >= 0:
                return info.frames / info.samplerate
        except (sf.LibsndfileError, RuntimeError, OSError, ValueError):
            pass  # e.g. an MP3 libsndfile cannot parse: count FFmpeg's packets instead
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data.seek(0)
    try:
        with open_input(data, kind) as container:
            if not container.streams.audio:
                raise InputError(f"audio bytes: the {ACCEPTED[kind]} file has no audio stream")
            stream = container.streams.audio[0]
            seconds = 0.0
            for packet in container.demux(stream):
                if packet.duration and packet.time_base:
                    seconds += float(packet.duration * packet.time_base)
                elif packet.size and stream.codec_context and stream.codec_context.sample_rate:
                    # No duration: a frame of this codec, or the AAC/MP3 default of 1152 samples.
                    samples = stream.codec_context.frame_size or 1152
                    seconds += samples / stream.codec_context.sample_rate
                if seconds > MAX_PROBE_SECONDS:
                    break
            return seconds
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:
        raise InputError(f"audio bytes: corrupt or truncated {ACCEPTED[kind]} file (FFmpeg: {e})") from e


def probe_video(data: bytes | str | os.PathLike) -> VideoProbe:
    """Size, duration and real frame count of a clip (bytes or a file's path), from its packets;
    nothing is decoded.

    Refuses (InputError) refused formats and clips over MAX_FRAMES packets, MAX_SECONDS or
    MAX_FRAME_PIXELS, stopping the count as soon as one is passed."""
    with _readable(data) as (head, src):
        kind = sniff(head, "cannot decode video")
        return scan_video(lambda: open_input(src, kind))


def scan_video(opened) -> VideoProbe:
    """Count and time the video packets of `opened()` (a fresh PyAV input), torchcodec-style:
    frames = packets, fps = frames / (end - start of their presentation times)."""
    try:
        with opened() as container:
            return _scan(container)
    except InputError:
        raise
    except EOFError as e:  # av.error.EOFError: the data ends before FFmpeg found a frame
        raise InputError("the video has no frames: the file ends before any (empty or truncated)") from e
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot decode video: {type(e).__name__}: {e}") from e


def _scan(container) -> VideoProbe:
    if not container.streams.video:
        raise InputError("the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.width, stream.height
    if width <= 0 or height <= 0:
        raise InputError(f"the video stream has no frame size ({width}x{height}): damaged header")
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(f"video frames are {width}x{height}, over {MAX_FRAME_PIXELS:,} pixels")
    header_fps = float(stream.average_rate or stream.guessed_rate or 24.0)
    base = float(stream.time_base) if stream.time_base else 0.0
    count, begin, end = 0, None, None
    for packet in container.demux(stream):
        if packet.size == 0:
            continue  # the demuxer's end-of-stream flush packet
        count += 1
        if count > MAX_FRAMES:
            raise InputError(f"the video has over {MAX_FRAMES:,} frames (whatever its header's frame "
                             f"rate); the limit is {MAX_FRAMES:,}")
        t = packet.pts if packet.pts is not None else packet.dts
        if t is not None:
            stop = t + (packet.duration or 0)
            begin, end = (t, stop) if begin is None else (min(begin, t), max(end, stop))
            if (end - begin) * base > MAX_SECONDS:
                raise InputError(f"video is longer than {MAX_SECONDS:.0f} s")
    if count == 0:
        raise InputError("the video has no frames")
    span = (end - begin) * base if begin is not None else 0.0
    fps = count / span if span > 0 else header_fps
    # A cut file still demuxes the packets it has: compare with what the header promises.
    promised = stream.frames or (float(stream.duration * stream.time_base) * header_fps
                                 if stream.duration and stream.time_base else 0)
    if not promised and container.duration and len(container.streams) == 1:
        promised = container.duration / 1e6 * header_fps
    if count < 0.9 * promised - 1:
        raise InputError(f"the video is truncated: {count} frames found, its header promises about {promised:.0f}")
    seconds = span if span > 0 else count / header_fps
    if seconds > MAX_SECONDS:
        raise InputError(f"video is longer than {MAX_SECONDS:.0f} s")
    return VideoProbe(width, height, seconds, count, fps)
