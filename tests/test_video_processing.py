"""Video: PyAV decoding, the reference's frame sampling and timestamps, per-frame patches."""

import io

import numpy as np
import pytest
import torch
from media_oracle import reference_video

from unigemma.errors import InputError
from unigemma.processing.image import resize
from unigemma.processing.video import load_video, preprocess_video, sample_indices, timestamp_text

av = pytest.importorskip("av")


def clip_bytes(n_frames: int, fps: int = 10, size=(48, 64), codec="ffv1", fmt="matroska") -> bytes:
    """A clip whose frame i is a flat gray of level 5*i (so decoded frames tell their index)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width, s.pix_fmt = *size, "yuv444p" if codec == "ffv1" else "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 5 * i % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_sampling_equals_reference():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (32, 33, 45, 100, 1000, 24 * 75):
        want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24), num_frames=32)
        assert sample_indices(total).tolist() == want.tolist()
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]  # the reference refuses < 32 frames; we take them all


@pytest.mark.parametrize("n_frames", [45, 12])
def test_decoded_clip_frames_and_timestamps(n_frames, tmp_path):
    data = clip_bytes(n_frames)
    (tmp_path / "c.mp4").write_bytes(data)
    for source in (data, tmp_path / "c.mp4", io.BytesIO(data)):
        clip = load_video(source)
        idx = sample_indices(n_frames)
        assert clip.total_frames == n_frames and clip.fps == 10 and len(clip.frames) == len(idx)
        assert clip.timestamps == [i / 10 for i in idx]
        levels = clip.frames.reshape(len(idx), -1).mean(-1)
        assert np.abs(levels - 5 * idx).max() < 1.5  # the frames are the sampled ones, in order
    lossy = load_video(clip_bytes(n_frames, codec="mpeg4", fmt="mp4"))  # a common codec too
    assert lossy.total_frames == n_frames and lossy.timestamps == clip.timestamps


def test_frames_array_uses_24_fps_and_timestamps_text():
    frames = np.zeros((24 * 75, 9, 16, 3), np.uint8)
    clip = load_video(frames)
    assert clip.timestamps[-1] == sample_indices(24 * 75)[-1] / 24
    assert [timestamp_text(s) for s in (0, 9.99, 60, 74.5, 3600 + 5)] == ["00:00", "00:09", "01:00", "01:14", "60:05"]


def test_preprocess_equals_reference_helpers():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (40, 120, 160, 3), dtype=np.uint8)
    clip = load_video(frames)
    for budget in (70, 280):
        got = preprocess_video(clip, budget)
        video = torch.from_numpy(clip.frames).permute(0, 3, 1, 2)
        h, w = 48 * int(got.position_ids[..., 1].max() + 1), 48 * int(got.position_ids[..., 0].max() + 1)
        pv, pos, n = reference_video(resize(video, h, w), budget)
        assert torch.equal(got.pixel_values, pv) and torch.equal(got.position_ids, pos)
        assert got.num_soft_tokens == [n] * 32 and got.pixel_values.shape == (32, budget, 6912)


def test_bad_videos_raise_input_error(tmp_path):
    good = clip_bytes(20)
    for source, match in [(b"", "empty"), (b"\x00junk" * 100, "cannot decode"), (tmp_path / "nope.mp4", "does not exist"),
                          ("https://example.invalid/v.mp4", "not fetched"), (3.5, "cannot read a video"),
                          (np.zeros((0, 4, 4, 3), np.uint8), "non-empty"), (np.zeros((2, 4, 4), np.uint8), "uint8 array")]:
        with pytest.raises(InputError, match=match):
            load_video(source)
    with pytest.raises(InputError):
        load_video(good[: len(good) // 3])
