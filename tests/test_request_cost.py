"""The cost model (processing/cost.py): hostile requests are refused before heavy work, with
bounded memory, and the counts it computes from headers equal the processor's real ones.

Memory is measured in a child process (VmHWM after resetting it, minus VmRSS before), since
PIL and torch allocate outside tracemalloc's view; the child is started once for all cases.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from unigemma.errors import InputError
from unigemma.processing import chat, cost
from unigemma.processing.chat import Processor
from unigemma.processing.tokenizer import Tokenizer

VOCAB_GGUF = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "gemma4-vocab" / "ggml-vocab-gemma-4.gguf"
CONTEXT = 8192  # the server's default max_len
MB = 1 << 20


def vocab_path() -> Path:
    if VOCAB_GGUF.exists():
        return VOCAB_GGUF
    from unigemma.vocab import gemma4_vocab_gguf  # no shared fixtures: llama-cpp-python's sdist copy

    return gemma4_vocab_gguf()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(vocab_path())


def png(w: int, h: int, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), (200, 10, 10) if mode == "RGB" else 0).save(buf, kw.pop("fmt", "PNG"), **kw)
    return buf.getvalue()


def user(*parts):
    return [{"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}]


# --- hostile requests, measured in one child process ---------------------------------------------
CHILD = textwrap.dedent("""
    import io, json, sys, time
    import numpy as np
    from PIL import Image
    from unigemma.errors import InputError
    from unigemma.processing import cost
    from unigemma.processing.chat import Processor
    from unigemma.processing.tokenizer import Tokenizer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def saved(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    tok = Tokenizer.from_gguf(sys.argv[1])
    tiny = saved(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG")  # 155 bytes
    deep = saved(Image.new("I;16", (10_000, 10_000)), "PNG")  # 194 KB, 200 MB decoded
    floats = saved(Image.new("F", (10_000, 10_000)), "TIFF", compression="tiff_adobe_deflate")
    enum = [f"v{i:05d}" + "x" * 1000 for i in range(20_000)]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "enum": enum}}}}}]
    images = lambda data, n: [{"role": "user", "content": [{"type": "image", "image": data}] * n}]
    cases = {
        "60 tiny images, budget 1120": (1120, cost.Limits(), images(tiny, 60), None),
        "60 tiny images, no media limits": (1120, cost.Limits(max_images=None, max_media_tokens=None),
                                            images(tiny, 60), None),
        "6 tiny images, budget 1120 (accepted)": (1120, cost.Limits(), images(tiny, 6), None),
        "31 MB text": (280, cost.Limits(), [{"role": "user", "content": "hello world " * 2_583_333}], None),
        "20,000-entry tool enum": (280, cost.Limits(), [{"role": "user", "content": "hi"}], tools),
        "16-bit 10,000^2 PNG": (280, cost.Limits(), images(deep, 1), None),
        "float 10,000^2 TIFF": (280, cost.Limits(), images(floats, 1), None),
    }
    del enum
    Processor(tok, max_len=8192)([{"role": "user", "content": "warm up"}])
    report = {}
    for name, (budget, limits, messages, tool_defs) in cases.items():
        processor = Processor(tok, image_budget=budget, max_len=8192, limits=limits)
        before = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        reset = status("VmHWM:") - status("VmRSS:") < (8 << 20)
        t0 = time.process_time()
        try:
            out = processor(messages, tools=tool_defs)
            result = {"accepted": True, "tokens": int(out["input_ids"].shape[1]),
                      "output_bytes": sum(v.numel() * v.element_size() for v in out.values())}
            del out
        except InputError as e:
            result = {"accepted": False, "error": str(e)}
        report[name] = dict(result, cpu_s=time.process_time() - t0, reset=reset,
                            growth=status("VmHWM:") - before)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def hostile() -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(vocab_path())], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not all(r["reset"] for r in report.values()):
        pytest.skip("/proc/self/clear_refs cannot reset VmHWM here")
    return report


@pytest.mark.parametrize("name,match", [
    ("60 tiny images, budget 1120", "60 images in one request; at most 32"),
    ("60 tiny images, no media limits", "the prompt is at least 65,4"),
    ("31 MB text", "at least 1,000,000 tokens"),
    ("20,000-entry tool enum", "tools: the tool definitions are 20,200,"),
])
def test_hostile_requests_are_refused_cheaply(hostile, name, match):
    r = hostile[name]
    assert not r["accepted"] and match in r["error"], r
    assert r["growth"] < 200 * MB and r["cpu_s"] < 1.0, r  # before: +4.65 GB / 7.8 s, 98 s, 30 s


