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
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .image import check_budget, patchify, resize, target_size

NUM_FRAMES = 32
DEFAULT_FPS = 24.0  # what the reference assumes for frames given without metadata
MAX_SECONDS = 3600.0  # longest clip decoded (every frame up to the last sampled one is decoded)
MAX_FRAME_PIXELS = 7680 * 4320  # 8K; 32 such frames are already 3.2 GB of uint8


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8, the sampled frames
    timestamps: list[float]  # seconds of each sampled frame (index / fps)
    fps: float
    total_frames: int
    indices: list[int] | None = None  # which frames of the clip were sampled


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
def _opener(source: Any):
    """A function returning a fresh PyAV input each call (the clip is read twice)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("video bytes are empty")
        data = bytes(source)
        return lambda: io.BytesIO(data)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InputError(f"video URLs are not fetched; download {source[:80]} and pass the file or its bytes")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"video file {path} does not exist" if not path.exists() else f"{path} is not a file")
        return lambda: str(path)
    if hasattr(source, "read") and hasattr(source, "seek"):
        def rewound():
            source.seek(0)
            return source
        return rewound
    if hasattr(source, "read"):  # a pipe or socket: keep the bytes for the second read
        return _opener(source.read())
    raise InputError(f"cannot read a video from a {type(source).__name__}")


def _scan(av, open_input) -> tuple[int, float]:
    """Count the video packets and time them, without decoding (torchcodec's exact-mode scan)."""
    with av.open(open_input()) as container:
        if not container.streams.video:
            raise InputError("the file has no video stream")
        stream = container.streams.video[0]
        if stream.width * stream.height > MAX_FRAME_PIXELS:
            raise InputError(f"video frames are {stream.width}x{stream.height}, over {MAX_FRAME_PIXELS:,} pixels")
        header_fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        count, begin, end = 0, None, None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream flush packet
            count += 1
            t = packet.pts if packet.pts is not None else packet.dts
            if t is not None:
                stop = t + (packet.duration or 0)
                begin, end = (t, stop) if begin is None else (min(begin, t), max(end, stop))
            if count > MAX_SECONDS * header_fps:
                raise InputError(f"video is longer than {MAX_SECONDS:.0f} s")
        span = float((end - begin) * stream.time_base) if begin is not None and stream.time_base else 0.0
        fps = count / span if span > 0 else header_fps
        # A cut file still demuxes the packets it has: compare with what the header promises.
        promised = stream.frames or (float(stream.duration * stream.time_base) * header_fps if stream.duration
                                     and stream.time_base else 0)
        if not promised and container.duration and len(container.streams) == 1:
            promised = container.duration / 1e6 * header_fps
        if count == 0:
            raise InputError("the video has no frames")
        if count < 0.9 * promised - 1:
            raise InputError(f"the video is truncated: {count} frames found, its header promises about {promised:.0f}")
        return count, fps


def _decode(av, open_input, wanted: list[int]) -> list[np.ndarray]:
    """Decode in presentation order up to the last wanted frame, converting only the wanted ones."""
    last, keep, out = max(wanted), set(wanted), {}
    with av.open(open_input()) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # threads change speed only, never pixels
        size = dict(width=stream.width, height=stream.height)  # frames that change size mid-clip are scaled back
        for i, frame in enumerate(container.decode(stream)):
            if i in keep:
                same = frame.width == size["width"] and frame.height == size["height"]
                out[i] = frame.to_ndarray(format="rgb24", **({} if same else size))
            if i >= last:
                break
    missing = [i for i in wanted if i not in out]
    if missing:
        raise InputError(f"the video is corrupt: frame {missing[0]} of its packets does not decode")
    return [out[i] for i in wanted]


def _decode_file(source: Any, num_frames: int) -> Clip:
    import av  # PyAV (FFmpeg); imported here so text-only use never loads it

    open_input = _opener(source)
    try:
        total, fps = _scan(av, open_input)
        idx = sample_indices(total, num_frames)
        frames = _decode(av, open_input, idx.tolist())
    except InputError:
        raise
    except EOFError as e:  # av.error.EOFError: the data ends before FFmpeg found a frame
        raise InputError("the video has no frames: the file ends before any (empty or truncated)") from e
    except Exception as e:  # PyAV raises its FFmpegError family, OSError, ValueError, ...
        raise InputError(f"cannot decode video: {type(e).__name__}: {e}") from e
    return Clip(np.stack(frames), [int(i) / fps for i in idx], fps, total, idx.tolist())


def load_video(source: Any, num_frames: int = NUM_FRAMES, fps: float | None = None) -> Clip:
    """A path, bytes or file object (any container FFmpeg reads), or uint8 frames [F, H, W, 3]
    (with `fps`, default 24 as in the reference; also {"frames": ..., "fps": ...}) -> the
    uniformly sampled frames with their timestamps."""
    sample_indices(1, num_frames)  # validates num_frames before any decoding
    if isinstance(source, Clip):
        return source
    if isinstance(source, dict) and "frames" in source:
        return _from_frames(source["frames"], source.get("fps") or DEFAULT_FPS, num_frames)
    if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
        return _from_frames(source, fps or DEFAULT_FPS, num_frames)
    return _decode_file(source, num_frames)


def preprocess_video(clip: Clip, max_soft_tokens: int = 70, *, match: str = "cpu") -> ProcessedVideo:
    """Sampled frames -> per-frame patches and positions (all frames share one size).

    `match` picks the resize kernel of torchvision on that device (see `image.resize`).
    """
    max_soft_tokens = check_budget(max_soft_tokens)
    video = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W]
    h, w = target_size(video.shape[-2], video.shape[-1], max_soft_tokens)
    pixels = resize(video, h, w, match=match) / 255  # the video processor's fused normalize: (x - 0) / 255
    out = [patchify(frame, max_soft_tokens) for frame in pixels]
    return ProcessedVideo(torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]),
                          [o[2] for o in out], list(clip.timestamps))
