"""The server's surface around generation (issue 18): model names and aliases (lenient and strict),
/v1/models/{id}, completions' echo / suffix / token-id prompts / max_tokens 0, unsupported fields
refused by name, the role chunk after prefill, Prometheus /metrics, /tokenize and /detokenize, and
opt-in CORS. Real uvicorn on loopback with the tiny random real-vocabulary model (tests/server_helpers.py)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from server_helpers import Running, tiny_gemma

from unigemma.server import ServerConfig, create_app

KEY = "surface-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return tiny_gemma(tmp_path_factory.mktemp("surface"))


def serve(gemma, **kw):
    config = ServerConfig(**{"model_name": "tiny", "aliases": ("tiny-alias", "org/tiny"), "api_key": KEY,
                             "max_seqs": 2, "max_len": 256, "max_queue": 8, **kw})
    return Running(create_app(gemma, config))


@pytest.fixture(scope="module")
def server(gemma):
    with serve(gemma) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, headers=AUTH):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def error(r, status, param=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


def chat(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **kw}


# -- model names ------------------------------------------------------------------------------
def test_every_alias_is_listed_and_answers_under_its_own_name(client):
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-alias", "org/tiny"]
    r = client.chat.completions.create(model="tiny-alias", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert r.model == "tiny-alias"


def test_lenient_by_default_any_name_is_the_one_model(client):
    for name in ("gpt-3.5-turbo", "gemma-3-270m-q4_k_m.gguf"):
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.model == "tiny" and r.choices[0].message.content is not None
    assert client.completions.create(model="gpt-4", prompt="a", max_tokens=1).model == "tiny"


def test_strict_model_name_refuses_other_names(gemma):
    with serve(gemma, strict_model_name=True) as s:
        e = error(post(s, "/v1/chat/completions", chat(model="gpt-3.5-turbo")), 404, "model")
        assert e["code"] == "model_not_found" and "'tiny-alias'" in e["message"]
        assert post(s, "/v1/chat/completions", chat(model="org/tiny")).json()["model"] == "org/tiny"


def test_models_retrieve(server, client):
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    assert client.models.retrieve("org/tiny").id == "org/tiny"  # a hub-style id: the slash is part of it
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-3.5-turbo")  # describing a model is exact, even when answering is lenient
    error(httpx.get(server.url + "/v1/models/nope", headers=AUTH), 404, "model")
    assert httpx.get(server.url + "/v1/models/tiny").status_code == 401


def test_langchain_chat_openai_with_no_model_name(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, max_tokens=2, max_retries=0, timeout=120)
    assert llm.model_name == "gpt-3.5-turbo"  # LangChain's default, which this server does not serve
    reply = llm.invoke("hi")
    assert reply.response_metadata["model_name"] == "tiny" and reply.usage_metadata["output_tokens"] == 2


def test_default_names_of_a_checkpoint():
    from unigemma.server.names import ModelNames, default_names

    assert default_names("/m/gemma-3-270m-q4_k_m.gguf") == ["gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf"]
    assert default_names("google/gemma-4-12B-it") == ["google/gemma-4-12B-it", "gemma-4-12B-it"]
    # names that select something (adapters) stay exact, and then nothing else is guessed
    names = ModelNames(["base"], exact=("base+lora",))
    assert names.resolve("base+lora") == "base+lora" and names.resolve("gpt-4") is None
    assert ModelNames(["base"]).resolve("gpt-4") == "base" and ModelNames(["base"], strict=True).resolve("x") is None


# -- completions: echo, token ids, max_tokens 0, suffix -----------------------------------------
def test_echo_puts_the_prompt_first(client):
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt="The sky is", max_tokens=3, temperature=0)
    assert r.choices[0].text == "The sky is" + plain.choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="The sky is", max_tokens=3, temperature=0,
                                            echo=True, stream=True))
    assert chunks[0].choices[0].text == "The sky is"
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_echo_logprobs_score_the_prompt_without_generating(client, gemma):
    # lm-eval-harness' log-likelihood request
    r = client.completions.create(model="tiny", prompt="The sky is blue", max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = gemma.tokenizer.encode("The sky is blue")
    assert c.text == "The sky is blue" and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert lp.tokens == [gemma.tokenizer.token_bytes(i).decode() for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    # the model's own logprobs, as a plain forward over the whole prompt gives them
    with torch.inference_mode():
        want = gemma.engine.model.logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(want[j - 1, ids[j]].item(), abs=1e-3)
        assert len(lp.top_logprobs[j]) == 2 and max(lp.top_logprobs[j].values()) >= lp.token_logprobs[j] - 1e-4
    assert lp.text_offset[1] == 0 and lp.text_offset[2] == len(lp.tokens[1])  # <bos> takes no room in the text


def test_prompt_logprobs_in_chunks_match_one_forward(gemma):
    # chunks (40) and head slices (32) shorter than the prompt (> 80), itself past the sliding window (16)
    from unigemma.generate import score

    ids = gemma.tokenizer.encode("one two three four five six seven eight nine ten " * 8)
    assert len(ids) > 2 * 40 > 40 > score.HEAD_ROWS
    got = score.prompt_logprobs(gemma.engine.model, ids, top=3, chunk=40)
    with torch.inference_mode():
        want = gemma.engine.model.logits(torch.tensor([ids])).float().log_softmax(-1)[0]
    assert got[0] is None and len(got) == len(ids)
    for j in range(1, len(ids)):
        assert got[j]["token_id"] == ids[j]
        assert got[j]["logprob"] == pytest.approx(want[j - 1, ids[j]].item(), abs=1e-3)
        assert [t for t, _ in got[j]["top"]] == want[j - 1].topk(3).indices.tolist()


def test_echo_logprobs_with_a_completion_and_streamed(client):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=3, echo=True, logprobs=1, temperature=0)
    lp, prompt_len = r.choices[0].logprobs, r.usage.prompt_tokens
    assert len(lp.tokens) == prompt_len + 3 and lp.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.text_offset[prompt_len] == len("Once upon")  # the completion's offsets follow the echoed text
    chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=0, echo=True, logprobs=0,
                                            stream=True))
    assert [c.choices[0].finish_reason for c in chunks] == ["length"]
    assert chunks[0].choices[0].text == "Once upon" and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_max_tokens_0_needs_echo(server):
    error(post(server, "/v1/completions", {"prompt": "a", "max_tokens": 0}), 400, "max_tokens")
    error(post(server, "/v1/chat/completions", chat(max_tokens=0)), 400, "max_tokens")


def test_token_id_prompts(server, client, gemma):
    ids = gemma.tokenizer.encode("The sky is")
    text = client.completions.create(model="tiny", prompt="The sky is", max_tokens=4, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    two = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=2, temperature=0, echo=True)
    assert len(two.choices) == 2 and two.choices[1].text.startswith(gemma.tokenizer.decode(ids[:2]))
    one = client.completions.create(model="tiny", prompt=[2], max_tokens=0, echo=True, logprobs=1)  # <bos> alone
    assert one.choices[0].text == "<bos>" and one.choices[0].logprobs.token_logprobs == [None]
    for bad in ([5, 262144], [[1, 2], [-1]], [], [[]]):
        e = error(post(server, "/v1/completions", {"prompt": bad, "max_tokens": 1}), 400)
        assert e["param"] in ("prompt", "prompt[1]", "prompt[0]"), e
    error(post(server, "/v1/completions", {"prompt": [True, 2], "max_tokens": 1}), 400)  # not ids


def test_suffix_is_refused_by_a_vocabulary_without_fim(server):
    e = error(post(server, "/v1/completions", {"prompt": "def f(", "suffix": "\n", "max_tokens": 1}), 400, "suffix")
    assert "cannot insert" in e["message"]


def test_suffix_builds_a_fim_prompt_when_the_vocabulary_has_fim_tokens():
    from unigemma.server.completions import _encode, fim_ids

    class Fim:  # a CodeGemma-like vocabulary: the three FIM tokens and <bos>
        bos_id = 2
        special = {"<|fim_prefix|>": 67, "<|fim_suffix|>": 68, "<|fim_middle|>": 69}

        def token_to_id(self, t):
            return self.special.get(t)

        def encode(self, text, add_special_tokens=True):
            return ([2] if add_special_tokens else []) + [100 + ord(c) % 50 for c in text]

    tok = Fim()
    assert _encode(tok, "ab", "c", fim_ids(tok), 1000, "prompt") == [2, 67, 147, 148, 68, 149, 69]


# -- unknown fields -----------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", chat(frobnicate=1), "frobnicate"),
    ("/v1/chat/completions", chat(functions=[{"name": "f"}]), "functions"),  # the legacy API: not served
    ("/v1/chat/completions", chat(modalities=["text", "audio"]), "modalities"),
    ("/v1/chat/completions", chat(prediction={"type": "content", "content": "x"}), "prediction"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "guided_json": {}}, "guided_json"),
    ("/tokenize", {"content": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/v1/responses", {"input": "x", "max_output_tokens": 1, "frobnicate": 1}, "frobnicate"),
])
def test_unsupported_fields_are_400_naming_them(server, path, body, field):
    e = error(post(server, path, body), 400, field)
    assert e["code"] == "unsupported_field" and f"'{field}'" in e["message"]


def test_fields_clients_send_as_a_matter_of_course_are_accepted(server):
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"], "cache_prompt": True}
    assert post(server, "/v1/chat/completions", chat(**harmless)).status_code == 200
    body = {"prompt": "a", "max_tokens": 1, "best_of": 1, **harmless}
    assert post(server, "/v1/completions", body).status_code == 200


def test_min_tokens_is_honoured(server):
    r = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 5, "min_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    error(post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "min_tokens": 3}), 400, "min_tokens")


def test_return_token_ids(server, gemma):
    # vLLM's extension, which llama-benchy sends to count tokens
    r = post(server, "/v1/chat/completions", chat(max_tokens=4, return_token_ids=True)).json()
    assert len(r["prompt_token_ids"]) == r["usage"]["prompt_tokens"]
    assert len(r["choices"][0]["token_ids"]) == r["usage"]["completion_tokens"] == 4
    with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                                                 json=chat(max_tokens=4, stream=True, return_token_ids=True)) as res:
        chunks = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["prompt_token_ids"] == r["prompt_token_ids"]
    assert sum(len(ch["choices"][0].get("token_ids", [])) for ch in chunks) == 4
    ids = gemma.tokenizer.encode("a b")
    r = post(server, "/v1/completions", {"prompt": "a b", "max_tokens": 3, "return_token_ids": True}).json()
    assert r["choices"][0]["prompt_token_ids"] == ids and len(r["choices"][0]["token_ids"]) == 3


# -- the role chunk after prefill -----------------------------------------------------------------
def test_role_chunk_waits_for_prefill(server, gemma):
    engine = gemma.engine
    original = engine.prefill_steps
    release = threading.Event()

    def slow_prefill(*args, **kwargs):  # a scripted slow prefill: it ends when the test says so
        release.wait(30)
        return (yield from original(*args, **kwargs))

    arrived = []

    def read():
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/chat/completions", headers=AUTH,
                                                     json=chat(max_tokens=3, stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrived.append((time.monotonic(), json.loads(line[6:])))

    engine.prefill_steps = slow_prefill
    try:
        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(1.0)
        assert arrived == []  # nothing, not even the role, before the prompt is in
        released = time.monotonic()
        release.set()
        reader.join(60)
    finally:
        engine.prefill_steps = original
    first = arrived[0][1]["choices"][0]
    assert first["delta"]["role"] == "assistant" and arrived[0][0] >= released
    assert arrived[1][1]["choices"][0]["delta"].get("content") is not None  # the first token right after it


# -- /metrics -------------------------------------------------------------------------------------
def test_metrics_are_prometheus_text(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    r = httpx.get(server.url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert {"unigemma:requests", "unigemma:prompt_tokens", "unigemma:generation_tokens",
            "unigemma:num_requests_running", "unigemma:num_requests_waiting", "unigemma:kv_cache_usage_perc",
            "unigemma:time_to_first_token_seconds", "unigemma:time_per_output_token_seconds",
            "unigemma:e2e_request_latency_seconds", "unigemma:spec_decode_num_draft_tokens",
            "unigemma:spec_decode_num_accepted_tokens"} <= set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("unigemma:requests_total", (("outcome", "ok"),))] >= 1
    assert samples[("unigemma:time_to_first_token_seconds_count", ())] >= 1
    assert samples[("unigemma:generation_tokens_total", ())] >= 3 and samples[("unigemma:prompt_tokens_total", ())] > 0
    assert httpx.get(server.url + "/metrics").status_code == 401
    snapshot = httpx.get(server.url + "/metrics?format=json", headers=AUTH).json()  # the JSON stays reachable
    assert {"queue_depth", "running", "kv_use", "tokens_per_s", "requests"} <= set(snapshot)
    error(httpx.get(server.url + "/metrics?format=xml", headers=AUTH), 400)


# -- /tokenize, /detokenize -----------------------------------------------------------------------
def test_tokenize_detokenize_round_trip(server, gemma):
    text = "Hello, wörld 😶 <b>"
    ids = post(server, "/tokenize", {"content": text}).json()["tokens"]
    assert ids == gemma.tokenizer.encode(text, add_special_tokens=False)  # llama-server: no <bos> by default
    assert post(server, "/detokenize", {"tokens": ids}).json()["content"] == text
    r = post(server, "/tokenize", {"prompt": text}).json()  # vLLM's shape: special tokens by default
    assert r["tokens"][0] == gemma.tokenizer.bos_id and r["count"] == len(ids) + 1 and r["max_model_len"] == 256
    pieces = post(server, "/tokenize", {"content": "Hi there", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi there" and all(isinstance(p["id"], int) for p in pieces)
    chat_ids = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert "Hi" in gemma.tokenizer.decode(chat_ids) and len(chat_ids) > 3  # the chat template was applied


def test_tokenize_errors(server):
    raw = b'{"content": "a\\ud800"}'  # a lone surrogate must not reach the tokenizer
    r = httpx.post(server.url + "/tokenize", content=raw, headers={**AUTH, "Content-Type": "application/json"})
    error(r, 400, "content")
    error(post(server, "/detokenize", {"tokens": [1, 262144]}), 400, "tokens")
    error(post(server, "/detokenize", {"tokens": ["a"]}), 400)
    error(post(server, "/tokenize", {}), 400, "content")
    error(post(server, "/tokenize", {"content": "a", "prompt": "b"}), 400, "content")
    error(post(server, "/tokenize", {"content": "a"}, headers={}), 401)
    error(post(server, "/detokenize", {"tokens": [1]}, headers={}), 401)


# -- CORS -----------------------------------------------------------------------------------------
def preflight(s):
    return httpx.options(s.url + "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"})


def test_no_cors_headers_by_default(server):
    assert "access-control-allow-origin" not in preflight(server).headers
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models", headers={
        **AUTH, "Origin": "http://app.example"}).headers


def test_cors_origin_allows_a_browser_app(gemma):
    with serve(gemma, cors_origins=("http://app.example",)) as s:
        r = preflight(s)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        got = httpx.get(s.url + "/v1/models", headers={**AUTH, "Origin": "http://app.example"})
        assert got.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(s.url + "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with serve(gemma, cors_origins=("*",)) as s:
        assert preflight(s).headers["access-control-allow-origin"] == "*"


# -- the serve command's flags --------------------------------------------------------------------
def test_serve_flags_names_strict_and_cors(tmp_path_factory):
    import subprocess
    import sys

    from server_helpers import free_port, tiny_checkpoint
    from unigemma.vocab import gemma4_vocab_gguf

    port, ckpt = free_port(), tiny_checkpoint(tmp_path_factory.mktemp("surface"))
    proc = subprocess.Popen([sys.executable, "-m", "unigemma", "serve", "--model", str(ckpt), "--dtype", "float32",
                             "--tokenizer", str(gemma4_vocab_gguf()), "--port", str(port), "--max-seqs", "1",
                             "--max-len", "64", "--served-name", "first", "--served-name", "second",
                             "--strict-model-name", "--cors-origin", "http://app.example"],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Origin": "http://app.example"})
        assert [m["id"] for m in models.json()["data"]] == ["first", "second"]
        assert models.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(url + "/v1/chat/completions", json=chat(model="gpt-3.5-turbo"), timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        proc.terminate()
        proc.wait(30)
