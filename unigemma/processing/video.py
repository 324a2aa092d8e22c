"""Videos -> frames for the vision embedder: decode with PyAV, sample 32 frames, 70 tokens each.

As transformers' `Gemma4UnifiedVideoProcessor` + `Gemma4UnifiedProcessor`:
  * the clip's frame count and fps come from a scan of its packets, as torchcodec's exact mode
    (transformers' default video decoder) reports them: count = video packets, fps = count /
    (end - start of the packets' presentation times), the header's rate when that is unknown;
  * frame indices `arange(n) * total // n` (uniform, first frame included), n = 32
    (`default_sample_indices_fn`);
  * each frame sized and patched like an image (`image.py`) with a 70-soft-token budget; the
    rescale is the video processor's fused normalize, `x / 255` (the image processor's is
    `x * (1/255)`, which can differ in the last bit);
  * the prompt gets, per frame, "mm:ss <|image>" + n x "<|video|>" + "<image|>", joined by single
    spaces, mm:ss being the frame's index / fps (`timestamp_text`; the expansion is chat.py's).
Where the reference refuses a clip shorter than 32 frames, we take all of its frames. Raw frame
arrays play at 24 fps unless told otherwise, as in the reference.

Encoded clips only reach FFmpeg as an allow-listed container (container.py). Cost follows the
output: the frame count comes from packets (never the header's fps) and is capped, and each
sampled frame is scaled down as it is decoded, so a 4K clip never holds 32 full-size frames.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InputError
from .container import HEAD_BYTES, MAX_FRAME_PIXELS, MAX_FRAMES, MAX_SECONDS, open_input, scan_video, sniff
from .image import PATCH, SOFT_TOKEN_BUDGETS, check_budget, patchify, resize, target_size

NUM_FRAMES = 32
DEFAULT_FPS = 24.0  # what the reference assumes for frames given without metadata
DECODE_THREADS = 2  # per clip; the server runs several decodes at once anyway
# MAX_SECONDS, MAX_FRAMES (packets counted, whatever the header's fps) and MAX_FRAME_PIXELS live in
# container.py, where the packet scan enforces them; every frame up to the last sampled one is decoded.
__all__ = ["MAX_FRAMES", "MAX_FRAME_PIXELS", "MAX_SECONDS", "Clip", "ProcessedVideo", "load_video",
           "preprocess_video", "sample_indices", "timestamp_text"]


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8, the sampled frames
    timestamps: list[float]  # seconds of each sampled frame (index / fps)
    fps: float
    total_frames: int
    indices: list[int] | None = None  # which frames of the clip were sampled
    source_size: tuple[int, int] | None = None  # (H, W) as decoded, when `frames` were scaled down


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor  # [F, max_soft_tokens, 6912] float32
    position_ids: torch.Tensor  # [F, max_soft_tokens, 2] int64, (-1, -1) on padding rows
    num_soft_tokens: list[int]  # per frame (all equal: one size per clip)
    timestamps: list[float]


def sample_indices(total: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """`default_sample_indices_fn`'s uniform pick; all frames when the clip has fewer."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise InputError(f"num_frames must be a positive integer, got {num_frames!r}")
    n = min(int(num_frames), int(total))
    return np.arange(n, dtype=int) * int(total) // n


