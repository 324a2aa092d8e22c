"""Hostile media bytes (security review D1, D3, D4, D5): only allow-listed containers reach FFmpeg,
nothing a client sends makes it open a file or a socket, and cost follows the output.

Every case is local (tmp_path, loopback, no network) and bounded in time. A FIFO "tripwire"
tells whether anything opened a path: a reader blocked in open() lets a non-blocking writer in.
"""
from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import wave
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf

from bench.hostile_media import thousand_fps_clip
from unigemma.errors import InputError
from unigemma.processing import container
from unigemma.processing.audio import load_audio
from unigemma.processing.container import MAX_FRAMES, VideoProbe, probe_audio, probe_video
from unigemma.processing.image import target_size
from unigemma.processing.video import load_video, preprocess_video

av = pytest.importorskip("av")
SR = 16_000


def wav_bytes(seconds: float = 1.0, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.sin(np.arange(int(rate * seconds)) / 5) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def clip_bytes(frames: int = 12, fmt: str = "mp4", codec: str = "mpeg4", size=(48, 64), rate=10) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.height, s.width, s.pix_fmt = *size, "yuv444p" if codec == "ffv1" else "yuv420p"
        s.bit_rate = 2_000_000  # lossy codecs: near-exact flat levels
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast"}  # the 4K clip: seconds, not tens
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((*size, 3), 9 * i % 256, np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def audio_via_ffmpeg(fmt: str, codec: str, seconds: float = 1.0, rate: int = 48000) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        s = out.add_stream(codec, rate=rate, layout="mono")
        t = np.arange(int(rate * seconds)) / rate
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(1, -1),
                                           format="flt", layout="mono")
        frame.sample_rate = rate
        for p in [*s.encode(frame), *s.encode(None)]:
            out.mux(p)
    return buf.getvalue()


@contextmanager
def tripwire(path):
    """A FIFO at `path`; yields a list that gains an entry whenever something opens it to read."""
    os.mkfifo(path)
    hits, done = [], threading.Event()

    def watch():
        while not done.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # only succeeds with a reader
                hits.append(time.monotonic())
            except OSError:
                time.sleep(0.001)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield hits
    finally:
        time.sleep(0.02)
        done.set()
        thread.join(5)


def cpu_seconds(fn, *args, **kwargs):
    """(CPU seconds of this process, wall seconds, the InputError or None) for one call."""
    cpu, wall = time.process_time(), time.monotonic()
    try:
        fn(*args, **kwargs)
        err = None
    except InputError as e:
        err = e
    return time.process_time() - cpu, time.monotonic() - wall, err


# --- attacks that name other resources -----------------------------------------------------
SDP = b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio %d RTP/AVP 0\n"
HOSTILE = {
    "ffconcat": (b"ffconcat version 1.0\nfile probe-target.wav\n", "FFmpeg concat script"),
    "sdp": (SDP % 20000, "SDP session description"),
    "m3u8": (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nseg0.ts\n#EXT-X-ENDLIST\n", "HLS playlist"),
    "mpd": (b'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
            b'<Representation><BaseURL>probe-target.mp4</BaseURL></Representation></AdaptationSet></Period></MPD>',
            "DASH manifest"),
    "image2 pattern": (b"img%03d.png", "text"),
    "random": (np.random.default_rng(0).bytes(4096).replace(b"\xff", b"\x00"), "unrecognised data"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_bytes_are_refused_before_any_demuxer(name, monkeypatch):
    data, kind = HOSTILE[name]
    opened = []
    monkeypatch.setattr(container.av, "open", lambda *a, **k: opened.append(a) or pytest.fail("FFmpeg opened"))
    for call in (load_audio, load_video, probe_audio, probe_video):
        cpu, wall, err = cpu_seconds(call, data)
        assert err is not None and "is not an accepted format" in str(err) and kind in str(err), (call, err)
        assert wall < 1.0 and cpu < 0.5
    cpu, wall, err = cpu_seconds(load_audio, "data:audio/wav;base64," + base64.b64encode(data).decode())
    assert err is not None and "not an accepted format" in str(err)
    assert not opened


@pytest.mark.parametrize("what", ["audio", "video"])
def test_ffconcat_cannot_read_local_files_or_tell_they_exist(what, tmp_path, monkeypatch):
    """D1: the concat demuxer read `file <path>` relative to the cwd; now the text never reaches it,
    and the message is the same whether the named file exists or not."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.wav").write_bytes(wav_bytes())
    (tmp_path / "real.mp4").write_bytes(clip_bytes())
    load = load_audio if what == "audio" else load_video
    messages = []
    ext = "wav" if what == "audio" else "mp4"
    for name in (f"real.{ext}", f"miss.{ext}"):
        with pytest.raises(InputError, match="FFmpeg concat script is not an accepted format") as e:
            load(b"ffconcat version 1.0\nfile %s\n" % name.encode())
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    # A local path through the Python API is sniffed too: a concat list saved under a media name.
    (tmp_path / f"list.{ext}").write_bytes(b"ffconcat version 1.0\nfile real.%s\n" % ext.encode())
    with pytest.raises(InputError, match="not an accepted format"):
        load(tmp_path / f"list.{ext}")
    # The tripwire: FFmpeg left to probe would open the FIFO; our path never does.
    script = b"ffconcat version 1.0\nfile trip.wav\n"
    with tripwire(tmp_path / "trip.wav") as hits:
        with pytest.raises(InputError):
            load(script)
        time.sleep(0.05)
        assert not hits
        with pytest.raises(av.error.FFmpegError):  # the control: FFmpeg's own probing takes the bait
            av.open(io.BytesIO(script)).close()
        assert hits


def test_nested_opens_are_blocked_for_any_demuxer(tmp_path, monkeypatch):
    """Defence in depth: even a demuxer that opens other inputs gets no protocol to open them with
    (the same options guard MP4 data references; Matroska has no external references in FFmpeg)."""
    monkeypatch.chdir(tmp_path)
    with tripwire(tmp_path / "trip.wav") as hits:
        with pytest.raises(av.error.FFmpegError, match="Invalid argument"):
            av.open(io.BytesIO(b"ffconcat version 1.0\nfile trip.wav\n"), format="concat",
                    options=container._OPTIONS).close()
        time.sleep(0.05)
        assert not hits
    with pytest.raises(ValueError, match="allow-list"):
        container.open_input(b"ffconcat version 1.0\n", "concat")


def test_sdp_binds_no_socket_and_fails_fast():
    """D3: SDP text bound the UDP ports it named for 10-20 s. Now: refused in well under 1 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sdp = SDP % port
    for call in (load_audio, load_video):
        cpu, wall, err = cpu_seconds(call, sdp)
        assert err is not None and "SDP" in str(err) and wall < 1.0
    udp = open("/proc/self/net/udp").read() + open("/proc/self/net/udp6").read()
    assert f":{port:04X} " not in udp and f":{port + 1:04X} " not in udp


def test_truncated_headers_are_input_errors():
    samples = {"wav": wav_bytes(), "mp4": clip_bytes(), "webm": clip_bytes(fmt="webm", codec="libvpx"),
               "flac": _sf_bytes("FLAC"), "ogg": _sf_bytes("OGG"), "avi": clip_bytes(fmt="avi")}
    for fmt, data in samples.items():
        for n in (1, 3, 8, 16, 40):
            for call in (load_audio, load_video, probe_video):
                cpu, wall, err = cpu_seconds(call, data[:n])
                assert err is not None and wall < 1.0, (fmt, n, call)


def _sf_bytes(fmt: str, seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(np.arange(int(SR * seconds)) / 7).astype(np.float32), SR, format=fmt)
    return buf.getvalue()


# --- CPU and memory amplification ------------------------------------------------------------
def test_thousand_fps_header_clip_is_refused_fast():
    data = thousand_fps_clip(20_000)  # D5's clip: ~1 MB whose header says 1000 fps, 20,000 frames
    with av.open(io.BytesIO(data)) as c:  # the header's claim, as the review saw it
        assert c.streams.video[0].frames == 20_000 and round(float(c.streams.video[0].average_rate)) == 1000
    for call in (probe_video, load_video):
        cpu, wall, err = cpu_seconds(call, data)
        assert err is not None and f"over {MAX_FRAMES:,} frames" in str(err)
        assert cpu < 1.0, (call, cpu)
    # Under the cap the probe counts packets (not the header) and the clip decodes.
    small = thousand_fps_clip(frames=300, size=(144, 256))
    assert probe_video(small) == VideoProbe(256, 144, pytest.approx(0.3), 300, pytest.approx(1000))
    assert load_video(small).total_frames == 300


PEAK_SCRIPT = textwrap.dedent("""
    import sys, gc
    from unigemma.processing.video import load_video, preprocess_video
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
    data = open(sys.argv[1], "rb").read()
    budget = None if sys.argv[2] == "none" else int(sys.argv[2])
    base = hwm()
    clip = load_video(data, max_soft_tokens=budget)
    out = preprocess_video(clip, 70)
    print(base, hwm(), clip.frames.shape[0], *clip.frames.shape[1:3])
""")


@pytest.fixture(scope="module")
def uhd_clip(tmp_path_factory):
    """D4's clip: 3840 x 2160 x 32 frames of H.264, a few tens of KB."""
    path = tmp_path_factory.mktemp("uhd") / "uhd.mp4"
    path.write_bytes(clip_bytes(32, fmt="mp4", codec="libx264", size=(2160, 3840), rate=24))
    return path


DECODER_MB = 320  # H.264's own 4K reference frames and two frame threads (~220 MB measured), with slack


@pytest.mark.parametrize("budget", ["70", "none"])
def test_4k_clip_memory_follows_the_output(budget, uhd_clip):
    """32 full 4K RGB frames are 759 MiB (the review saw +1.64 GB with the stack and the copy).
    Frames are scaled one by one as decoded into the output array: the peak is the decoder's
    own frames plus the kept frames (at the budget's size, or the largest budget's without one)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(uhd_clip), budget], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    base, peak, n, h, w = map(int, out.stdout.split())
    assert n == 32 and (h, w) == target_size(2160, 3840, 70 if budget == "70" else 1120)
    full_mb, kept_mb = 32 * 3840 * 2160 * 3 / 2 ** 20, 32 * h * w * 3 / 2 ** 20
    print(f"4K x 32 frames, budget {budget}: peak RSS +{peak - base} MB (kept frames {kept_mb:.0f} MB, "
          f"32 full frames {full_mb:.0f} MB)")
    assert peak - base < kept_mb + DECODER_MB
    if budget == "70":
        assert peak - base < full_mb / 2


# --- everything on the allow-list still decodes ------------------------------------------------
AUDIO = {
    "wav": lambda: wav_bytes(1.0, SR),
    "flac": lambda: _sf_bytes("FLAC"),
    "ogg vorbis": lambda: _sf_bytes("OGG"),
    "mp3": lambda: audio_via_ffmpeg("mp3", "libmp3lame"),
    "aac adts": lambda: audio_via_ffmpeg("adts", "aac"),
    "m4a": lambda: audio_via_ffmpeg("ipod", "aac"),
    "webm opus": lambda: audio_via_ffmpeg("webm", "libopus"),
    "mkv opus": lambda: audio_via_ffmpeg("matroska", "libopus"),
    "ogg opus": lambda: audio_via_ffmpeg("ogg", "libopus"),
    "avi pcm": lambda: audio_via_ffmpeg("avi", "pcm_s16le"),
    "mov pcm": lambda: audio_via_ffmpeg("mov", "pcm_s16le"),
}


@pytest.mark.parametrize("name", list(AUDIO))
def test_accepted_audio_formats_decode(name, tmp_path):
    data = AUDIO[name]()
    got = load_audio(data)
    assert abs(len(got) - SR) <= 2048 and np.abs(got).max() > 0.1  # ~1 s of a 0.3-amplitude tone
    assert probe_audio(data) == pytest.approx(1.0, abs=0.1)
    (tmp_path / "clip.bin").write_bytes(data)  # paths are sniffed too, whatever the file is called
    assert np.array_equal(load_audio(tmp_path / "clip.bin"), got)
    assert probe_audio(tmp_path / "clip.bin") == probe_audio(data)  # a path is probed through a file, not read whole


@pytest.mark.parametrize("fmt,codec", [("mp4", "mpeg4"), ("mp4", "libx264"), ("mov", "mpeg4"), ("webm", "libvpx"),
                                       ("matroska", "ffv1"), ("avi", "mpeg4")])
def test_accepted_video_formats_decode(fmt, codec, tmp_path):
    data = clip_bytes(12, fmt=fmt, codec=codec)
    probe = probe_video(data)
    assert (probe.width, probe.height, probe.frames) == (64, 48, 12) and probe.seconds == pytest.approx(1.2)
    clip = load_video(data)
    assert clip.total_frames == 12 and clip.frames.shape == (12, 48, 64, 3)
    assert np.abs(clip.frames.reshape(12, -1).mean(-1) - 9 * np.arange(12)).max() < 3
    (tmp_path / "clip.bin").write_bytes(data)
    assert np.array_equal(load_video(tmp_path / "clip.bin").frames, clip.frames)
    assert probe_video(tmp_path / "clip.bin") == probe


def test_scaling_while_decoding_equals_resizing_afterwards():
    """Frames kept at the budget's size as decoded give the same patches as full-size frames
    resized by preprocess_video (the reference's order), so the memory fix changes no pixel."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("ffv1", rate=10)
        s.height, s.width, s.pix_fmt = 300, 500, "yuv444p"
        for _ in range(6):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (300, 500, 3), np.uint8), "rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = buf.getvalue()
    full, small = load_video(data), load_video(data, max_soft_tokens=70)
    assert full.frames.shape[1:3] == (300, 500) and small.frames.shape[1:3] != (300, 500)
    a, b = preprocess_video(full, 70), preprocess_video(small, 70)
    assert a.pixel_values.equal(b.pixel_values) and a.position_ids.equal(b.position_ids)


AUDIO_PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from unigemma.processing.audio import load_audio
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
    data = open(sys.argv[1], "rb").read()
    load_audio(open(sys.argv[2], "rb").read())  # warm up on a small file
    base = hwm()
    print(base, hwm() if len(load_audio(data)) else 0)
""")


def test_many_channel_audio_memory_follows_the_mono_output(tmp_path):
    """8 channels of 192 kHz silence: a small FLAC whose float32 decode is 123 MB. It is read and
    downmixed block by block, so the peak follows the 15 MB mono signal instead."""
    big, small = tmp_path / "wide.flac", tmp_path / "small.wav"
    sf.write(big, np.zeros((192_000 * 20, 8), np.int16), 192_000, format="FLAC")
    small.write_bytes(wav_bytes())
    out = subprocess.run([sys.executable, "-c", AUDIO_PEAK_SCRIPT, str(big), str(small)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    base, peak = map(int, out.stdout.split())
    raw_mb = 192_000 * 20 * 8 * 4 / 2 ** 20
    print(f"8 ch x 192 kHz x 20 s FLAC ({big.stat().st_size // 1024} KB): peak RSS +{peak - base} MB "
          f"(whole float32 decode {raw_mb:.0f} MB)")
    assert peak - base < raw_mb / 2