def test_accepted_images_cost_memory_in_proportion_to_their_output(hostile):
    r = hostile["6 tiny images, budget 1120 (accepted)"]
    assert r["accepted"] and r["tokens"] > 6 * 1089, r
    # the batch tensor plus about one image in flight, not every image padded and stacked twice
    assert r["growth"] < 1.5 * r["output_bytes"] + 64 * MB, r


@pytest.mark.parametrize("name", ["16-bit 10,000^2 PNG", "float 10,000^2 TIFF"])
def test_deep_images_decode_in_bounded_memory(hostile, name):
    r = hostile[name]
    assert r["accepted"], r
    # the decoded file (200 / 400 MB) plus output-sized work; before: +2.25 / +2.46 GB of float64 copies
    decoded = {"16-bit 10,000^2 PNG": 200, "float 10,000^2 TIFF": 400}[name] * MB
    assert r["growth"] < decoded + 150 * MB, r


# --- refusals happen before the expensive step ---------------------------------------------------
def boom(*args, **kwargs):
    raise AssertionError("reached the expensive step")


def test_long_text_is_refused_before_rendering_or_tokenizing(tok, monkeypatch):
    processor = Processor(tok, max_len=CONTEXT)
    monkeypatch.setattr(tok, "encode", boom)
    monkeypatch.setattr(chat, "render", boom)
    text = "hello world " * (31_000_000 // 12)
    cost.longest_token_chars(tok)  # once per tokenizer (reads the vocabulary: ~0.3 s), not per request
    t0 = time.process_time()
    with pytest.raises(InputError, match=r"^messages: the prompt is at least"):
        processor([{"role": "user", "content": text}])
    assert time.process_time() - t0 < 0.5
    # the same text as a system turn is not counted before rendering, but is before tokenizing
    monkeypatch.undo()
    monkeypatch.setattr(tok, "encode", boom)
    with pytest.raises(InputError, match="at least"):
        Processor(tok, max_len=CONTEXT)([{"role": "system", "content": text}, {"role": "user", "content": "hi"}])


def test_rendered_prompt_bound_holds_for_any_template(tok, monkeypatch):
    # a template that repeats the text: only the rendered length can tell
    processor = Processor(tok, "{% for m in messages %}{{ (m['content'] ~ ' ') * 400 }}{% endfor %}", max_len=CONTEXT)
    monkeypatch.setattr(tok, "encode", boom)
    with pytest.raises(InputError, match="at least"):
        processor([{"role": "user", "content": "x" * 1000}])


def test_tool_definitions_are_bounded_before_rendering(tok, monkeypatch):
    monkeypatch.setattr(chat, "render", boom)
    big = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "enum": ["y" * 1000] * 20_000}}}}}]
    with pytest.raises(InputError, match="^tools: "):
        Processor(tok)(user("hi"), tools=big)
    monkeypatch.undo()
    small = [{"type": "function", "function": {"name": "f", "description": "d"}}]
    Processor(tok, limits=cost.Limits(max_tools_chars=100))(user("hi"), tools=small)
    with pytest.raises(InputError, match="at most 10 are accepted"):
        Processor(tok, limits=cost.Limits(max_tools_chars=10))(user("hi"), tools=small)


