"""Which chat template a loaded model chats with, and the families' published defaults.

The choice, first that applies: a template the user gave (`--chat-template FILE`,
`unigemma.load(chat_template=FILE)`), the checkpoint's own (tokenizer_config.json,
chat_template.jinja, a GGUF's `tokenizer.chat_template`), the family's published default
(`models/base.py` `Family.chat_template` names a file here), else none. The files here are the
exact texts the families' instruction-tuned checkpoints publish:
  gemma3.jinja  google/gemma-3-*-it `chat_template` (`<start_of_turn>user ... <end_of_turn>`)
  gemma4.jinja  google/gemma-4-31B-it `chat_template.jinja` (`<|turn>user ... <turn|>`)
A base checkpoint (Gemma 3 270M) ships none: its family's default is what lets it chat at all.
This module knows no tokenizer and no model; it returns text and a line saying where it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from ..errors import UnigemmaError

# Family.chat_template value -> whose published template the file is (for the start-up line)
PUBLISHED = {"gemma3": "Gemma 3", "gemma4": "Gemma 4"}


@dataclass(frozen=True)
class ChatTemplate:
    source: str | None  # the Jinja text; None: this model has no chat template
    origin: str  # where it came from, as the start-up line "chat template: ..." says it


def published(name: str) -> str:
    """The text of a family's published template (`PUBLISHED` names them)."""
    if name not in PUBLISHED:
        raise KeyError(f"no published chat template {name!r} (known: {', '.join(PUBLISHED)})")
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def from_file(path: str | os.PathLike, flag: str) -> ChatTemplate:
    """A template file a user named with `flag` ('--chat-template', 'chat_template='): read,
    and compiled once so a typo fails now, naming the flag, not at the first request."""
    from ..processing.chat import compile_template

    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeError) as e:
        raise UnigemmaError(f"{flag}: cannot read {path}: {e}") from None
    if not source.strip():
        raise UnigemmaError(f"{flag}: {path} is empty")
    try:
        compile_template(source)
    except UnigemmaError as e:  # compile_template's "chat template does not compile: ..."
        raise UnigemmaError(f"{flag}: {path} is not a valid Jinja template: {e.__cause__ or e}") from None
    return ChatTemplate(source, f"{path} ({flag})")


def choose(given: ChatTemplate | None, checkpoint: str | None, family_default: str | None) -> ChatTemplate:
    """The template to chat with: the one given, else the checkpoint's, else the family's
    published default (`family_default`: a `PUBLISHED` name, or None), else none."""
    if given is not None:
        return given
    if checkpoint:
        return ChatTemplate(checkpoint, "the checkpoint's")
    if family_default is not None:
        return ChatTemplate(published(family_default),
                            f"{PUBLISHED[family_default]}'s published default (the checkpoint has none)")
    return ChatTemplate(None, "none (the checkpoint has none and its family publishes none: "
                              "chat needs --chat-template FILE)")
