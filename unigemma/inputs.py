"""Model inputs: the typed boundary between processing and the model.

`ModelInputs` is what `Processor(...)(messages)` returns and what the engine and scheduler take:
token ids, their padding mask and media types, and typed image, audio and video parts. It owns
- the media-type codes of `mm_token_type_ids` (0 text, 1 image, 2 video, 3 audio), written once;
- the names of the media tensors, listed once (each part's `NAMES`);
- per-item digests, which key a chat session's cached prefix (`token_keys`);
- token-range slicing (`slice`) and prefill chunk bounds that never cut a vision block.
It is also a read-only Mapping over the keys that are set, named and ordered as transformers'
processor returns them, so `inputs["input_ids"]`, `"pixel_values" in inputs`, `dict(inputs)` and
`reference_model(**inputs)` work as with a dict; `ModelInputs.coerce(d)` takes such a dict back.
It knows nothing of a model, tokenizer or checkpoint: placeholder token ids come from the caller.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import InputError

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3  # mm_token_type_ids values
MM_TYPE = {"image": IMAGE, "video": VIDEO, "audio": AUDIO}
VISION_TYPES = (IMAGE, VIDEO)  # bidirectional blocks; audio stays causal


class _Part:
    """A media part: dataclass fields named by `NAMES`, the processor's keys in field order."""
    NAMES: tuple[str, ...] = ()
    MODEL_NAMES: tuple[str, ...] = ()  # the keys the model's `embed`/`logits` take

    def entries(self) -> Iterator[tuple[str, Any]]:
        for name, f in zip(self.NAMES, dataclasses.fields(self)):
            value = getattr(self, f.name)
            if value is not None:
                yield name, value


@dataclass(frozen=True)
class ImageInputs(_Part):
    """Every image of the batch, in prompt order (row by row)."""
    pixel_values: torch.Tensor | None = None  # [N, patches, patch_dim]
    position_ids: torch.Tensor | None = None  # [N, patches, 2]; (-1, -1) marks padding patches
    NAMES = MODEL_NAMES = ("pixel_values", "image_position_ids")


@dataclass(frozen=True)
class AudioInputs(_Part):
    """Every audio clip of the batch, in prompt order; one real frame is one soft token."""
    features: torch.Tensor | None = None  # [N, frames, 640]
    mask: torch.Tensor | None = None  # [N, frames] bool, True = real frame (clips are end-padded)
    NAMES = MODEL_NAMES = ("input_features", "input_features_mask")


@dataclass(frozen=True)
class VideoInputs(_Part):
    """Every frame of every clip, concatenated in prompt order; each frame is its own block.

    `num_frames` splits the frames back into clips. transformers' model needs it; ours embeds
    frame by frame, so it is not among the model's media (`ModelInputs.media`)."""
    pixel_values: torch.Tensor | None = None  # [F, patches, patch_dim]
    position_ids: torch.Tensor | None = None  # [F, patches, 2]
    num_frames: torch.Tensor | None = None  # [num_videos] long
    NAMES = ("pixel_values_videos", "video_position_ids", "num_frames_per_video")
    MODEL_NAMES = NAMES[:2]


PARTS = {"image": ImageInputs, "audio": AudioInputs, "video": VideoInputs}  # the processor's key order
TOKEN_NAMES = ("input_ids", "attention_mask", "mm_token_type_ids")
MEDIA_KEYS = tuple(name for part in PARTS.values() for name in part.MODEL_NAMES)


def _bytes_digest(t: torch.Tensor) -> int:
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")


def _spans(types: torch.Tensor, code: int) -> list[tuple[int, int, int]]:
    """(row, start, end) of each run of `code` in types [B, S], row by row: one media item each."""
    out = []
    for r, row in enumerate((types == code).tolist()):
        start = None
        for i, inside in enumerate(row + [False]):
            if inside and start is None:
                start = i
            elif not inside and start is not None:
                out.append((r, start, i))
                start = None
    return out


