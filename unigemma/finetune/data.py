"""Training data: a jsonl file → encoded examples → length-bucketed, padded batches.

Each line is one of (the formats TRL and mlx-lm read):
    {"messages": [...], "tools": [...]?, "enable_thinking": false?}   OpenAI-style chat; content
        parts text / image / audio / video (or image_url), tool_calls, tool messages
    {"prompt": ..., "completion": ...}   strings (a user turn and the assistant's reply) or lists
        of messages (the prompt's, then the reply's); the chat template applies
    {"text": "..."}                        plain text, every token trained (no template)
Media sources are paths relative to the jsonl file, absolute paths or data: URLs.

Bad data (`DataError`, naming `file:line`): a line that is not a JSON object of one of these
forms, a missing media file, a conversation with no assistant message, anything the processor
refuses. A conversation longer than `max_len` tokens is skipped and counted (`Dataset.skipped`),
never cut: a cut could split an image's bidirectional block or drop a reply's end.

Batches: examples are shuffled (seeded per epoch), grouped into windows of `batch_size * 64`,
sorted by length inside each window and cut into batches, and the batches shuffled again
(length bucketing: little padding, still a random order). Rows are right-padded (positions
0..n-1 stay each row's own); media of a batch are concatenated row by row, the order the model's
scatter fills placeholders in (embed/merge.py). Examples are never packed, so an image block is
always whole and its bidirectional mask is the one inference builds.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from ..inputs import AudioInputs, ImageInputs, ModelInputs, VideoInputs
from ..processing.chat import SOURCE_KEYS, Processor
from .labels import IGNORE, Encoded, encode_conversation, encode_text

BUCKET_BATCHES = 64  # batches per sorting window: less padding with more, less randomness


class DataError(InputError):
    """A training file's line that cannot be used; the message names the file and line."""


class Example:
    """One training example. A text-only one keeps its encoding; one with media keeps only its
    line and re-encodes when a batch takes it (`encoded`): the processor is deterministic, so
    the tensors are the same every time, and memory holds the jsonl, not every decoded picture
    (14,400 items at 64 soft tokens each were 16 GB of float pixels)."""

    def __init__(self, encoded: Encoded, line: int, source: Callable[[], Encoded] | None = None):
        """source: re-encodes the example; given, `encoded`'s media are not kept."""
        self.line, self.length, self.num_trained = line, encoded.length, encoded.num_trained
        self._encoded = encoded if source is None else None
        self._source = source

    @property
    def encoded(self) -> Encoded:
        return self._encoded if self._encoded is not None else self._source()


@dataclass
class Dataset:
    path: Path
    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)  # reason → count ("too_long")
    trained_tokens: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def _resolve_media(messages: Any, base: Path, where: str) -> Any:
    """A copy of the messages with relative media paths made absolute (data: URLs and absolute
    paths untouched); a missing file is a DataError naming it."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
                url = part["image_url"]
                part = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}
                kind = "image"
            if kind in SOURCE_KEYS:
                part = dict(part)
                for key in SOURCE_KEYS[kind]:
                    src = part.get(key)
                    if isinstance(src, str) and not src.startswith("data:") and "://" not in src:
                        p = Path(src).expanduser()
                        p = p if p.is_absolute() else base / p
                        if not p.is_file():
                            raise DataError(f"{where}: message {i}, part {j}: {kind} file not found: {p}")
                        part[key] = str(p)
            parts.append(part)
        out.append({**m, "content": parts})
    return out


def _as_messages(value: Any, role: str) -> list:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def encode_line(processor: Processor, record: Any, base: Path, where: str) -> Encoded:
    """One parsed jsonl line → its encoded example (DataError naming `where` on any problem)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a line must be a JSON object, got {type(record).__name__}")
    try:
        if "messages" in record:
            messages = _resolve_media(record["messages"], base, where)
            return encode_conversation(processor, messages, tools=record.get("tools"),
                                       enable_thinking=bool(record.get("enable_thinking", False)))
        if "prompt" in record and "completion" in record:
            messages = _as_messages(record["prompt"], "user") + _as_messages(record["completion"], "assistant")
            if not all(isinstance(m, dict) for m in messages):
                raise InputError("prompt and completion must be strings or lists of messages")
            return encode_conversation(processor, _resolve_media(messages, base, where), tools=record.get("tools"))
        if "text" in record:
            return encode_text(processor, record["text"])
    except DataError:
        raise
    except InputError as e:
        raise DataError(f"{where}: {e}") from e
    raise DataError(f"{where}: expected a 'messages', 'prompt' + 'completion' or 'text' key, got "
                    f"{sorted(record)[:6]}")


