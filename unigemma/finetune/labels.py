"""One training example's tokens and labels: a conversation rendered as inference renders it, and
which of its tokens the loss is on.

The rule (what the field does: TRL's assistant-only loss, Unsloth's `train_on_responses_only`,
mlx-lm's `--mask-prompt`): only what the model itself would generate is trained:
  * trained: each assistant message's tokens, from its first content token (or tool call)
    through the first end-of-turn token the engine stops on (`tokenizer.eos_ids`: `<turn|>`,
    `<|tool_response>` after a tool call, Gemma 3's `<end_of_turn>`), so the model learns to stop;
  * masked (-100): bos, system / user / tool turns and tool results, the turn headers the
    template writes around an assistant message (`<|turn>model\\n`), whatever follows the
    end-of-turn token (the template's newline: generation never produces it), media
    placeholders and their begin / end markers (soft tokens are inputs, never outputs).

How: the template renders messages[:i+1] for each i, so message i owns the text it adds to
messages[:i] (the template must render a conversation prefix by prefix, which Gemma's do; it is checked;
messages after the last assistant message train nothing and are dropped). An assistant
message's header is the part of its text that the generation prompt
(`add_generation_prompt=True` on messages[:i]) also writes. The conversation's last assistant
message is written as inference prompts it: after the generation prompt itself (Gemma 4 with
thinking off adds an empty thought channel there, which history turns do not carry), so the
final reply is trained in exactly the context `unigemma serve` gives it. Media are then
expanded and the text tokenized once, as `Processor.inputs_from_prompts` does; tokens are
labelled by their character offsets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..inputs import ModelInputs
from ..processing import cost
from ..processing.chat import Processor, normalize_messages, render

IGNORE = -100  # the label of a token the loss skips (transformers' and PyTorch's convention)


@dataclass(frozen=True)
class Encoded:
    """One example: a batch-of-one `ModelInputs` (no padding) and its labels [S]."""
    inputs: ModelInputs
    labels: torch.Tensor  # [S] long: the token id where trained, IGNORE elsewhere

    @property
    def length(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_trained(self) -> int:
        return int((self.labels != IGNORE).sum())


def _token_spans(processor: Processor, text: str) -> list[tuple[int, int, int]]:
    """(id, start, end) of each token of `text` alone, no special tokens added."""
    enc = processor.tokenizer.backend.encode(text, add_special_tokens=False)
    return [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets)]


def _header_chars(processor: Processor, piece: str, prompt: str) -> int:
    """Characters of `piece` (an assistant message's text) that the generation prompt also
    writes, cut at a token boundary (a reply starting with '<' must not lose its first token)."""
    n = 0
    for _, _, end in _token_spans(processor, piece):
        if not prompt.startswith(piece[:end]):
            break
        n = end
    return n


def _trained_end(processor: Processor, piece: str, start: int) -> int:
    """The end of the first end-of-turn token at or after `start` (or the piece's end)."""
    stops = set(processor.tokenizer.eos_ids)
    for tok, a, b in _token_spans(processor, piece):
        if a >= start and tok in stops:
            return b
    return len(piece)


def render_pieces(processor: Processor, messages: list[dict], tools: list[dict] | None = None,
                  enable_thinking: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Normalized messages → (the prompt text with media placeholders, the trained character
    ranges). Raises InputError when there is no assistant message or the template cannot be
    split message by message."""
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise InputError("the conversation has no assistant message: nothing to train on")
    last = max(i for i, r in enumerate(roles) if r == "assistant")
    messages, roles = messages[:last + 1], roles[:last + 1]  # what follows the last reply trains nothing
    special = processor.tokenizer.special_tokens_map

    def rendered(upto: int, gen: bool) -> str:
        return render(processor.chat_template, messages[:upto], tools=tools, add_generation_prompt=gen,
                      special_tokens=special, enable_thinking=enable_thinking)

    text, trained, before = "", [], ""
    for i, role in enumerate(roles):
        now = rendered(i + 1, False)
        if not now.startswith(before):
            raise InputError(f"message {i} ({role}): the chat template does not render this conversation "
                             "message by message (an assistant message with both content and tool_calls "
                             "before its tool results?); split such a message in two")
        piece = now[len(before):]
        if role == "assistant":
            prompt = rendered(i, True)[len(before):] if i else ""
            head = _header_chars(processor, piece, prompt)
            if i == last and len(prompt) > head and prompt.startswith(piece[:head]):
                piece, head = prompt + piece[head:], len(prompt)  # the inference prompt's form
            end = _trained_end(processor, piece, head)
            if end > head:
                trained.append((len(text) + head, len(text) + end))
        text += piece
        before = now
    return text, trained


def encode_conversation(processor: Processor, messages, tools: list[dict] | None = None,
                        enable_thinking: bool = False) -> Encoded:
    """A conversation (OpenAI-style messages, media as paths / data URLs) → its tokens, media and labels."""
    cost.check_tools(tools, processor.limits)
    normalized, items = normalize_messages(messages)
    text, trained = render_pieces(processor, normalized, tools, enable_thinking)
    costs = processor.costs(items)
    cost.check_media(costs, processor.limits)
    parts, expansions = processor.media_expansions(text, items)
    expanded, ranges = _expand(processor, text, items, expansions, trained)
    tok = processor.tokenizer
    bos = tok.special_tokens_map.get("bos_token")
    # the processor's rule: a template that writes <bos> itself gets no second one
    enc = tok.backend.encode(expanded, add_special_tokens=not (bos and expanded.startswith(bos)))
    ids = torch.tensor(enc.ids, dtype=torch.long)
    types = torch.zeros_like(ids)
    for token_id, value in processor.type_of_id.items():
        types[ids == token_id] = value
    media_ids = {tok.token_to_id(processor.token[k]) for k in processor.token if processor.token[k]}
    labels = torch.full_like(ids, IGNORE)
    bounds = sorted(ranges)
    for j, ((a, _), added) in enumerate(zip(enc.offsets, enc.special_tokens_mask)):
        if added or enc.ids[j] in media_ids:
            continue
        if any(s <= a < e for s, e in bounds):
            labels[j] = ids[j]
    inputs = ModelInputs(ids[None], torch.ones(1, len(ids), dtype=torch.long), types[None], **parts)
    return Encoded(inputs, labels)


def _expand(processor: Processor, text: str, items, expansions: list[str],
            trained) -> tuple[str, list[tuple[int, int]]]:
    """Media placeholders → their soft-token runs (as the processor expands them), the trained
    ranges moved by the characters inserted before them."""
    kinds = [k for k in ("image", "audio", "video") if processor.token[k]]
    if not items or not kinds:
        return text, trained
    queues = {k: iter([e for it, e in zip(items, expansions) if it.kind == k]) for k in kinds}
    by_text = {processor.token[k]: k for k in kinds}
    pattern = re.compile("|".join(re.escape(processor.token[k]) for k in kinds))
    out, shifts, pos, shift = [], [], 0, 0
    for m in pattern.finditer(text):
        out.append(text[pos:m.start()])
        rep = next(queues[by_text[m.group(0)]])
        out.append(rep)
        shift += len(rep) - len(m.group(0))
        shifts.append((m.end(), shift))
        pos = m.end()
    out.append(text[pos:])

    def moved(x: int) -> int:
        return x + next((s for end, s in reversed(shifts) if end <= x), 0)
    return "".join(out), [(moved(a), moved(b)) for a, b in trained]


def encode_text(processor: Processor, text: str) -> Encoded:
    """Plain text (no template): <bos> text <eos>, every token but <bos> trained (the eos too, so
    a document's end is learned, as mlx-lm's `text` data)."""
    if not isinstance(text, str) or not text:
        raise InputError("'text' must be a non-empty string")
    tok = processor.tokenizer
    ids = tok.encode(text, add_special_tokens=True)
    eos = tok.token_to_id(tok.special_tokens_map.get("eos_token", ""))
    if eos is not None:
        ids.append(eos)
    ids = torch.tensor(ids, dtype=torch.long)
    labels = ids.clone()
    if tok.bos_id is not None and int(ids[0]) == tok.bos_id:
        labels[0] = IGNORE
    return Encoded(ModelInputs(ids[None], torch.ones(1, len(ids), dtype=torch.long), torch.zeros(1, len(ids),
                                                                                              dtype=torch.long)),
                   labels)
