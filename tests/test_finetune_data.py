"""Fine-tuning data: label masks token by token, bad data named by line, batching that keeps media whole."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from test_tokenizer import VOCAB_GGUF
from unigemma.finetune.data import DataError, batch_order, collate, load_jsonl
from unigemma.finetune.labels import IGNORE, encode_conversation
from unigemma.processing.chat import Processor
from unigemma.processing.tokenizer import Tokenizer
from unigemma.templates import from_file

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.fixture(scope="module")
def processor():
    from pathlib import Path

    import unigemma

    template = Path(unigemma.__file__).parent / "templates" / "gemma4.jinja"
    return Processor(Tokenizer.from_gguf(VOCAB_GGUF), from_file(template, "test").source, image_budget=70)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(d / "cat.png")
    t = np.arange(8000) / 16000
    soundfile.write(d / "beep.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return d


def conversation(d):
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": str(d / "cat.png")},
                                         {"type": "audio", "audio": str(d / "beep.wav")},
                                         {"type": "text", "text": "Weather where this is?"}]},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny in Paris."}]


# Every non-media token of the conversation above, [trained] in brackets: the tool call through
# <|tool_response> (the engine stops there), the final reply through <turn|>; the tool result,
# headers and the newline after <turn|> masked.
EXPECTED = (
    "<bos> <|turn> system \\n Be ␣brief . <|tool> declaration : get _ weather { description : <|\"|> weather "
    "<|\"|> , parameters :{ properties :{ city :{ type : <|\"|> STRING <|\"|> }}, required :[ <|\"|> city <|\"|> ], "
    "type : <|\"|> OBJECT <|\"|> }} <tool|> <turn|> \\n <|turn> user \\n <|image> <image|> <|audio> <audio|> "
    "Weather ␣where ␣this ␣is ? <turn|> \\n <|turn> model \\n [<|tool_call>] [call] [:] [get] [_] [weather] [{] "
    "[city] [:] [<|\"|>] [Paris] [<|\"|>] [}] [<tool_call|>] [<|tool_response>] response : get _ weather { value : "
    "<|\"|> sunny <|\"|> } <tool_response|> [Sunny] [␣in] [␣Paris] [.] [<turn|>] \\n").split(" ")


def test_label_mask_token_by_token(processor, media):
    msgs = conversation(media)
    enc = encode_conversation(processor, msgs, tools=TOOLS)
    tok = processor.tokenizer
    ids, labels = enc.inputs["input_ids"][0].tolist(), enc.labels.tolist()
    soft = {tok.token_to_id("<|image|>"), tok.token_to_id("<|audio|>")}
    seen = []
    for t, lab in zip(ids, labels):
        assert lab in (IGNORE, t)  # a label is its own token or masked
        if t in soft:
            assert lab == IGNORE  # media soft tokens never trained
            continue
        s = tok.decode([t]).replace("\n", "\\n").replace(" ", "␣")
        seen.append(f"[{s}]" if lab != IGNORE else s)
    assert seen == EXPECTED
    # the image and audio blocks are whole: 1 block each, with their soft-token counts
    types = enc.inputs["mm_token_type_ids"][0]
    assert int((types == 1).sum()) > 0 and int((types == 3).sum()) > 0
    # the context of the final reply is exactly the prompt inference builds for messages[:-1]
    prompt = processor(msgs[:-1], tools=TOOLS)
    n = prompt["input_ids"].shape[1]
    assert ids[:n] == prompt["input_ids"][0].tolist()
    assert labels[n - 1] == IGNORE and labels[n] == ids[n]
    assert torch.equal(enc.inputs["pixel_values"], prompt["pixel_values"])


def test_inference_form_of_the_last_reply(processor):
    """Gemma 4 with thinking off prompts with an empty thought channel: the last reply is trained
    after it (as served), an earlier reply in its history form (as later turns show it)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Bye."}]
    enc = encode_conversation(processor, msgs)
    tok = processor.tokenizer
    text = tok.decode(enc.inputs["input_ids"][0].tolist())
    assert text.count("<|channel>thought\n<channel|>") == 1 and text.endswith("<channel|>Bye.<turn|>\n")
    trained = tok.decode([t for t, lab in zip(enc.inputs["input_ids"][0].tolist(), enc.labels.tolist())
                          if lab != IGNORE])
    assert trained == "Hello.<turn|>Bye.<turn|>"
    # prompt / completion strings are a user turn and the reply
    p = processor([{"role": "user", "content": "bye"}])["input_ids"][0].tolist()
    enc2 = encode_conversation(processor, [{"role": "user", "content": "bye"},
                                           {"role": "assistant", "content": "Bye."}])
    assert enc2.inputs["input_ids"][0].tolist()[:len(p)] == p


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_data_is_named_by_line(processor, media, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]}
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_jsonl(write(tmp_path / "bad.jsonl", [good, '{"messages": [']), processor)
    missing = {"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]},
                            {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"m\.jsonl:3: message 0, part 0: image file not found: .*nope\.png"):
        load_jsonl(write(tmp_path / "m.jsonl", [good, "", missing]), processor)
    with pytest.raises(DataError, match=r"n\.jsonl:1: .*no assistant message"):
        load_jsonl(write(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), processor)
    with pytest.raises(DataError, match=r"k\.jsonl:1: expected a 'messages'"):
        load_jsonl(write(tmp_path / "k.jsonl", [{"input": "x"}]), processor)
    with pytest.raises(DataError, match=r"r\.jsonl:1: message 0: unknown role"):
        load_jsonl(write(tmp_path / "r.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]), processor)


def test_too_long_is_skipped_and_counted(processor, media, tmp_path):
    # relative media paths resolve against the jsonl file's directory
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes((media / "cat.png").read_bytes())
    long_one = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/cat.png"},
                                                          {"type": "text", "text": "what?"}]},
                             {"role": "assistant", "content": "A picture."}]}
    short = {"prompt": "hi", "completion": "Hello."}
    text = {"text": "plain words to continue"}
    path = write(tmp_path / "t.jsonl", [short, long_one, text])
    full = load_jsonl(path, processor)
    assert [e.line for e in full.examples] == [1, 2, 3] and full.skipped == {}
    n_long = full.examples[1].length
    cut = load_jsonl(path, processor, max_len=n_long - 1)
    assert [e.line for e in cut.examples] == [1, 3] and cut.skipped == {"too_long": 1}
    # plain text: every token but <bos> trained, <eos> appended
    t = full.examples[2].encoded
    assert t.labels[0] == IGNORE and bool((t.labels[1:] == t.inputs["input_ids"][0, 1:]).all())
    with pytest.raises(DataError, match="no usable example"):
        load_jsonl(path, processor, max_len=3)