def timestamp_text(seconds: float) -> str:
    """"mm:ss" as the reference writes it (minutes are not wrapped: one hour is "60:00")."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


# --- raw frames -----------------------------------------------------------------------------
def _from_frames(frames: Any, fps: float, num_frames: int) -> Clip:
    """uint8 frames [F, H, W, 3] or [F, 3, H, W] (array, tensor, or a list of PIL images / arrays)."""
    if isinstance(frames, (list, tuple)) and frames and not isinstance(frames[0], (int, float)):
        frames = [np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames]
        if len({f.shape for f in frames}) > 1:
            raise InputError("video frames must all have one size")
        frames = np.stack(frames)
    a = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.ndim == 4 and a.shape[1] == 3 and a.shape[-1] != 3:
        a = a.transpose(0, 2, 3, 1)  # channel-first, as torchvision videos are
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8 or 0 in a.shape:
        raise InputError(f"video frames must be a non-empty uint8 array [frames, H, W, 3], got {a.dtype} {a.shape}")
    if a.shape[1] * a.shape[2] > MAX_FRAME_PIXELS:
        raise InputError(f"video frames are {a.shape[2]}x{a.shape[1]}, over {MAX_FRAME_PIXELS:,} pixels")
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        fps = float("nan")
    if not (np.isfinite(fps) and fps > 0):
        raise InputError(f"video fps must be a positive number, got {fps!r}")
    idx = sample_indices(len(a), num_frames)
    return Clip(np.ascontiguousarray(a[idx]), [int(i) / fps for i in idx], fps, len(a), idx.tolist())


# --- files ------------------------------------------------------------------------------
def _opener(source: Any) -> Callable[[], Any]:
    """A function returning a fresh PyAV input each call (the clip is read twice).

    Bytes, files and file objects alike are sniffed first: FFmpeg only ever sees an
    allow-listed container named explicitly (container.py), so no input can make it open
    another file or a socket."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("video bytes are empty")
        data = bytes(source)
        kind = sniff(data[:HEAD_BYTES], "cannot decode video")
        return lambda: open_input(data, kind)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InputError(f"video URLs are not fetched; download {source[:80]} and pass the file or its bytes")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"video file {path} does not exist" if not path.exists() else f"{path} is not a file")
        with open(path, "rb") as f:
            kind = sniff(f.read(HEAD_BYTES), f"cannot decode video {path.name!r}")
        return lambda: _open_file(path, kind)
    if hasattr(source, "read") and hasattr(source, "seek"):
        source.seek(0)
        kind = sniff(source.read(HEAD_BYTES), "cannot decode video")

        def rewound():
            source.seek(0)
            return open_input(source, kind)
        return rewound
    if hasattr(source, "read"):  # a pipe or socket: keep the bytes for the second read
        return _opener(source.read())
    raise InputError(f"cannot read a video from a {type(source).__name__}")


@contextmanager
def _open_file(path: Path, kind: str):
    # Read through PyAV's I/O on our file object: FFmpeg's file protocol stays off.
    with open(path, "rb") as f, open_input(f, kind) as container:
        yield container


def _kept_size(height: int, width: int, max_soft_tokens: int | None) -> tuple[int, int]:
    """The size a sampled frame is kept at: the budget's target size when the caller knows the
    budget (what preprocess_video resizes to anyway, with the same kernel), else full size up to
    the largest budget's target, so memory follows the output and not a 4K or 8K input."""
    if max_soft_tokens is not None:
        return target_size(height, width, max_soft_tokens)
    h, w = target_size(height, width, max(SOFT_TOKEN_BUDGETS))
    return (height, width) if height * width <= h * w else (h, w)


