"""`unigemma.load(path).chat(messages)`: OpenAI-style messages with media in, text out.

End to end against the reference: our processor's tensors (themselves checked against
transformers' processor in test_chat / test_*_processing) go through transformers' own
greedy `generate`, and the reply's token ids must equal it; the reply text is the decoded,
parsed ids.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from reference import Shape, load_reference, write_checkpoint
from test_tokenizer import VOCAB_GGUF, ours

import unigemma
from unigemma.errors import InputError
from unigemma.processing.parse import parse_output

def conversation():
    y, x = np.mgrid[0:200, 0:300]
    picture = Image.fromarray(np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8))
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(20000) / 16000)).astype(np.float32)
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "audio", "audio": tone},
                                         {"type": "text", "text": "What do you see and hear?"}]}]


def video_conversation():
    frames = np.random.default_rng(0).integers(0, 256, (8, 90, 120, 3), dtype=np.uint8)  # 8 frames: all kept
    return [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Describe."}]}]


@pytest.mark.parametrize("make", [conversation, video_conversation])
def test_chat_equals_transformers_generate_on_the_same_inputs(checkpoint, make):
    gemma = unigemma.load(checkpoint, dtype="float32")  # tokenizer.json found next to the weights
    messages = make()
    reply = gemma.chat(messages, max_new_tokens=24, image_budget=70)
    inputs = gemma.inputs(messages, image_budget=70)
    assert int((inputs["mm_token_type_ids"] > 0).sum()) > 0

    ref = load_reference(checkpoint)
    stop = sorted(set(gemma.tokenizer.eos_ids) | set(gemma.config.stop_token_ids))
    ref.generation_config.eos_token_id = stop
    with torch.no_grad():  # composition "sliding" is what transformers' static cache computes
        out = ref.generate(**inputs, max_new_tokens=24, do_sample=False, disable_compile=True,
                           cache_implementation="static")
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    while want and want[-1] == gemma.tokenizer.pad_id and len(want) > len(reply.token_ids):
        want.pop()  # generate pads after a stop token
    assert reply.token_ids == want
    assert reply.prompt_tokens == inputs["input_ids"].shape[1] and reply.completion_tokens == len(want)
    stopped = want[-1] in stop
    parsed = parse_output(gemma.tokenizer.decode(want[:-1] if stopped else want))
    assert (reply.content, reply.reasoning, reply.tool_calls) == (parsed.content, parsed.reasoning, parsed.tool_calls)
    assert reply.finish_reason == ("tool_calls" if parsed.tool_calls else "stop" if stopped else "length")
    assert reply.content or reply.reasoning or reply.tool_calls  # random weights still say something


def test_tokenizer_from_gguf_and_bf16(checkpoint, tmp_path):
    for f in checkpoint.iterdir():
        if not f.name.startswith(("tokenizer", "chat_template", "special")):
            (tmp_path / f.name).symlink_to(f)
    assert unigemma.load(tmp_path).tokenizer is None
    gemma = unigemma.load(tmp_path, tokenizer=VOCAB_GGUF)
    reply = gemma.chat([{"role": "user", "content": "Hello!"}], max_new_tokens=5, enable_thinking=True)
    assert 1 <= reply.completion_tokens <= 5 and reply.finish_reason in ("stop", "length")
    # The GGUF's template opens the turn with <|think|> when thinking is on.
    assert "<|think|>" in gemma.processor().render([{"role": "user", "content": "Hi"}], enable_thinking=True)
    from_dir = unigemma.load(checkpoint, dtype="float32")  # transformers' save of the same vocabulary
    for thinking in (False, True):
        ids = [g.inputs([{"role": "user", "content": "Hello!"}], enable_thinking=thinking)["input_ids"]
               for g in (gemma, from_dir)]
        assert torch.equal(*ids)


def test_bad_requests_raise_input_error(checkpoint, tmp_path):
    gemma = unigemma.load(checkpoint, dtype="float32")
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputError, match="non-empty"):
        gemma.chat([])
    with pytest.raises(InputError, match="max_tokens"):
        gemma.chat(hi, max_new_tokens=0)
    with pytest.raises(InputError, match="one conversation"):
        gemma.chat([hi, hi])
    with pytest.raises(InputError, match="1 image placeholder"):
        gemma.chat([{"role": "user", "content": "<|image|>"}])
    gemma.model.config.text.max_position_embeddings = 12  # a context smaller than the prompt
    with pytest.raises(InputError, match="context is 12 tokens"):
        gemma.chat(hi)
    for f in checkpoint.glob("*.safetensors"):
        (tmp_path / f.name).symlink_to(f)
    shutil.copy(checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(InputError, match="no tokenizer.json"):
        unigemma.load(tmp_path).chat(hi)


def test_tokenizer_larger_than_model_vocab_is_refused(ckpt_root):
    path = write_checkpoint(Shape(), ckpt_root)  # vocab 1024
    with pytest.raises(unigemma.CheckpointError, match="262144 tokens"):
        unigemma.load(path, tokenizer=ours())
