"""What a request will cost, from headers alone, checked before any media is decoded or text tokenized.

Each media item's soft-token count is computed exactly as the processor will compute it:
  * image: `image.target_size` on the header's size (EXIF rotation cannot change the count:
    the rule is symmetric in height and width); at most the budget;
  * audio: ceil(samples at 16 kHz / 640), the samples from libsndfile's header or, for what it
    cannot read, `container.probe_audio`'s duration;
  * video: min(frames, frames sampled) x the per-frame image count, frames from
    `container.probe_video` (counted packets, never the header's claim).
Text is bounded without tokenizing: one token covers at most L characters, L being the longest
token in the vocabulary, so C characters are at least ceil(C / L) tokens. The sum is a lower
bound on the prompt's length: a request refused here could never have fit.

`Limits` are per request (one Processor call); its defaults below are documented in the README.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from unigemma.errors import ContextTooLong, InputError

# An image upscaled to the 1120 budget is 31 MB of float32 pixels; 32 of them are ~1 GB.
MAX_IMAGES = 32
# Soft tokens of all media of one request: 32,768 is ~0.9 GB of float32 image patches
# (27 KB per token) and more than the 8,192-token context a server holds by default.
MAX_MEDIA_TOKENS = 32_768
# Pixels decoded per request (image pixels + every video frame up to the last sampled one):
# 2^33 is ~2.3 min of 1080p at 30 fps, ~20 s of decoding on one core.
MAX_DECODE_PIXELS = 1 << 33
# JSON characters of all tool definitions: rendering takes ~1.5 s per MB (a 20 MB enum took
# 30 s), and 256 KiB is already ~60k tokens, more than a tool list needs.
MAX_TOOLS_CHARS = 256 << 10
SAMPLING_RATE, SAMPLES_PER_TOKEN = 16_000, 640  # as audio.py: 40 ms of 16 kHz audio per token


@dataclass(frozen=True)
class Limits:
    """Per-request limits (None: no limit), checked before decoding."""
    max_images: int | None = MAX_IMAGES
    max_media_tokens: int | None = MAX_MEDIA_TOKENS
    max_decode_pixels: int | None = MAX_DECODE_PIXELS
    max_tools_chars: int | None = MAX_TOOLS_CHARS


@dataclass(frozen=True)
class MediaCost:
    kind: str
    tokens: int | None  # soft tokens, None when the header cannot be read without consuming the source
    prompt_tokens: int  # a lower bound on the prompt tokens it adds (soft tokens + begin/end markers)
    decode_pixels: int = 0  # pixels decoded (images, video frames)
    decode_samples: int = 0  # audio samples decoded


# --- per-item token rules -------------------------------------------------------------------------
def image_tokens(height: int, width: int, budget: int) -> int:
    from .image import PATCH, target_size

    h, w = target_size(height, width, budget)
    return (h // PATCH) * (w // PATCH)


def audio_tokens(frames: int, rate: float) -> int:
    """audio.load_audio's resampled length (the same float expression), then preprocess_audio's ceil."""
    samples = frames if rate == SAMPLING_RATE else math.ceil(frames * SAMPLING_RATE / float(rate))
    return -(-samples // SAMPLES_PER_TOKEN)


def video_tokens(frames: int, height: int, width: int, num_frames: int, budget: int) -> tuple[int, int]:
    """(frames sampled, soft tokens per frame), as video.sample_indices and preprocess_video."""
    return min(int(num_frames), int(frames)), image_tokens(height, width, budget)


# --- headers --------------------------------------------------------------------------------------
def _encoded(source: Any) -> bytes | str | None:
    """Bytes or a path for an encoded file; None for in-memory samples or what cannot be re-read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Mapping):
        return _encoded(source.get("bytes") if source.get("bytes") is not None else source.get("path"))
    if isinstance(source, str) and source.startswith("data:"):
        head, _, payload = source.partition(",")
        return _b64(payload) if head.endswith(";base64") else None
    if isinstance(source, (str, os.PathLike)):
        try:
            if os.path.isfile(source):
                return str(source)
        except (OSError, ValueError):
            return None
        return _b64(source) if isinstance(source, str) and len(source) >= 64 else None
    if hasattr(source, "read") and hasattr(source, "seek"):
        at = source.tell()  # the loader reads it again from here
        try:
            return source.read()
        finally:
            source.seek(at)
    return None  # a pipe: reading it here would leave nothing for the loader


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None  # the loader reports it