def test_media_limits_are_checked_from_headers(tok):
    never = {"image": SimpleNamespace(preprocess_image=boom), "audio": SimpleNamespace(load_audio=boom),
             "video": SimpleNamespace(load_video=boom)}
    tiny = png(64, 64)
    p = Processor(tok, image_budget=1120, max_len=CONTEXT, media=never)
    with pytest.raises(InputError, match="60 images"):
        p(user(*[{"type": "image", "image": tiny}] * 60))
    p.limits = cost.Limits(max_images=None)
    with pytest.raises(InputError, match="65,340 soft tokens; at most 32,768"):
        p(user(*[{"type": "image", "image": tiny}] * 60))
    p.limits = cost.Limits(max_images=None, max_media_tokens=None)
    with pytest.raises(InputError, match="the prompt is at least 65,4"):
        p(user(*[{"type": "image", "image": tiny}] * 60))
    p.limits, p.max_len = cost.Limits(max_media_tokens=2000), None
    with pytest.raises(InputError, match="2,178 soft tokens; at most 2,000"):
        p(user({"type": "image", "image": tiny}, {"type": "image", "image": tiny}))
    p.limits = cost.Limits(max_decode_pixels=10_000)
    with pytest.raises(InputError, match="pixels to decode"):
        p(user({"type": "video", "video": np.zeros((40, 64, 64, 3), np.uint8)}))
    with pytest.raises(InputError, match="message 0, part 0: .*not an image"):
        p(user({"type": "image", "image": b"not an image at all"}))
    # a batch of conversations shares one request's limits
    p.limits = cost.Limits(max_images=3)
    with pytest.raises(InputError, match="4 images"):
        p([user({"type": "image", "image": tiny})] * 4)


# --- computed counts equal the processor's -------------------------------------------------------
def kinds(out) -> tuple[int, int, int]:
    types = out["mm_token_type_ids"][0]
    return int((types == 1).sum()), int((types == 3).sum()), int((types == 2).sum())


@pytest.mark.parametrize("w,h", [(1, 1), (64, 64), (640, 480), (2000, 30), (30, 2000), (1000, 1), (333, 517)])
def test_image_counts_equal_the_processor(tok, w, h):
    for budget in (70, 280, 1120):
        data = png(w, h)
        computed = cost.image_cost(data, budget)
        assert computed.decode_pixels == w * h
        assert kinds(Processor(tok, image_budget=budget)(user({"type": "image", "image": data})))[0] \
            == computed.tokens, (w, h, budget)


def test_image_count_ignores_exif_rotation_and_accepts_every_source(tok):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: 300x200 stored, 200x300 shown
    data = png(300, 200, fmt="JPEG", exif=exif.tobytes())
    real = kinds(Processor(tok)(user({"type": "image", "image": data})))[0]
    assert cost.image_cost(data, 280).tokens == real
    img = Image.open(io.BytesIO(data))
    sources = [img, np.zeros((200, 300, 3), np.uint8), torch.zeros(3, 200, 300, dtype=torch.uint8), io.BytesIO(data),
               "data:image/jpeg;base64," + base64.b64encode(data).decode()]
    assert all(cost.image_cost(s, 280).tokens == real for s in sources)
    f = io.BytesIO(data)
    f.seek(0)
    cost.image_cost(f, 280)
    assert f.tell() == 0  # rewound for the loader


def wav(n: int, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(n, np.int16).tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("n,rate", [(1, 16000), (640, 16000), (641, 16000), (16000 * 7 + 123, 16000),
                                    (44100, 44100), (44101, 44100), (8000 * 3 + 5, 8000), (22050 * 2 + 1, 22050)])
def test_audio_counts_equal_the_processor(tok, n, rate):
    for source in (wav(n, rate), (np.zeros(n, np.float32), rate), {"array": np.zeros((2, n), np.float32),
                                                                     "sampling_rate": rate}):
        computed = cost.audio_cost(source)
        real = kinds(Processor(tok)(user({"type": "audio", "audio": source})))[1]
        assert computed.tokens == real and computed.decode_samples == max(n, 2 * isinstance(source, dict)), \
            (n, rate, type(source))


def test_video_counts_equal_the_processor(tok):
    for frames, h, w, budget in [(40, 36, 64, 70), (12, 100, 30, 70), (48, 48, 48, 280)]:
        clip = np.zeros((frames, h, w, 3), np.uint8)
        computed = cost.video_cost(clip, 32, budget)
        real = kinds(Processor(tok, video_budget=budget)(user({"type": "video", "video": clip})))[2]
        assert computed.tokens == real and computed.decode_pixels == frames * h * w


def test_text_bound_is_a_lower_bound(tok):
    longest = cost.longest_token_chars(tok)
    assert longest == 31 and cost.longest_token_chars(tok) is longest  # computed once
    for text in ["", "a", "hello world " * 50, " " * 500, "\n" * 97, "éà中文👋" * 40, "<|turn>user\n" * 30]:
        assert cost.text_tokens(len(text), longest) <= len(tok.encode(text, add_special_tokens=False))