def chunk_bounds(types: torch.Tensor | None, start: int, end: int,
                 chunk: int | Callable[[int], int]) -> list[tuple[int, int]]:
    """Split [start, end) into pieces of about `chunk` tokens, never between two vision tokens
    of one block (types [B, S]; a block longer than `chunk` becomes one longer piece).
    chunk may be a function of the piece's first index (the engine shrinks pieces deep into a
    long prompt, generate/engine.py `chunk_size`)."""
    size = chunk if callable(chunk) else lambda a: chunk
    if types is None:
        vision = None
    else:
        vision = ((types == VISION_TYPES[0]) | (types == VISION_TYPES[1])).any(0).tolist()

    def can_cut(i: int) -> bool:
        return vision is None or i >= end or not (vision[i - 1] and vision[i])
    bounds, a = [], start
    while a < end:
        n = max(1, size(a))
        b = min(a + n, end)
        while b > a and not can_cut(b):
            b -= 1
        if b == a:  # the block from here is longer than a chunk: take all of it
            b = min(a + n, end)
            while not can_cut(b):
                b += 1
        bounds.append((a, b))
        a = b
    return bounds


@dataclass(frozen=True, eq=False)
class ModelInputs(Mapping):
    """One batch of left-padded prompts and their media, as the model takes them."""
    input_ids: torch.Tensor  # [B, S] long
    attention_mask: torch.Tensor | None = None  # [B, S]; 0 marks left padding
    mm_token_type_ids: torch.Tensor | None = None  # [B, S]; MM_TYPE codes, 0 for text
    image: ImageInputs | None = None
    audio: AudioInputs | None = None
    video: VideoInputs | None = None

    # -- a dict's view ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInputs:
        """From processor-named keys (a dict, transformers' BatchFeature); other keys are dropped."""
        if d.get("input_ids") is None:
            raise InputError("model inputs need input_ids")
        parts = {}
        for kind, part in PARTS.items():
            values = [d.get(name) for name in part.NAMES]
            parts[kind] = part(*values) if any(v is not None for v in values) else None
        return cls(*(d.get(name) for name in TOKEN_NAMES), **parts)

    @classmethod
    def coerce(cls, inputs: Mapping[str, Any]) -> ModelInputs:
        return inputs if isinstance(inputs, ModelInputs) else cls.from_dict(inputs)

    def _entries(self) -> Iterator[tuple[str, Any]]:
        for name in TOKEN_NAMES:
            if getattr(self, name) is not None:
                yield name, getattr(self, name)
        for kind in PARTS:
            part = getattr(self, kind)
            if part is not None:
                yield from part.entries()

    def __getitem__(self, key: str) -> Any:
        for name, value in self._entries():
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._entries())

    def __len__(self) -> int:
        return sum(1 for _ in self._entries())

    # -- what the model takes --------------------------------------------------------------
    def media(self) -> dict[str, torch.Tensor]:
        """The model's media keyword arguments (`model.embed(ids, **inputs.media())`)."""
        return {name: value for name, value in self._entries() if name in MEDIA_KEYS}

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Every set key `model.logits` and `greedy_generate` take (all but `num_frames_per_video`)."""
        return {name: value for name, value in self._entries() if name in TOKEN_NAMES or name in MEDIA_KEYS}

    def to(self, device: torch.device | str) -> ModelInputs:
        """The same inputs with every tensor on `device`."""
        return ModelInputs.from_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})

    # -- identity ----------------------------------------------------------------------------
    def digest(self) -> int:
        """A 64-bit digest of every set tensor's name, dtype, shape and bytes."""
        h = hashlib.blake2b(digest_size=8)
        for name, value in self._entries():
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            h.update(_bytes_digest(value).to_bytes(8, "big"))
        return int.from_bytes(h.digest(), "big")

    def item_digests(self) -> dict[str, list[int]]:
        """A digest per image, per video frame and per audio clip, in prompt order."""
        first = {"image": self.image.pixel_values if self.image else None,
                 "video": self.video.pixel_values if self.video else None,
                 "audio": self.audio.features if self.audio else None}
        return {kind: [] if t is None else [_bytes_digest(x) for x in t] for kind, t in first.items()}

    def token_keys(self, media_ids: Mapping[str, int], row: int = 0) -> list:
        """One row's tokens as comparable keys: a placeholder token (media_ids: kind -> its token
        id) also carries its media item's digest, so two images of one size (same ids) never
        share a cached prefix. Items are counted from the batch's first, so rows past the first
        only fit a batch of one conversation."""
        items = self.item_digests()
        kind_of = {v: k for k, v in media_ids.items()}
        keys, run_kind, index = [], None, {k: -1 for k in items}
        for tok in self.input_ids[row].tolist():
            kind = kind_of.get(tok)
            if kind is not None and kind != run_kind:
                index[kind] += 1  # a new run of placeholders: the next item of that kind
            run_kind = kind
            if kind is None:
                keys.append(tok)
            else:
                keys.append((tok, items[kind][index[kind]] if index[kind] < len(items[kind]) else None))
        return keys

    # -- token ranges ------------------------------------------------------------------------
    def chunks(self, start: int, chunk: int | Callable[[int], int]) -> list[tuple[int, int]]:
        """`chunk_bounds` of tokens [start, S): prefill pieces that never cut a vision block."""
        return chunk_bounds(self.mm_token_type_ids, start, self.input_ids.shape[1], chunk)

    def slice(self, a: int, b: int) -> ModelInputs:
        """Tokens [a, b) of every row, with the media whose soft tokens lie there.

        An image or video frame cut by the range is an InputError (its bidirectional block must
        be seen whole; `chunks` never cuts one); an audio clip cut by it keeps the frames inside
        (audio is causal, one real frame per token)."""
        S = self.input_ids.shape[1]
        if not 0 <= a < b <= S:
            raise InputError(f"token range [{a}, {b}) is not inside [0, {S})")
        types = self.mm_token_type_ids
        if types is None and any(getattr(self, kind) is not None for kind in PARTS):
            raise InputError("slicing inputs with media needs mm_token_type_ids")
        cut = lambda t: None if t is None else t[:, a:b]  # noqa: E731
        return ModelInputs(cut(self.input_ids), cut(self.attention_mask), cut(types),
                           image=self._slice_image(types, a, b), audio=self._slice_audio(types, a, b),
                           video=self._slice_video(types, a, b))

    def _kept(self, kind: str, types: torch.Tensor, count: int, a: int, b: int) -> list[int]:
        """Indices of the vision items (runs of `kind`'s code) inside [a, b)."""
        spans = _spans(types, MM_TYPE[kind])
        if len(spans) != count:
            raise InputError(f"mm_token_type_ids hold {len(spans)} {kind} blocks but the inputs give {count}")
        kept = []
        for i, (_, s, e) in enumerate(spans):
            if a <= s and e <= b:
                kept.append(i)
            elif s < b and a < e:
                raise InputError(f"token range [{a}, {b}) cuts {kind} block {i} at [{s}, {e})")
        return kept

    def _slice_image(self, types, a, b) -> ImageInputs | None:
        x = self.image
        if x is None or x.pixel_values is None:
            return x
        kept = self._kept("image", types, x.pixel_values.shape[0], a, b)
        pick = lambda t: None if t is None else t[kept]  # noqa: E731
        return ImageInputs(pick(x.pixel_values), pick(x.position_ids)) if kept else None

    def _slice_video(self, types, a, b) -> VideoInputs | None:
        x = self.video
        if x is None or x.pixel_values is None:
            return x
        kept = self._kept("video", types, x.pixel_values.shape[0], a, b)
        if not kept:
            return None
        pick = lambda t: None if t is None else t[kept]  # noqa: E731
        num_frames = x.num_frames
        if num_frames is not None:  # frames kept per clip; clips with none left are dropped
            clip_of = torch.repeat_interleave(torch.arange(len(num_frames)), num_frames.cpu())
            counts = torch.bincount(clip_of[kept], minlength=len(num_frames))
            num_frames = counts[counts > 0].to(x.num_frames)
        return VideoInputs(pick(x.pixel_values), pick(x.position_ids), num_frames)

    def _slice_audio(self, types, a, b) -> AudioInputs | None:
        x = self.audio
        if x is None or x.features is None:
            return x
        spans = _spans(types, AUDIO)
        N, T = x.features.shape[:2]
        if len(spans) != N:
            raise InputError(f"mm_token_type_ids hold {len(spans)} audio blocks but the inputs give {N}")
        mask = torch.ones(N, T, dtype=torch.bool) if x.mask is None else x.mask.bool().cpu()
        rank = mask.long().cumsum(-1) - 1  # [N, T] which soft token each real frame is
        kept, rows = [], []
        for i, (_, s, e) in enumerate(spans):
            if s < b and a < e:
                kept.append(i)
                rows.append(mask[i] & (rank[i] >= max(a, s) - s) & (rank[i] < min(b, e) - s))
        if not kept:
            return None
        return AudioInputs(x.features[kept], torch.stack(rows).to(mask.device if x.mask is None else x.mask.device))
