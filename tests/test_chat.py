"""Chat template rendering + media expansion: parity with transformers' Gemma4UnifiedProcessor.

The oracle is transformers' own `Gemma4UnifiedProcessor.apply_chat_template(tokenize=True)`
over transformers' `GemmaTokenizer` (see test_tokenizer.reference) and its real audio feature
extractor. Its image/video processors need torchvision, which cannot load here, so two stubs
stand in for them; they only report the per-item soft-token counts (from transformers' own
`get_aspect_ratio_preserving_size`, `default_sample_indices_fn` and `VideoMetadata`). Template
rendering, placeholder expansion (including video timestamps), tokenization, padding and
mm_token_type_ids are all transformers' code, none of ours. Our side gets fake media modules
written from the spec (not from transformers' helpers) through the `media=` hook, so these
tests do not depend on image.py/audio.py/video.py; `test_real_media_modules` uses those.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from test_tokenizer import ours, reference
from unigemma.errors import InputError
from unigemma.processing.chat import Processor

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat-templates"


def templates() -> dict[str, str]:
    found = {p.stem: p.read_text(encoding="utf-8") for p in sorted(TEMPLATE_DIR.glob("*.jinja"))}
    return {**found, "gguf-embedded": ours().chat_template}


# The newest template when the shared fixtures are here, else the vocabulary GGUF's own.
MAIN = "google-gemma-4-31B-it" if (TEMPLATE_DIR / "google-gemma-4-31B-it.jinja").exists() else "gguf-embedded"


# --- the oracle ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def oracle(template_name: str):
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor)
    from transformers.models.gemma4_unified.processing_gemma4_unified import (
        Gemma4UnifiedProcessor, get_aspect_ratio_preserving_size)
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn, make_batched_videos

    def soft_tokens(height, width, budget):
        h, w = get_aspect_ratio_preserving_size(height, width, patch_size=16, max_patches=budget * 9,
                                                pooling_kernel_size=3)
        return (h // 16) * (w // 16) // 9

    class StubImageProcessor(ImageProcessingMixin):
        def __call__(self, images, **kwargs):
            flat = [im for sub in images for im in sub]
            return BatchFeature({"pixel_values": np.zeros((len(flat), 280, 1), np.float32),
                                 "image_position_ids": np.zeros((len(flat), 280, 2), np.int64),
                                 "num_soft_tokens_per_image": [soft_tokens(im.height, im.width, 280) for im in flat]})

    class StubVideoProcessor(VideoProcessorMixin):
        def __call__(self, videos, **kwargs):
            counts, metadata, frames = [], [], []
            for video in make_batched_videos(videos):
                meta = VideoMetadata(total_num_frames=len(video), fps=24)
                meta.frames_indices = default_sample_indices_fn(meta, num_frames=32)
                counts.append(soft_tokens(video.shape[1], video.shape[2], 70))
                metadata.append(meta)
                frames.append(len(meta.frames_indices))
            return BatchFeature({"pixel_values_videos": np.zeros((sum(frames), 70, 1), np.float32),
                                 "video_position_ids": np.zeros((sum(frames), 70, 2), np.int64),
                                 "num_frames_per_video": frames, "num_soft_tokens_per_video": counts,
                                 "video_metadata": metadata})

    class OracleProcessor(Gemma4UnifiedProcessor):
        # The only change: the constructor's isinstance check looks the base classes up in
        # transformers' torchvision-gated registries, which are unavailable here.
        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

    return OracleProcessor(feature_extractor=Gemma4UnifiedAudioFeatureExtractor(),
                           image_processor=StubImageProcessor(), tokenizer=reference(),
                           video_processor=StubVideoProcessor(), chat_template=templates()[template_name])


# --- our side: fake media modules with the image.py / audio.py / video.py interface ------
def spec_soft_tokens(height: int, width: int, budget: int) -> int:
    """Spec §5.1: largest 48-px multiple size within budget·9 16-px patches, aspect kept."""
    f = math.sqrt(budget * 9 * 256 / (height * width))
    h, w = math.floor(f * height / 48) * 48, math.floor(f * width / 48) * 48
    if h == 0:
        h, w = 48, min(width // height * 48, budget * 48)
    elif w == 0:
        h, w = min(height // width * 48, budget * 48), 48
    return (h // 48) * (w // 48)


# The last dimension stands in for 6912 pixels / 640 samples: these tests look at ids only.
fake_image = SimpleNamespace(
    load_image=lambda src: src,
    preprocess_image=lambda img, max_soft_tokens=280: SimpleNamespace(
        pixel_values=torch.zeros(max_soft_tokens, 1), position_ids=torch.zeros(max_soft_tokens, 2, dtype=torch.long),
        num_soft_tokens=spec_soft_tokens(img.height, img.width, max_soft_tokens)),
    batch_images=lambda items: (torch.stack([i.pixel_values for i in items]),
                                torch.stack([i.position_ids for i in items])),
)
fake_audio = SimpleNamespace(
    load_audio=lambda src, sampling_rate=None: np.asarray(src, np.float32),
    preprocess_audio=lambda samples: SimpleNamespace(features=torch.zeros(-(-len(samples) // 640), 1),
                                                     num_soft_tokens=-(-len(samples) // 640)),
    batch_audio=lambda items: (
        torch.stack([torch.nn.functional.pad(i.features, (0, 0, 0, max(len(j.features) for j in items) - len(i.features)))
                     for i in items]),
        torch.tensor([[t < len(i.features) for t in range(max(len(j.features) for j in items))] for i in items])),
)
fake_video = SimpleNamespace(
    load_video=lambda src, num_frames=32, max_soft_tokens=None: SimpleNamespace(
        frames=src[[k * len(src) // num_frames for k in range(num_frames)]],
        timestamps=[k * len(src) // num_frames / 24 for k in range(num_frames)]),  # raw arrays play at 24 fps
    preprocess_video=lambda clip, max_soft_tokens=70: SimpleNamespace(
        pixel_values=torch.zeros(len(clip.frames), max_soft_tokens, 1),
        position_ids=torch.zeros(len(clip.frames), max_soft_tokens, 2, dtype=torch.long),
        num_soft_tokens=[spec_soft_tokens(*clip.frames.shape[1:3], max_soft_tokens)] * len(clip.frames),
        timestamps=clip.timestamps),
    timestamp_text=lambda s: f"{int(s // 60):02d}:{int(s % 60):02d}",
)
FAKE_MEDIA = {"image": fake_image, "audio": fake_audio, "video": fake_video}


# --- conversations ----------------------------------------------------------------------
def img(w, h):
    return {"type": "image", "image": Image.new("RGB", (w, h), (w % 255, h % 255, 7))}


def aud(n):
    return {"type": "audio", "audio": np.linspace(-0.5, 0.5, n, dtype=np.float32)}


def vid(frames, h, w):
    return {"type": "video", "video": np.zeros((frames, h, w, 3), np.uint8)}


def text(t):
    return {"type": "text", "text": t}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit"},
        "days": {"type": "integer", "description": "Forecast days", "nullable": True},
        "hours": {"type": "array", "items": {"type": "integer"}, "description": "Hours of day"},
        "where": {"type": "object", "description": "Coordinates", "required": ["lat"],
                  "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time."}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "hours": [9, 12]}}}
CALL_STR = {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "tz:<|\"|>UTC<|\"|>"}}
U, A = "user", "assistant"


def m(role, content=None, **extra):
    return {"role": role, "content": content, **extra}


def cases() -> list[tuple[str, list, dict]]:
    """(name, conversation or batch, kwargs): text, system, multi-turn, tools, thinking, media."""
    return [
        ("text", [m(U, "Hello!")], {}),
        ("text-parts", [m(U, [text("  Two "), text(" parts  ")])], {}),
        ("unicode", [m(U, "Grüße 👋 中文 — ½ \t tab\n\nnew\nlines  ")], {}),
        ("specials-in-text", [m(U, "what is <|turn> or <bos>? <|\"|>")], {}),
        ("system", [m("system", "  You are terse.  "), m(U, "Hi")], {}),
        ("developer", [m("developer", "Rules."), m(U, "Go")], {}),
        ("thinking-on", [m(U, "Think hard.")], {"enable_thinking": True}),
        ("thinking-on-system", [m("system", "Sys"), m(U, "Hi")], {"enable_thinking": True}),
        ("no-gen-prompt", [m(U, "Hi"), m(A, "Hello.")], {"add_generation_prompt": False}),
        ("multi-turn", [m(U, "a"), m(A, "b"), m(U, "c"), m(A, "d"), m(U, "e")], {}),
        ("strip-thinking", [m(U, "q"), m(A, "<|channel>thought\nhmm<channel|>The answer."), m(U, "ok")], {}),
        ("reasoning-field", [m(U, "q"), m(A, "A.", reasoning_content="because"), m(U, "more")], {}),
        ("none-values", [m(U, "q", name=None), m(A, "A.", tool_calls=None), m(U, "r")], {}),
        ("tools", [m(U, "Weather in Paris?")], {"tools": [WEATHER, CLOCK]}),
        ("tools-thinking", [m("system", "S"), m(U, "Weather?")], {"tools": [WEATHER], "enable_thinking": True}),
        ("tool-call", [m(U, "Weather?"), m(A, tool_calls=[CALL])], {"tools": [WEATHER]}),
        ("tool-result", [m(U, "Weather?"), m(A, tool_calls=[CALL]),
                         m("tool", '{"temp": 21}', tool_call_id="call_1", name="get_weather")], {"tools": [WEATHER]}),
        ("tool-result-answer", [m(U, "Weather?"), m(A, tool_calls=[CALL]), m("tool", "21C", tool_call_id="call_1"),
                                m(A, "It is 21C."), m(U, "Thanks")], {"tools": [WEATHER]}),
        ("tool-call-reasoning", [m(U, "Time?"), m(A, tool_calls=[CALL_STR], reasoning_content="need tool"),
                                 m("tool", [text("12:00")], tool_call_id="call_2")], {"tools": [CLOCK]}),
        ("tool-responses-legacy", [m(U, "Weather?"), m(A, tool_calls=[CALL],
                                                      tool_responses=[{"name": "get_weather",
                                                                       "response": {"temp": 21, "sky": "clear"}}])],
         {"tools": [WEATHER]}),
        ("two-calls", [m(U, "Both?"), m(A, tool_calls=[CALL, CALL_STR])], {"tools": [WEATHER, CLOCK]}),
        ("image", [m(U, [img(640, 480), text("What is this?")])], {}),
        ("image-square-small", [m(U, [text("Describe"), img(224, 224)])], {}),
        ("image-wide", [m(U, [img(1920, 1080)])], {}),
        ("image-extreme", [m(U, [img(2000, 30), text("strip"), img(30, 2000)])], {}),
        ("image-url-part", [m(U, [{"type": "image_url", "image_url": {"url": Image.new("RGB", (100, 50))}},
                                  text("openai style")])], {}),
        ("images-multi-turn", [m(U, [img(300, 200), text("first")]), m(A, "A cat."),
                               m(U, [img(200, 300), text("second")])], {"enable_thinking": True}),
        ("audio", [m(U, [aud(16000), text("Transcribe.")])], {}),
        ("audio-short", [m(U, [aud(1), aud(640), aud(641)])], {}),
        ("audio-long", [m("system", "Listen."), m(U, [text("Summarize"), aud(16000 * 7 + 123)])], {}),
        ("video", [m(U, [vid(48, 36, 64), text("What happens?")])], {}),
        ("video-long", [m(U, [vid(24 * 75, 9, 16)])], {}),  # timestamps past one minute
        ("video-hd-shape", [m(U, [text("clip:"), vid(32, 108, 192)])], {}),
        ("mixed", [m("system", "Be brief."), m(U, [img(640, 480), aud(8000), vid(40, 60, 80), text("All three?")])],
         {"tools": [CLOCK], "enable_thinking": True}),
        ("batch-text", [[m(U, "short")], [m("system", "S"), m(U, "a much longer prompt " * 5)]], {}),
        ("batch-mixed", [[m(U, [img(640, 480), text("one")])], [m(U, "text only")],
                         [m(U, [aud(5000), img(100, 100), text("two")])]], {}),
    ]


def run_both(template_name, conversation, kwargs):
    expected = oracle(template_name).apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt",
        add_generation_prompt=kwargs.get("add_generation_prompt", True),
        enable_thinking=kwargs.get("enable_thinking", False), tools=kwargs.get("tools"))
    processor = Processor(ours(), templates()[template_name], media=FAKE_MEDIA)
    got = processor(conversation, **kwargs)
    return expected, got


@pytest.mark.parametrize("template_name", list(templates()))
def test_inputs_match_transformers_processor(template_name):
    compared = 0
    for name, conversation, kwargs in cases():
        expected, got = run_both(template_name, conversation, kwargs)
        assert set(got) == set(expected), name
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            assert torch.equal(got[key], expected[key]), f"{template_name} / {name}: {key}"
        if "num_frames_per_video" in got:
            assert got["num_frames_per_video"].tolist() == expected["num_frames_per_video"].tolist()
        assert got["pixel_values"].shape[0] == len(expected["pixel_values"]) if "pixel_values" in got else True
        compared += 1 if isinstance(conversation[0], dict) else len(conversation)
    assert compared >= 30


def test_render_matches_transformers_text():
    for template_name in templates():
        for name, conversation, kwargs in cases()[:21]:
            expected = oracle(template_name).apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=kwargs.get("add_generation_prompt", True),
                enable_thinking=kwargs.get("enable_thinking", False), tools=kwargs.get("tools"))
            assert Processor(ours(), templates()[template_name]).render(conversation, **kwargs) == expected, name


def test_left_padding_and_types():
    processor = Processor(ours(), templates()[MAIN], media=FAKE_MEDIA)
    out = processor([[m(U, "hi")], [m(U, [img(96, 96), aud(1280), vid(32, 48, 48)])]])
    ids, mask, types = out["input_ids"], out["attention_mask"], out["mm_token_type_ids"]
    pad = int((mask[0] == 0).sum())
    assert pad > 0 and (ids[0, :pad] == 0).all() and (mask[0, pad:] == 1).all() and (mask[1] == 1).all()
    assert ids[0, pad] == 2 and ids[1, 0] == 2  # <bos> right after the padding
    # Small images are upscaled to the budget: 96x96 -> 768x768 = 16x16 soft tokens.
    assert int((types[1] == 1).sum()) == 256 and int((types[1] == 3).sum()) == 2
    assert int((types[1] == 2).sum()) == 32 * 64 and out["num_frames_per_video"].tolist() == [32]
    assert ((types == 1) == (ids == 258880)).all() and ((types == 2) == (ids == 258884)).all()
    assert out["pixel_values_videos"].shape[:2] == (32, 70) and out["input_features_mask"].dtype == torch.bool


def bad(processor, messages, match, **kwargs):
    with pytest.raises(InputError, match=match):
        processor(messages, **kwargs)


def test_bad_input_raises_input_error():
    p = Processor(ours(), templates()[MAIN], media=FAKE_MEDIA)
    bad(p, [], "non-empty")
    bad(p, "hello", "non-empty")
    bad(p, [m("robot", "hi")], "unknown role")
    bad(p, [m(U)], "no content")
    bad(p, [m(U, 42)], "content must be")
    bad(p, ["not a dict"], "not a dict")
    bad(p, [m(U, [{"type": "pdf", "file": "x.pdf"}])], "unknown part type 'pdf'")
    bad(p, [m(U, [{"type": "text"}])], "no 'text'")
    bad(p, [m(U, [{"type": "image"}])], "image part has none")
    bad(p, [m(U, "hi")], "tools must be a list", tools={"name": "x"})
    bad(p, [m(U, "hi")], "tool 0 is not", tools=[{"name": "x", "parameters": {}}])
    bad(p, [m(U, "hi")], "tool 1: function has no name", tools=[CLOCK, {"type": "function", "function": {}}])
    bad(p, [m(U, "hi")], "parameters must be", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": ["a", "b"]}}}])
    bad(p, [m(U, "q"), m(A, tool_calls=[{"function": {"arguments": {}}}])], "tool call 0")
    # Media/placeholder mismatches: typed placeholders, or a template that drops a message's media.
    bad(p, [m(U, "look: <|image|>")], "1 image placeholder")
    bad(p, [m(U, [img(64, 64), text("and <|audio|>")])], "1 audio placeholder")
    bad(p, [m("system", [img(64, 64)]), m(U, "hi")], "0 image placeholder")
    # A tokenizer without media markers cannot take media.
    gemma3 = SimpleNamespace(**{k: getattr(ours(), k) for k in ("name", "chat_template", "eos_ids", "pad_id")},
                             special_tokens_map={"bos_token": "<bos>"}, token_to_id=ours().token_to_id,
                             encode=ours().encode)
    bad(Processor(gemma3, media=FAKE_MEDIA), [m(U, [img(64, 64)])], "image")


def test_template_errors_raise_input_error():
    tok = ours()
    for template, match in [("{{ raise_exception('no system role') }}", "no system role"),
                            ("{% for %}", "does not compile"),
                            ("{{ messages.__class__.__mro__ }}", "chat template failed"),
                            ("{% set ns = namespace(_x=1) %}", "starts with '_'"),
                            ("{{ messages[0]['content'] + 1 }}", "TypeError")]:
        with pytest.raises(InputError, match=match):
            Processor(tok, template)([m(U, "hi")])
    with pytest.raises(InputError, match="no chat template"):
        Processor(SimpleNamespace(name="t", chat_template=None, special_tokens_map={}, token_to_id=lambda t: None))(
            [m(U, "hi")])


def test_template_globals_and_filters():
    template = ("{{ bos_token }}{{ messages | tojson }}|{{ {'a': '<b>'} | tojson(indent=1) }}|"
                "{{ strftime_now('%Y') | length }}|{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}"
                "{{ x }}{% endfor %}|{% generation %}gen{% endgeneration %}|{{ dict(a=1) }}|{{ image_token }}")
    out = Processor(ours(), template).render([m(U, "é <x>")])
    assert out == '<bos>[{"role": "user", "content": "é <x>"}]|{\n "a": "<b>"\n}|4|1|gen|{\'a\': 1}|<|image|>'


def test_media_objects_are_opaque_to_templates():
    out = Processor(ours(), "{{ messages[0]['content'][0]['image'] }}").render([m(U, [img(8, 8)])])
    assert out == "<Image>"


def test_real_media_modules():
    for kind in ("image", "audio", "video"):
        pytest.importorskip(f"unigemma.processing.{kind}", reason=f"unigemma/processing/{kind}.py not written yet")
    name = MAIN
    conversation = [m(U, [img(640, 480), aud(16000 + 7), vid(40, 120, 160), text("All?")])]
    expected = oracle(name).apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                                add_generation_prompt=True, enable_thinking=False)
    got = Processor(ours(), templates()[name])(conversation)
    assert set(got) == set(expected)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "input_features", "input_features_mask"):
        assert torch.equal(got[key], expected[key]), key
    assert got["pixel_values"].shape == (1, 280, 6912) and got["image_position_ids"].shape == (1, 280, 2)
    assert got["pixel_values_videos"].shape == (32, 70, 6912) and got["video_position_ids"].shape == (32, 70, 2)
