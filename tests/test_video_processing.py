"""Video: PyAV decoding, the reference's frame sampling and timestamps, per-frame patches, prompt text.

Oracles: transformers' `default_sample_indices_fn` / `VideoMetadata` (sampling, timestamps), its
PyAV reader `read_video_pyav` (decoded frames), its video helper functions (patches, via
tests/media_oracle.py) and `Gemma4UnifiedProcessor.replace_video_token` (prompt expansion).
"""

import io
import wave
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from media_oracle import reference_video

from unigemma.errors import InputError
from unigemma.processing import video as video_module
from unigemma.processing.chat import MediaItem, Processor
from unigemma.processing.image import preprocess_image, resize
from unigemma.processing.video import load_video, preprocess_video, sample_indices, timestamp_text

av = pytest.importorskip("av")


def clip_bytes(n_frames: int, fps=10, size=(48, 64), codec="ffv1", fmt="matroska", **options) -> bytes:
    """A clip whose frame i is a flat gray of level 5*i (so decoded frames tell their index)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps, options=options)
        s.height, s.width, s.pix_fmt = *size, "yuv444p" if codec == "ffv1" else "yuv420p"
        s.bit_rate = 2_000_000  # lossy codecs: near-exact flat levels
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 5 * i % 256, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_sampling_equals_reference():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in (32, 33, 45, 63, 64, 100, 1000, 24 * 75, 100003):
        want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24), num_frames=32)
        assert sample_indices(total).tolist() == want.tolist()
        for n in (1, 8, 31):
            want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24), num_frames=n)
            assert sample_indices(total, n).tolist() == want.tolist()
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]  # the reference refuses < 32 frames; we take them all
    with pytest.raises(ValueError, match="exceeds"):
        default_sample_indices_fn(VideoMetadata(total_num_frames=5, fps=24), num_frames=32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="num_frames"):
            sample_indices(10, bad)


@pytest.mark.parametrize("n_frames,codec,fmt", [(45, "ffv1", "matroska"), (12, "ffv1", "matroska"),
                                                (45, "mpeg4", "mp4"), (40, "libx264", "mp4"), (20, "libvpx", "webm")])
def test_decoded_clip_frames_and_timestamps(n_frames, codec, fmt, tmp_path):
    data = clip_bytes(n_frames, codec=codec, fmt=fmt)
    (tmp_path / "c").write_bytes(data)
    idx = sample_indices(n_frames)
    for source in (data, tmp_path / "c", str(tmp_path / "c"), io.BytesIO(data)):
        clip = load_video(source)
        assert clip.total_frames == n_frames and clip.fps == pytest.approx(10) and clip.indices == idx.tolist()
        assert clip.frames.shape == (len(idx), 48, 64, 3) and clip.frames.dtype == np.uint8
        assert clip.timestamps == pytest.approx([i / 10 for i in idx])
        levels = clip.frames.reshape(len(idx), -1).mean(-1)
        assert np.abs(levels - 5 * idx).max() < 2  # the sampled frames, in presentation order (x264 has B-frames)


def test_frames_equal_transformers_pyav_reader(tmp_path):
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav

    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    with av.open(str(path), "w") as c:  # busy content, so a wrong frame or colour conversion shows
        s = c.add_stream("libx264", rate=Fraction(30000, 1001))
        s.height, s.width, s.pix_fmt = 96, 128, "yuv420p"
        for _ in range(70):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (96, 128, 3), np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    frames, meta = read_video_pyav(str(path), lambda metadata: default_sample_indices_fn(metadata, num_frames=32))
    clip = load_video(path)
    assert clip.total_frames == meta.total_num_frames == 70 and clip.indices == meta.frames_indices.tolist()
    assert np.array_equal(clip.frames, frames)
    assert clip.fps == pytest.approx(meta.fps, rel=1e-9) and clip.timestamps == pytest.approx(meta.timestamps)


def test_frames_array_uses_24_fps_and_timestamp_text():
    frames = np.zeros((24 * 75, 9, 16, 3), np.uint8)
    clip = load_video(frames)
    assert clip.fps == 24 and clip.timestamps[-1] == sample_indices(24 * 75)[-1] / 24
    assert load_video(frames, fps=12).timestamps[-1] == sample_indices(24 * 75)[-1] / 12
    assert load_video({"frames": frames[:10], "fps": 5}).timestamps == [i / 5 for i in range(10)]
    assert load_video(torch.zeros(40, 3, 9, 16, dtype=torch.uint8)).frames.shape == (32, 9, 16, 3)  # channel-first
    from PIL import Image
    assert len(load_video([Image.new("RGB", (16, 9))] * 3).frames) == 3
    assert [timestamp_text(s) for s in (0, 0.999, 9.99, 59.99, 60, 74.5, 599.9, 3600 + 5)] == \
        ["00:00", "00:00", "00:09", "00:59", "01:00", "01:14", "09:59", "60:05"]


def test_prompt_expansion_equals_reference():
    """chat.py's expansion of a video, with our timestamps, is the reference processor's text."""
    from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor
    from transformers.video_utils import VideoMetadata

    tokens = dict(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    clip = load_video(np.zeros((24 * 75 + 7, 20, 30, 3), np.uint8))
    done = preprocess_video(clip, 70)
    meta = VideoMetadata(total_num_frames=24 * 75 + 7, fps=None, frames_indices=clip.indices)  # fps -> 24
    want = Gemma4UnifiedProcessor.replace_video_token(
        SimpleNamespace(**tokens),
        {"num_soft_tokens_per_video": [done.num_soft_tokens[0]], "video_metadata": [meta]}, 0)
    fake = SimpleNamespace(token={"boi": "<|image>", "eoi": "<image|>", "video": "<|video|>"},
                           _module=lambda kind: video_module)
    got = Processor._expansion(fake, MediaItem("video", None, "message 0"), done)
    assert got == want
    assert want.startswith("00:00 <|image><|video|>") and want.count(" <|image>") == 32 and want.endswith(
        "<|video|><image|>") and "<image|> 01:12 <|image><|video|>" in want  # frame 1750 / 24 fps = 72.9 s


def test_preprocess_equals_reference_helpers():
    rng = np.random.default_rng(0)
    clip = load_video(rng.integers(0, 256, (40, 120, 160, 3), dtype=np.uint8))
    video = torch.from_numpy(clip.frames).permute(0, 3, 1, 2)
    for budget in (70, 280):
        got = preprocess_video(clip, budget)
        h, w = 48 * int(got.position_ids[..., 1].max() + 1), 48 * int(got.position_ids[..., 0].max() + 1)
        pv, pos, n = reference_video(resize(video, h, w), budget)
        assert torch.equal(got.pixel_values, pv) and torch.equal(got.position_ids, pos)
        assert got.num_soft_tokens == [n] * 32 and got.pixel_values.shape == (32, budget, 6912)
        assert got.timestamps == clip.timestamps
    got = preprocess_video(clip)
    for k in (0, 13, 31):
        single = preprocess_image(video[k], 70)
        assert torch.equal(single.position_ids, got.position_ids[k])
        assert single.num_soft_tokens == got.num_soft_tokens[k]
        # Same pixels; the rescale differs in the last bit (image x * (1/255), video x / 255), as in the reference.
        assert (single.pixel_values - got.pixel_values[k]).abs().max() <= 6e-8
    with pytest.raises(InputError, match="one of"):
        preprocess_video(clip, 100)


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    return buf.getvalue()


def header_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv444p"
        c.start_encoding()
    return buf.getvalue()


def test_bad_videos_raise_input_error(tmp_path):
    good = clip_bytes(20)
    empty = header_only()
    for source, match in [(b"", "empty"), (b"\x00junk" * 100, "cannot decode"),
                          (tmp_path / "nope.mp4", "does not exist"),
                          (tmp_path, "not a file"), ("https://example.invalid/v.mp4", "not fetched"),
                          (3.5, "cannot read a video"), (wav_bytes(), "no video stream"), (empty, "no frames"),
                          (good[: len(good) // 3], "truncated"), (np.zeros((0, 4, 4, 3), np.uint8), "non-empty"),
                          (np.zeros((2, 4, 4), np.uint8), "uint8 array"), (np.zeros((2, 4, 4, 3)), "uint8"),
                          ({"frames": np.zeros((2, 4, 4, 3), np.uint8), "fps": -1}, "fps")]:
        with pytest.raises(InputError, match=match):
            load_video(source)
    with pytest.raises(InputError, match="num_frames"):
        load_video(good, num_frames=0)
    rng = np.random.default_rng(0)
    for _ in range(20):  # bit flips: decode or InputError, nothing else
        raw = bytearray(good)
        for i in rng.integers(0, len(raw), 4):
            raw[i] = rng.integers(0, 256)
        try:
            load_video(bytes(raw))
        except InputError:
            pass