def load_jsonl(path: str | Path, processor: Processor, max_len: int | None = None,
               progress: bool = False) -> Dataset:
    """Every line of a jsonl file encoded (blank lines are ignored); see the module docstring."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = Dataset(path, [])
    lines = path.read_text(encoding="utf-8").splitlines()
    bar = _bar(len(lines), f"reading {path.name}") if progress else None
    for n, raw in enumerate(lines, 1):
        if bar is not None:
            bar.update(1)
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        enc = encode_line(processor, record, path.parent, where)
        if enc.num_trained == 0:
            raise DataError(f"{where}: no token is trained (an empty assistant reply?)")
        if max_len is not None and enc.length > max_len:
            data.skipped["too_long"] = data.skipped.get("too_long", 0) + 1
            continue
        has_media = any(x is not None for x in (enc.inputs.image, enc.inputs.audio, enc.inputs.video))
        again = functools.partial(encode_line, processor, record, path.parent, where) if has_media else None
        data.examples.append(Example(enc, n, again))
        data.trained_tokens += enc.num_trained
    if bar is not None:
        bar.close()
    if not data.examples:
        raise DataError(f"{path}: no usable example ({data.skipped.get('too_long', 0)} longer than "
                        f"--max-len {max_len})")
    return data


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="line", leave=False)


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Example indices grouped into batches for one epoch (length-bucketed, seeded)."""
    idx = list(range(len(lengths)))
    if not shuffle:
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(idx)
    window = batch_size * BUCKET_BATCHES
    batches = []
    for w in range(0, len(idx), window):
        part = sorted(idx[w:w + window], key=lambda i: lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if batch_size > 1:
        rng.shuffle(batches)
    return batches


@dataclass(frozen=True)
class Batch:
    inputs: ModelInputs  # [B, S], right-padded (attention_mask 0 on padding)
    labels: torch.Tensor  # [B, S]

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.attention_mask.sum())


def collate(examples: list[Encoded], pad_id: int) -> Batch:
    """Right-pad a list of encoded examples into one batch; media concatenated row by row."""
    S = max(e.length for e in examples)
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    types = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    for r, e in enumerate(examples):
        n = e.length
        ids[r, :n], mask[r, :n] = e.inputs.input_ids[0], 1
        types[r, :n], labels[r, :n] = e.inputs.mm_token_type_ids[0], e.labels
    parts = {}
    images = [e.inputs.image for e in examples if e.inputs.image is not None]
    if images:
        parts["image"] = ImageInputs(torch.cat([x.pixel_values for x in images]),
                                     torch.cat([x.position_ids for x in images]))
    audios = [e.inputs.audio for e in examples if e.inputs.audio is not None]
    if audios:  # clips are end-padded to the batch's longest, the mask marking real frames
        T = max(a.features.shape[1] for a in audios)
        feats = torch.cat([torch.nn.functional.pad(a.features, (0, 0, 0, T - a.features.shape[1])) for a in audios])
        masks = torch.cat([torch.nn.functional.pad(a.mask.bool(), (0, T - a.mask.shape[1])) for a in audios])
        parts["audio"] = AudioInputs(feats, masks)
    videos = [e.inputs.video for e in examples if e.inputs.video is not None]
    if videos:
        parts["video"] = VideoInputs(torch.cat([v.pixel_values for v in videos]),
                                     torch.cat([v.position_ids for v in videos]),
                                     torch.cat([v.num_frames for v in videos]))
    return Batch(ModelInputs(ids, mask, types, **parts), labels)


def iterate(data: Dataset, batch_size: int, pad_id: int, seed: int, epoch: int,
            shuffle: bool = True) -> Iterator[Batch]:
    for rows in batch_order([e.length for e in data.examples], batch_size, seed, epoch, shuffle):
        yield collate([data.examples[i].encoded for i in rows], pad_id)
