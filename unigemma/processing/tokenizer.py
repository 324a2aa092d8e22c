"""Text <-> token ids for Gemma checkpoints, from a `tokenizer.json` directory or a GGUF alone.

`Tokenizer` wraps a HF `tokenizers` backend built either from a checkpoint directory
(`tokenizer.json` + `tokenizer_config.json`, optional `chat_template.jinja` and
`generation_config.json`) or from the `tokenizer.ggml.*` metadata of a GGUF file: Gemma 4's
merge-ranked BPE (`gemma4`) or Gemma 3's score-ranked SentencePiece BPE (`llama`). It owns
the special ids (bos/eos/pad, media markers) and the chat template string, and decodes
through one byte string per token, so `StreamDecoder` can emit text as soon as it is whole
UTF-8 and its deltas concatenate to exactly `decode(ids)`.
It does not render chat templates or expand media placeholders: that is `chat.py`.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as Backend

from unigemma.errors import CheckpointError, InputError
from unigemma.gguf.reader import read_gguf_metadata  # noqa: F401  (re-exported: its old home)

# Marker tokens of the unified model, by the names transformers' tokenizer config uses.
MEDIA_TOKENS = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "video_token": "<|video|>",
}
# Tokens that end a chat turn; a base model never samples them, so stopping on them is safe.
END_OF_TURN_TOKENS = ("<turn|>", "<|tool_response>", "<end_of_turn>")
# llama.cpp / gguf-py `TokenType` values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _merges_from_scores(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule "merge the adjacent pair whose union
    is the highest-scoring normal piece" (ties: the lower id, then the shorter left part)."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            if piece[:k] in normal and piece[k:] in normal:
                ranked.append((-float(scores[i]), i, k, piece[:k], piece[k:]))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def _backend_from_gguf(meta: dict[str, Any], path: Path) -> Backend:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = meta.get("tokenizer.ggml.token_type", np.full(len(tokens), NORMAL))
    if kind == "gemma4":
        merges = []
        for m in meta.get("tokenizer.ggml.merges", []):
            cut = m.find(" ", 1)  # from 1, as llama.cpp does, so a piece may start with a space
            if cut < 0:
                raise CheckpointError(f"{path}: malformed merge {m!r}")
            merges.append((m[:cut], m[cut + 1:]))
    elif kind == "llama":
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            raise CheckpointError(f"{path}: SentencePiece vocabularies with add_space_prefix are not supported")
        merges = _merges_from_scores(tokens, meta["tokenizer.ggml.scores"], types)
    else:
        raise CheckpointError(f"{path}: tokenizer model {kind!r} is not supported (need 'gemma4' or 'llama')")

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id (llama.cpp does the same)
    unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Gemma's BPE runs over each whole stretch between added tokens: there is no pre-split
    # (transformers' GemmaTokenizer sets one on " ", which never fires after this normalizer).
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control tokens are special (skippable in decode) and match raw text only. User-defined
    # ones are plain text that must stay atomic (Gemma 4's tool markers, Gemma 3's whitespace
    # runs); like SentencePiece they match after space escaping, so "  " and "▁▁" both hit.
    backend.add_tokens([
        AddedToken(t, special=int(types[i]) != USER_DEFINED, normalized=int(types[i]) == USER_DEFINED)
        for i, t in enumerate(tokens) if int(types[i]) in (CONTROL, UNKNOWN, USER_DEFINED)
    ])
    return backend


def _bos_eos_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    single = " ".join(([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else []))
    return processors.TemplateProcessing(single=single, pair=f"{single} {single.replace('$A', '$B:1')}",
                                         special_tokens=[t for t in (bos, eos) if t])


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e


class Tokenizer:
    """A Gemma tokenizer: `encode`, `decode`, special ids and the checkpoint's chat template.

    Build it with `Tokenizer.from_dir(path)` or `Tokenizer.from_gguf(path)`.
    """

    def __init__(self, backend: Backend, *, named: dict[str, str], extra_eos_ids: Iterable[int] = (),
                 chat_template: str | None = None, name: str = ""):
        self.backend, self.chat_template, self.name = backend, chat_template, name
        vocab = backend.get_vocab(with_added_tokens=True)
        # Only markers the vocabulary has; templates see these as variables (bos_token, ...).
        self.special_tokens_map = {k: v for k, v in named.items() if v is not None and v in vocab}
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._pieces: list[bytes] = [b""] * (max(vocab.values()) + 1)
        for piece, i in vocab.items():
            m = _BYTE_PIECE.fullmatch(piece)
            # Same rule as the decoder chain: byte pieces are one raw byte, "▁" is a space.
            self._pieces[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        self.bos_id = self.token_to_id(self.special_tokens_map.get("bos_token", ""))
        self.pad_id = self.token_to_id(self.special_tokens_map.get("pad_token", ""))
        self.unk_id = self.token_to_id(self.special_tokens_map.get("unk_token", ""))
        eos = [self.token_to_id(self.special_tokens_map.get("eos_token", ""))]
        eos += list(extra_eos_ids) + [self.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Build from the `tokenizer.ggml.*` metadata of a GGUF file (weights are not read)."""
        path = Path(path)
        meta = read_gguf_metadata(path)
        backend = _backend_from_gguf(meta, path)
        tokens = meta["tokenizer.ggml.tokens"]
        named = dict(MEDIA_TOKENS)
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("mask", "mask")):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            named[f"{name}_token"] = tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None
        bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
        add_bos = meta.get("tokenizer.ggml.add_bos_token", True) and named["bos_token"]
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and named["eos_token"]
        backend.post_processor = _bos_eos_processor((named["bos_token"], int(bos_id)) if add_bos else None,
                                                    (named["eos_token"], int(eos_id)) if add_eos else None)
        extra = [int(meta[k]) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, named=named, extra_eos_ids=extra, chat_template=meta.get("tokenizer.chat_template"),
                   name=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from a checkpoint directory holding `tokenizer.json` (and usually its config)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust loader raises plain Exception subclasses
            raise CheckpointError(f"cannot load {path / 'tokenizer.json'}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        named = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                 "mask_token": "<mask>", **MEDIA_TOKENS}
        extra = config.get("extra_special_tokens")
        # transformers 5 keeps model-specific markers under extra_special_tokens; older configs at the top.
        for key, value in [*config.items(), *(extra.items() if isinstance(extra, dict) else [])]:
            if key in named and isinstance(_content(value), str):
                named[key] = _content(value)
        vocab = backend.get_vocab(with_added_tokens=True)
        # The reference processor registers the media markers as special tokens, so text
        # that spells one is always the marker, never BPE pieces.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens([AddedToken(named[k], special=True, normalized=False)
                                    for k in MEDIA_TOKENS if named[k] in vocab and named[k] not in added])
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            # transformers rebuilds the post-processor from these flags when they are given.
            bos, eos = named["bos_token"], named["eos_token"]
            backend.post_processor = _bos_eos_processor(
                (bos, vocab[bos]) if config.get("add_bos_token") and bos in vocab else None,
                (eos, vocab[eos]) if config.get("add_eos_token") and eos in vocab else None)
        gen = _read_json(path / "generation_config.json").get("eos_token_id", [])
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
            if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
                template = {t.get("name"): t.get("template") for t in template}.get("default")
        tok = cls(backend, named=named, extra_eos_ids=[gen] if isinstance(gen, int) else gen,
                  chat_template=template, name=str(path))
        tok._check_decoder()
        return tok

    def _check_decoder(self) -> None:
        # decode() reads per-token bytes instead of running the tokenizer.json decoder chain;
        # refuse a chain (e.g. Strip, ByteLevel) under which the two would disagree.
        probe = "  Hello, wörld!\n\tcafé ½ 😶‍🌫️ 中文 \u0f00<bos>"
        ids = self.encode(probe, add_special_tokens=False)
        if self.decode(ids) != self.backend.decode(ids, skip_special_tokens=False):
            raise CheckpointError(f"{self.name}: unsupported tokenizer.json decoder {self.backend.decoder!r}")

    # --- ids ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token) if token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (`<bos>`, `<|turn>`, markers...): `skip_special_tokens` drops them."""
        return token_id in self._special_ids

    @property
    def image_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("image_token", ""))

    @property
    def video_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("video_token", ""))

    @property
    def audio_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("audio_token", ""))

    @property
    def boi_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("boi_token", ""))

    @property
    def eoi_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("eoi_token", ""))

    @property
    def boa_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("boa_token", ""))

    @property
    def eoa_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens_map.get("eoa_token", ""))

    # --- encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the checkpoint asks for (`<bos>`)."""
        if not isinstance(text, str):
            raise InputError(f"encode() needs a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust backend)."""
        if not all(isinstance(t, str) for t in texts):
            raise InputError("encode_batch() needs a list of str")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a byte-fallback piece is a single byte)."""
        if not 0 <= token_id < len(self._pieces):
            raise InputError(f"token id {token_id} is outside the vocabulary (size {len(self._pieces)})")
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Invalid UTF-8 (possible after sampling byte pieces) becomes U+FFFD
        per maximal bad sequence, Python's rule, so that `StreamDecoder` can agree exactly."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_ids})"


class StreamDecoder:
    """Incremental detokenizer: `add(id)` returns the new text (possibly ""), `flush()` the rest.

    Byte-fallback pieces are held until they complete a UTF-8 character, so no delta ever
    holds a partial character; `"".join(deltas) + flush()` equals `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.ids: list[int] = []

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        piece = self.tokenizer.token_bytes(token_id)
        self.ids.append(token_id)
        if self.skip_special_tokens and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD, as in `decode`."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
