"""Hostile and normal media for bench.attacks, built here and small on the wire: images (PNG,
16-bit PNG, float TIFF), WAV, MP4 clips (MPEG-4, 4K H.264, a static H.264 whose header says
1000 fps), the texts FFmpeg would follow to other files or sockets (ffconcat, SDP, m3u8, MPD,
image2 patterns), and the OpenAI request parts and bodies that carry them.

It owns bytes and JSON bodies only: no server, no measurement (bench.attack_harness), no attack
cases (bench.attacks).
"""

from __future__ import annotations

import base64
import io
import sys
import time
import wave

import numpy as np
from PIL import Image

# The FIFO tripwires that the hostile texts below name (bench.attacks makes them in the server's cwd).
FIFOS = ("trip.wav", "trip.mp4", "trip.ts", "trip001.png")


def png(w: int, h: int, mode: str = "RGB", fmt: str = "PNG", noise: bool = False, **kw) -> bytes:
    buf = io.BytesIO()
    img = (Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)) if noise else
           Image.new(mode, (w, h), (200, 10, 10) if mode == "RGB" else 0))
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def wav(seconds: float, rate: int = 16_000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        t = np.arange(int(rate * seconds)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def clip(frames: int, size=(96, 128), codec: str = "mpeg4", rate: int = 8, static: bool = False) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream(codec, rate=rate)
        s.height, s.width, s.pix_fmt = *size, "yuv420p"
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), 90 if static else 7 * i % 256, np.uint8), "rgb24")
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return buf.getvalue()


def thousand_fps_clip(frames: int, size=(1080, 1920)) -> bytes:
    """A static H.264 MP4 whose header says 1000 fps: one I- and one P-frame encoded, the P packet
    repeated with new timestamps (the review's 20,000-frame clip is ~1 MB)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=1000)
        s.height, s.width, s.pix_fmt = *size, "yuv420p"
        s.codec_context.options = {"preset": "ultrafast", "bframes": "0", "keyint": "1000000"}
        still = av.VideoFrame.from_ndarray(np.full((*size, 3), 90, np.uint8), "rgb24")
        encoded = []
        for i in range(2):
            still.pts = i
            encoded += s.encode(still)
        encoded += s.encode(None)
        for i in range(frames):
            src = encoded[min(i, 1)]
            p = av.Packet(bytes(src))
            p.pts = p.dts = i
            p.duration, p.time_base, p.stream, p.is_keyframe = 1, src.time_base, s, i == 0
            out.mux(p)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def audio(data: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}


def video(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(data)}"}}


def url_part(url: str, kind: str = "image_url") -> dict:
    return {"type": kind, kind: {"url": url}}


def chat(content, **kw) -> dict:
    if isinstance(content, list) and not any(p.get("type") == "text" for p in content):
        content = [*content, {"type": "text", "text": "describe"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1, **kw}


def nest(depth: int, leaf=1):
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def tool_history(arguments) -> dict:
    return {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
                             "name": "f", "arguments": arguments}}]},
                         {"role": "user", "content": "x"}], "max_tokens": 1}


SDP = "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm={kind} {port} RTP/AVP {pt}\n"


def sdp(port: int, kind: str = "audio") -> bytes:
    return SDP.format(kind=kind, port=port, pt=0 if kind == "audio" else 96).encode()


def ffconcat(name: str, prefix: bytes = b"") -> bytes:
    return prefix + b"ffconcat version 1.0\nfile " + name.encode() + b"\n"


M3U8 = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\ntrip.ts\n#EXT-X-ENDLIST\n"
MPD = (b'<?xml version="1.0"?>\n<MPD xmlns="urn:mpeg:dash:schema:mpd:2011"><Period><AdaptationSet>'
       b"<Representation><BaseURL>trip.mp4</BaseURL></Representation></AdaptationSet></Period></MPD>")


def build_media() -> dict:
    """Every file the attacks send, built once before any server starts (the 4K and 1000-fps clips
    take most of the time)."""
    t0 = time.monotonic()
    deep = Image.new("I;16", (10_000, 10_000))
    floats = Image.new("F", (10_000, 10_000))
    media = {"tiny": png(64, 64), "photo": png(640, 480, noise=True), "audio10": wav(10.0),
             "short": clip(16), "real_wav": wav(1.0), "real_mp4": clip(24)}
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    media["deep"], buf = buf.getvalue(), io.BytesIO()
    floats.save(buf, "TIFF", compression="tiff_adobe_deflate")
    media["tiff"] = buf.getvalue()
    del deep, floats, buf
    media["uhd"] = clip(32, size=(2160, 3840), codec="libx264", rate=24, static=True)
    media["fps20k"] = thousand_fps_clip(20_000)
    media["fps2k"] = thousand_fps_clip(2_000)
    print(f"media built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return media