def test_batches_keep_media_whole(processor, media, tmp_path):
    img = {"messages": [{"role": "user", "content": [{"type": "image", "image": str(media / "cat.png")},
                                                     {"type": "audio", "audio": str(media / "beep.wav")}]},
                        {"role": "assistant", "content": "A cat."}]}
    lines = [img, {"prompt": "a", "completion": "b"}, img, {"prompt": "long " * 30, "completion": "ok"}]
    data = load_jsonl(write(tmp_path / "b.jsonl", lines), processor)
    b = collate([data.examples[i].encoded for i in (0, 1, 2)], pad_id=0)
    assert b.inputs["pixel_values"].shape[0] == 2 and b.inputs["input_features"].shape[0] == 2
    for r, i in enumerate((0, 1, 2)):  # each row is its example, right-padded
        e = data.examples[i].encoded
        assert torch.equal(b.inputs["input_ids"][r, :e.length], e.inputs["input_ids"][0])
        assert int(b.inputs["attention_mask"][r].sum()) == e.length and bool((b.labels[r, e.length:] == IGNORE).all())
    # bucketing: seeded, every example once per epoch, different orders across epochs
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    a, a2, c = batch_order(lengths, 2, 1, 0), batch_order(lengths, 2, 1, 0), batch_order(lengths, 2, 1, 1)
    assert a == a2 and sorted(sum(a, [])) == list(range(8)) and a != c
    assert all(abs(lengths[x] - lengths[y]) < 10 for x, y in a)  # short with short, long with long


def test_video_is_masked_and_kept_whole(processor, tmp_path):
    """A video turn: its frames' soft tokens are never labels, each frame is its own block of
    mm_token_type 2, and the frames equal those inference builds for the same prompt."""
    from messages import noise_clip

    noise_clip(tmp_path / "v.mkv", frames=3, seed=2)
    msgs = [{"role": "user", "content": [{"type": "video", "video": "v.mkv"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "Noise."}]
    data = load_jsonl(write(tmp_path / "v.jsonl", [{"messages": msgs}]), processor)
    enc = data.examples[0].encoded
    ids, labels, types = enc.inputs["input_ids"][0], enc.labels, enc.inputs["mm_token_type_ids"][0]
    video_tok = processor.tokenizer.token_to_id("<|video|>")
    assert bool((types[ids == video_tok] == 2).all()) and int((types == 2).sum()) == int((ids == video_tok).sum()) > 0
    assert bool((labels[types != 0] == IGNORE).all())  # no media position is a label
    tok = processor.tokenizer
    assert tok.decode([t for t, lab in zip(ids.tolist(), labels.tolist()) if lab != IGNORE]) == "Noise.<turn|>"
    msgs[0]["content"][0]["video"] = str(tmp_path / "v.mkv")
    prompt = processor(msgs[:-1])
    assert torch.equal(enc.inputs["pixel_values_videos"], prompt["pixel_values_videos"])
    assert enc.inputs["num_frames_per_video"].tolist() == [3]
    b = collate([enc, enc], pad_id=0)  # two clips in one batch: their frames concatenated, counts kept
    assert b.inputs["pixel_values_videos"].shape[0] == 6 and b.inputs["num_frames_per_video"].tolist() == [3, 3]