def _shape(a: Any) -> tuple[int, ...] | None:
    """The shape of samples or frames in memory, without copying them (None: not an array)."""
    if hasattr(a, "shape"):
        return tuple(int(n) for n in a.shape)
    if isinstance(a, (list, tuple)):
        if a and hasattr(a[0], "shape"):  # a list of frames
            return (len(a), *(int(n) for n in a[0].shape))
        try:
            return np.shape(a)
        except ValueError:  # ragged: the loader says so
            return None
    return None


def image_cost(source: Any, budget: int) -> MediaCost:
    from .image import image_size

    size = image_size(source)
    if size is None:
        return MediaCost("image", None, 3)
    h, w = size
    n = image_tokens(h, w, budget)
    return MediaCost("image", n, n + 2, decode_pixels=h * w)


def audio_cost(source: Any) -> MediaCost:
    frames, rate, exact = _audio_frames(source)
    if frames is None:
        return MediaCost("audio", None, 3)
    n = audio_tokens(frames, rate)
    # MP3 lengths without a Xing header are estimates (audio.py allows 2 %); a container's
    # duration (AAC, Opus...) may miss the codec's padding by a token: keep the bound below
    low = n if exact else max(0, int(n * 0.97) - 1)
    return MediaCost("audio", n, low + 2, decode_samples=int(frames))


def _audio_frames(source: Any) -> tuple[int | None, float, bool]:
    """(frames, rate, whether the count is exact); frames None when it cannot be known here."""
    if isinstance(source, tuple) and len(source) == 2:
        source, rate = source
    elif isinstance(source, Mapping) and "array" in source:
        source, rate = source["array"], source.get("sampling_rate", source.get("sample_rate"))
    else:
        rate = SAMPLING_RATE
    shape = _shape(source)
    if shape is not None:  # samples in memory: channels on the short axis, as audio._from_array
        if not isinstance(rate, (int, float, np.integer, np.floating)) or not rate > 0 or not shape:
            return None, SAMPLING_RATE, False  # the loader names what is wrong
        return (shape[0] if len(shape) == 1 else max(shape[:2])), float(rate), True
    src = _encoded(source)
    if src is None:
        return None, SAMPLING_RATE, False
    import soundfile as sf

    try:  # what libsndfile reads, audio.py decodes with it: its header has the exact frame count
        with sf.SoundFile(io.BytesIO(src) if isinstance(src, bytes) else src) as f:
            return f.frames, float(f.samplerate), f.format not in ("MPEG", "MP3")
    except Exception:
        pass
    from .container import probe_audio

    seconds = probe_audio(src)  # raises InputError for formats that are refused
    # frames x 16000 / rate is an integer or at least 1/768000 above one: the margin absorbs rounding
    return math.ceil(seconds * SAMPLING_RATE - 1e-7), float(SAMPLING_RATE), False


def video_cost(source: Any, num_frames: int, budget: int) -> MediaCost:
    frames = getattr(source, "frames", None)
    if frames is not None and hasattr(frames, "shape"):  # a video.Clip: sampled already, taken whole
        source, num_frames = frames, len(frames)
    elif isinstance(source, Mapping) and "frames" in source:
        source = source["frames"]
    if isinstance(source, (list, tuple)) and source and hasattr(source[0], "mode"):  # PIL frames
        count, (width, height) = len(source), source[0].size
    elif (shape := _shape(source)) is not None:
        if len(shape) != 4:
            return MediaCost("video", None, 3)  # the loader refuses it
        count = shape[0]  # channel-first frames as video._from_frames takes them
        height, width = (shape[2], shape[3]) if shape[1] == 3 and shape[-1] != 3 else (shape[1], shape[2])
    else:
        src = _encoded(source)
        if src is None:
            return MediaCost("video", None, 3)
        from .container import probe_video

        probe = probe_video(src)
        count, height, width = probe.frames, probe.height, probe.width
    if min(count, height, width) < 1:
        return MediaCost("video", None, 3)
    sampled, per_frame = video_tokens(count, height, width, num_frames, budget)
    return MediaCost("video", sampled * per_frame, sampled * (per_frame + 2), decode_pixels=count * height * width)


