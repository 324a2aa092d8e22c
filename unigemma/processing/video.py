"""Videos -> frames for the vision embedder: decode with PyAV, sample 32 frames, 70 tokens each.

As transformers' `Gemma4UnifiedVideoProcessor` + `Gemma4UnifiedProcessor`:
  * frame indices `arange(n) * total // n` (uniform, first frame included), n = 32;
  * each frame sized and patched like an image (`image.py`) with a 70-soft-token budget; the
    rescale is the video processor's fused normalize, `x / 255` (the image processor's is
    `x * (1/255)`, which can differ in the last bit);
  * the prompt gets, per frame, "mm:ss <|image>" + n x "<|video|>" + "<image|>", joined by spaces,
    mm:ss being the frame's index / fps (`timestamp_text`).
Where the reference refuses a clip shorter than 32 frames, we take all of its frames.
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
from .image import MAX_IMAGE_PIXELS, patchify, resize, target_size

NUM_FRAMES = 32
DEFAULT_FPS = 24.0  # what the reference assumes for frames given without metadata
MAX_SECONDS = 3600.0  # longest clip decoded (all frames are visited to sample them)


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8, the sampled frames
    timestamps: list[float]  # seconds of each sampled frame (index / fps)
    fps: float
    total_frames: int


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor  # [F, max_soft_tokens, 6912]
    position_ids: torch.Tensor  # [F, max_soft_tokens, 2]
    num_soft_tokens: list[int]  # per frame
    timestamps: list[float]


def sample_indices(total: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    n = min(num_frames, total)
    return np.arange(n, dtype=int) * total // n


def timestamp_text(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def _from_frames(frames: Any, fps: float, num_frames: int) -> Clip:
    a = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8 or not a.shape[0]:
        raise InputError(f"video frames must be a non-empty uint8 array [frames, H, W, 3], got {a.dtype} {a.shape}")
    idx = sample_indices(len(a), num_frames)
    return Clip(a[idx], [int(i) / fps for i in idx], fps, len(a))


def _container_source(source: Any):
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise InputError("video bytes are empty")
        return io.BytesIO(bytes(source))
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InputError(f"video URLs are not fetched; download {source[:80]} and pass the file or its bytes")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"video file {path} does not exist" if not path.exists() else f"{path} is not a file")
        return str(path)
    if hasattr(source, "read"):
        return source
    raise InputError(f"cannot read a video from a {type(source).__name__}")


def _frames_at(source: Any, want: set[int]) -> tuple[dict[int, np.ndarray], int, float]:
    """Decode every frame once (frame headers lie about counts), converting only `want`."""
    import av  # PyAV (FFmpeg); imported here so text-only use never loads it

    if hasattr(source, "seek"):
        source.seek(0)
    frames: dict[int, np.ndarray] = {}
    try:
        with av.open(_container_source(source)) as container:
            if not container.streams.video:
                raise InputError("the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            if stream.width * stream.height > MAX_IMAGE_PIXELS:
                raise InputError(f"video frames are {stream.width}x{stream.height}, over {MAX_IMAGE_PIXELS:,} pixels")
            expected = (container.duration or 0) / 1e6 * fps  # from the header, when it has one
            total = 0
            for frame in container.decode(stream):
                if total in want:
                    frames[total] = frame.to_ndarray(format="rgb24")
                total += 1
                if total > MAX_SECONDS * fps:
                    raise InputError(f"video is longer than {MAX_SECONDS:.0f} s")
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:  # PyAV's errors derive from these
        raise InputError(f"cannot decode video: {e}") from e
    if total == 0:
        raise InputError("the video has no decodable frames")
    if total < 0.9 * expected - 1:  # FFmpeg decodes what is there; a cut file just stops early
        raise InputError(f"the video is truncated: {total} frames decoded, its header promises about {expected:.0f}")
    return frames, total, fps


def _decode(source: Any, num_frames: int) -> Clip:
    import av

    try:  # the header's frame count, when there is one, saves a second pass
        with av.open(_container_source(source)) as container:
            guess = container.streams.video[0].frames if container.streams.video else 0
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot decode video: {e}") from e
    frames, total, fps = _frames_at(source, set(sample_indices(guess, num_frames).tolist()) if guess else set())
    idx = sample_indices(total, num_frames)
    if any(int(i) not in frames for i in idx):  # no count in the header, or a wrong one
        frames, total, fps = _frames_at(source, set(idx.tolist()))
    return Clip(np.stack([frames[int(i)] for i in idx]), [int(i) / fps for i in idx], fps, total)


def load_video(source: Any, num_frames: int = NUM_FRAMES, fps: float | None = None) -> Clip:
    """A path, bytes or file object (any container FFmpeg reads), or uint8 frames [F, H, W, 3]
    (then `fps`, default 24 as in the reference) -> the uniformly sampled frames."""
    if isinstance(source, Clip):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_frames(source, float(fps or DEFAULT_FPS), num_frames)
    if isinstance(source, dict) and "frames" in source:
        return _from_frames(source["frames"], float(source.get("fps") or DEFAULT_FPS), num_frames)
    return _decode(source, num_frames)


def preprocess_video(clip: Clip, max_soft_tokens: int = 70) -> ProcessedVideo:
    """Sampled frames -> per-frame patches and positions (all frames share one size)."""
    video = torch.from_numpy(np.ascontiguousarray(clip.frames)).permute(0, 3, 1, 2)  # [F, 3, H, W]
    h, w = target_size(video.shape[-2], video.shape[-1], max_soft_tokens)
    pixels = resize(video, h, w) / 255  # the video processor's fused normalize: (x - 0) / 255
    out = [patchify(frame, max_soft_tokens) for frame in pixels]
    return ProcessedVideo(torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out]),
                          [o[2] for o in out], list(clip.timestamps))