def _shrink(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One decoded [H, W, 3] frame -> [h, w, 3], by image.resize (the reference's kernel)."""
    if rgb.shape[:2] == size:
        return rgb
    small = resize(torch.from_numpy(rgb).permute(2, 0, 1), *size)
    return np.ascontiguousarray(small.permute(1, 2, 0).numpy())


def _decode(opened, wanted: list[int], size: tuple[int, int]) -> np.ndarray:
    """Decode in presentation order up to the last wanted frame, keeping only the wanted ones,
    each scaled to `size` as soon as it is decoded into its slot of the output [F, h, w, 3]:
    one full-size frame is alive at a time, and the kept frames are never copied again."""
    last, slot, done = max(wanted), {i: k for k, i in enumerate(wanted)}, set()
    out = np.empty((len(wanted), *size, 3), np.uint8)
    with opened() as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # threads change speed only, never pixels
        # Each frame thread holds frames of its own: a fixed count keeps a 4K clip's decoder memory
        # the same on a 2-core laptop and a 64-core server (FFmpeg's default is cores + 1).
        stream.codec_context.thread_count = DECODE_THREADS
        full = dict(width=stream.width, height=stream.height)  # frames that change size mid-clip are scaled back
        for i, frame in enumerate(container.decode(stream)):
            if i in slot:
                same = frame.width == full["width"] and frame.height == full["height"]
                out[slot[i]] = _shrink(frame.to_ndarray(format="rgb24", **({} if same else full)), size)
                done.add(i)
            if i >= last:
                break
    missing = [i for i in wanted if i not in done]
    if missing:
        raise InputError(f"the video is corrupt: frame {missing[0]} of its packets does not decode")
    return out


def _decode_file(source: Any, num_frames: int, max_soft_tokens: int | None) -> Clip:
    opened = _opener(source)
    try:
        probe = scan_video(opened)  # refuses over MAX_FRAMES / MAX_SECONDS before any decoding
        idx = sample_indices(probe.frames, num_frames)
        frames = _decode(opened, idx.tolist(), _kept_size(probe.height, probe.width, max_soft_tokens))
    except InputError:
        raise
    except EOFError as e:  # av.error.EOFError: the data ends before FFmpeg found a frame
        raise InputError("the video has no frames: the file ends before any (empty or truncated)") from e
    except Exception as e:  # PyAV raises its FFmpegError family, OSError, ValueError, ...
        raise InputError(f"cannot decode video: {type(e).__name__}: {e}") from e
    return Clip(frames, [int(i) / probe.fps for i in idx], probe.fps, probe.frames, idx.tolist(),
                (probe.height, probe.width))


def load_video(source: Any, num_frames: int = NUM_FRAMES, fps: float | None = None,
               max_soft_tokens: int | None = None) -> Clip:
    """A path, bytes or file object (MP4/MOV, WebM/Matroska, AVI, Ogg; see container.ACCEPTED),
    or uint8 frames [F, H, W, 3] (with `fps`, default 24 as in the reference; also
    {"frames": ..., "fps": ...}) -> the uniformly sampled frames with their timestamps.

    With `max_soft_tokens` (the budget preprocess_video will get), decoded frames are kept at
    that budget's size; without it, at full size up to the largest budget's size."""
    sample_indices(1, num_frames)  # validates num_frames before any decoding
    if isinstance(source, Clip):
        return source
    if isinstance(source, dict) and "frames" in source:
        return _from_frames(source["frames"], source.get("fps") or DEFAULT_FPS, num_frames)
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        return _from_frames(source, fps or DEFAULT_FPS, num_frames)
    if max_soft_tokens is not None:
        check_budget(max_soft_tokens)
    return _decode_file(source, num_frames, max_soft_tokens)


def preprocess_video(clip: Clip, max_soft_tokens: int = 70, *, match: str = "cpu") -> ProcessedVideo:
    """Sampled frames -> per-frame patches and positions (all frames share one size).

    `match` picks the resize kernel of torchvision on that device (see `image.resize`); frames
    that load_video already scaled to this budget's size were scaled with the "cpu" kernel.
    """
    max_soft_tokens = check_budget(max_soft_tokens)
    frames = np.asarray(clip.frames)  # [F, H, W, 3] uint8
    h, w = target_size(*(clip.source_size or frames.shape[1:3]), max_soft_tokens)
    # One frame at a time (the resize treats frames independently, so pixels are the same as a
    # batched resize): the peak is the output plus one frame, not a float copy of the clip.
    pixel_values = torch.empty(len(frames), max_soft_tokens, 3 * PATCH * PATCH, dtype=torch.float32)
    position_ids, counts = [], []
    for i, frame in enumerate(frames):
        chw = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).contiguous()  # [3, H, W]
        # The video processor's fused normalize: (x - 0) / 255.
        pixel_values[i], positions, count = patchify(resize(chw, h, w, match=match) / 255, max_soft_tokens)
        position_ids.append(positions)
        counts.append(count)
    return ProcessedVideo(pixel_values, torch.stack(position_ids), counts, list(clip.timestamps))