# --- text ------------------------------------------------------------------------------------------
_LONGEST: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token stands for (special tokens included); None when the
    tokenizer does not expose its vocabulary. Computed once per tokenizer (~0.2 s for 262k)."""
    try:
        return _LONGEST[tokenizer]
    except (KeyError, TypeError):
        pass
    try:
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        # Pieces are as long as the text they stand for ("▁" is one space), a byte piece
        # "<0x41>" longer: overestimating L only weakens the bound.
        longest = max(map(len, vocab)) if vocab else None
    except AttributeError:
        longest = None
    try:
        _LONGEST[tokenizer] = longest
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return longest


def text_tokens(chars: int, longest: int | None) -> int:
    """A lower bound on the tokens of `chars` characters of text (0 when L is unknown)."""
    return -(-chars // longest) if longest else 0


def user_text_chars(messages: list[dict]) -> int:
    """Characters of user text that any chat template renders (each part trimmed, as Jinja's
    `trim` does); other roles are left out: templates drop e.g. past reasoning."""
    total = 0
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [
            p.get("text") for p in content or () if isinstance(p, Mapping) and p.get("type") == "text"]
        total += sum(len(p.strip()) for p in parts if isinstance(p, str))
    return total


# --- checks ----------------------------------------------------------------------------------------
def check_tools(tools: Any, limits: Limits) -> None:
    """Refuse tool definitions whose JSON is over `max_tools_chars` before they are rendered."""
    if limits.max_tools_chars is None or tools is None:
        return
    try:
        size = len(json.dumps(tools, ensure_ascii=False, default=str))
    except (TypeError, ValueError, RecursionError) as e:
        raise InputError(f"tools: not JSON-like data ({type(e).__name__})") from None
    if size > limits.max_tools_chars:
        raise InputError(f"tools: the tool definitions are {size:,} characters of JSON; at most "
                         f"{limits.max_tools_chars:,} are accepted")


def check_media(costs: list[MediaCost], limits: Limits) -> None:
    """Per-request media limits: image count, soft tokens, decoded pixels."""
    images = sum(c.kind == "image" for c in costs)
    if limits.max_images is not None and images > limits.max_images:
        raise InputError(f"messages: {images} images in one request; at most {limits.max_images} are accepted")
    tokens = sum(c.tokens or 0 for c in costs)
    if limits.max_media_tokens is not None and tokens > limits.max_media_tokens:
        raise InputError(f"messages: the media need {tokens:,} soft tokens; at most {limits.max_media_tokens:,} "
                         "per request (lower image_budget, or send fewer or shorter items)")
    pixels = sum(c.decode_pixels for c in costs)
    if limits.max_decode_pixels is not None and pixels > limits.max_decode_pixels:
        raise InputError(f"messages: the media hold {pixels:,} pixels to decode (video frames included); at "
                         f"most {limits.max_decode_pixels:,} per request")


def check_length(text_chars: int, costs: list[MediaCost], longest: int | None, max_len: int | None,
                 what: str = "prompt") -> int:
    """Refuse a prompt whose lower bound leaves no room for a reply in `max_len`; return the bound."""
    media = sum(c.prompt_tokens for c in costs)
    bound = text_tokens(text_chars, longest) + media
    if max_len is not None and bound >= max_len:
        parts = [f"{text_tokens(text_chars, longest):,} for {text_chars:,} characters of text"] if text_chars else []
        parts += [f"{media:,} for {len(costs)} media item(s)"] if costs else []
        detail = ", ".join(parts)
        raise ContextTooLong(f"messages: the {what} is at least {bound:,} tokens ({detail}); the context holds "
                         f"{max_len:,} (prompt + reply)")
    return bound
