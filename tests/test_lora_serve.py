"""LoRA adapters in the engine and the server: requests for different adapters and the base share
one decode batch (adapters unmerged per row, over the packed base) and each row equals its request
run alone; the prefix cache keys K/V by adapter; `unigemma.load(lora=)`; `serve --lora`, the
/v1/models listing, and /v1/load_lora_adapter and /v1/unload_lora_adapter with hostile paths."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from server_helpers import Running, tiny_checkpoint, tiny_gemma

import unigemma
from unigemma.generate.sampling import SamplingParams
from unigemma.generate.scheduler import Scheduler
from unigemma.lora import LoraConfig, add_lora, lora_modules, save_adapter
from unigemma.models.packed import PackedLinear, pack_linears
from unigemma.server import ServerConfig, create_app

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-serve")


@pytest.fixture(scope="module")
def loras(root):
    """Two random adapters of the tiny server checkpoint (one rsLoRA), under root/loras."""
    ckpt = tiny_checkpoint(root)
    for name, seed, config in [("a1", 1, LoraConfig(r=4, alpha=8.0)),
                               ("a2", 2, LoraConfig(r=2, alpha=4.0, use_rslora=True))]:
        model = unigemma.load_model(ckpt, dtype="float32")
        add_lora(model, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 2 / math.sqrt(p.shape[-1]))
        save_adapter(model, root / "loras" / name, config)
    return root / "loras"


@pytest.fixture(scope="module")
def gemma(root, loras):
    """The tiny model with both adapters over oneDNN-packed linears (the bf16 fast path's base;
    float32 loads unpacked, so it is packed here)."""
    g = tiny_gemma(root)
    pack_linears(g.model, head=False)
    g.load_adapter(loras / "a1", "a1", activate=False)
    g.load_adapter(loras / "a2", "a2", activate=False)
    return g


def prompt(seed: int, n: int = 24) -> dict:
    return {"input_ids": torch.randint(3, 5000, (1, n), generator=torch.Generator().manual_seed(seed))}


def run(gemma, jobs, max_seqs, prefix_cache_mb=0):
    s = Scheduler(gemma.engine, max_seqs=max_seqs, max_len=256, prefix_cache_mb=prefix_cache_mb)
    requests = [s.submit(inputs, GREEDY, adapter=adapter) for inputs, adapter in jobs]
    s.run_until_done()
    return [r.result() for r in requests]


def test_adapters_wrap_the_packed_base(gemma):
    layer = lora_modules(gemma.model)["model.language_model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, PackedLinear)  # the fast path stays the base


def test_mixed_adapter_batch_equals_each_request_alone(gemma):
    jobs = [(prompt(1), None), (prompt(2), "a1"), (prompt(3), "a2"), (prompt(4), "a1")]
    alone = [run(gemma, [job], 1)[0] for job in jobs]
    mixed = run(gemma, jobs, 4)
    for got, want in zip(mixed, alone):
        assert got.token_ids == want.token_ids
        diff = max(abs(a["logprob"] - b["logprob"]) for a, b in zip(got.logprobs, want.logprobs))
        assert diff < 1e-4, diff
    # the adapters act: the same prompt under a1, a2 and the base gives three different replies
    same = [run(gemma, [(prompt(2), a)], 1)[0] for a in (None, "a1", "a2")]
    lp = [[x["logprob"] for x in c.logprobs] for c in same]
    assert lp[0] != lp[1] and lp[1] != lp[2] and lp[0] != lp[2]


def test_prefix_cache_is_keyed_by_adapter(gemma):
    """K/V computed under an adapter are not the base's: a base request never restores them."""
    p = prompt(5, 40)
    s = Scheduler(gemma.engine, max_seqs=2, max_len=256, prefix_cache_mb=64)

    def once(adapter):
        r = s.submit(p, GREEDY, adapter=adapter)
        s.run_until_done()
        return r.result()

    under_a1 = once("a1")
    base = once(None)
    assert base.timings.cached_tokens == 0
    assert base.token_ids == run(gemma, [(p, None)], 1)[0].token_ids
    again = once(None)
    assert again.timings.cached_tokens > 0 and again.token_ids == base.token_ids
    a1_again = once("a1")
    assert a1_again.timings.cached_tokens > 0 and a1_again.token_ids == under_a1.token_ids
    assert once("a2").timings.cached_tokens == 0


def test_load_with_lora_runs_the_adapter(root, loras, gemma):
    with_lora = unigemma.load(tiny_checkpoint(root), dtype="float32", tokenizer=gemma.tokenizer, lora=loras / "a1")
    got = with_lora.engine.generate(prompt(6), GREEDY)
    assert got.token_ids == run(gemma, [(prompt(6), "a1")], 1)[0].token_ids
    with_lora.set_adapter(None)
    assert with_lora.engine.generate(prompt(6), GREEDY).token_ids == run(gemma, [(prompt(6), None)], 1)[0].token_ids


# -- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(root, loras):
    g = tiny_gemma(root)
    config = ServerConfig(model_name="tiny", max_seqs=4, max_len=256, adapters={"a1": str(loras / "a1")},
                          lora_loading=True, lora_dir=str(loras), max_loras=2, prefix_cache_mb=0)
    with Running(create_app(g, config)) as s:
        yield s


def chat(url, model):
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8,
        "temperature": 0})


def test_models_list_adapters_with_parent(server):
    data = httpx.get(server.url + "/v1/models").json()["data"]
    cards = {c["id"]: c for c in data}
    assert cards["a1"]["parent"] == "tiny" and cards["a1"]["object"] == "model" and "root" in cards["a1"]
    assert cards["tiny"]["parent"] is None
    assert httpx.get(server.url + "/v1/models/a1").json()["parent"] == "tiny"


def test_request_model_selects_the_adapter(server, gemma):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    msgs = [{"role": "user", "content": "Hello there"}]
    replies = {m: client.chat.completions.create(model=m, messages=msgs, max_tokens=8, temperature=0)
               for m in ("tiny", "a1")}
    assert replies["a1"].model == "a1"
    inputs = gemma.inputs(msgs)
    p = SamplingParams(temperature=0.0, max_tokens=8)
    assert replies["a1"].choices[0].message.content == run_content(gemma, inputs, p, "a1")
    assert replies["tiny"].choices[0].message.content == run_content(gemma, inputs, p, None)
    # with adapters served, an unknown name is not guessed to mean the base
    r = chat(server.url, "a3")
    assert r.status_code == 404 and "a1" in r.json()["error"]["message"]


def run_content(gemma, inputs, params, adapter):
    s = Scheduler(gemma.engine, max_seqs=1, max_len=256)
    r = s.submit(inputs, params, adapter=adapter)
    s.run_until_done()
    return r.result().content


def test_load_and_unload_at_run_time(server, loras):
    url = server.url
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert r.status_code == 200, r.text
    assert chat(url, "a2").status_code == 200
    assert "a2" in [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "a2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "lora_already_loaded"
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a4", "lora_path": "a1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_loras"  # max_loras=2
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status_code == 200
    assert chat(url, "a2").status_code == 404
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a2"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"


@pytest.mark.parametrize("path", ["../a1", "/etc", "a1/../../", "\u0000"])
def test_client_paths_outside_the_lora_dir_are_refused(server, path):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora_path"


def test_bad_adapter_files_are_400_naming_the_problem(server, loras, root):
    (loras / "junk").mkdir(exist_ok=True)
    (loras / "junk" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (loras / "junk" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (loras / "empty").mkdir(exist_ok=True)
    (loras / "other").mkdir(exist_ok=True)  # an adapter for another model: names that match nothing
    from safetensors.torch import save_file

    save_file({"base_model.model.decoder.layers.0.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.decoder.layers.0.q_proj.lora_B.weight": torch.zeros(64, 2)},
              loras / "other" / "adapter_model.safetensors")
    (loras / "other" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    for path, words in [("junk", "safetensors"), ("empty", "adapter_config.json"), ("missing", "not an adapter"),
                        ("other", "language_model.layers.0")]:
        r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert words in message and str(root) not in message  # the server's own paths stay private
    assert "bad" not in [c["id"] for c in httpx.get(server.url + "/v1/models").json()["data"]]


def test_loading_is_off_without_the_flag(root):
    g = tiny_gemma(root)
    app = create_app(g, ServerConfig(model_name="tiny", max_seqs=1, max_len=64))
    try:
        with Running(app) as s:
            r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "x"})
            assert r.status_code == 404 and "--enable-lora-loading" in r.json()["error"]["message"]
            r = httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "x"})
            assert r.status_code == 404
    finally:
        app.state.scheduler.stop()


def test_cli_run_with_lora_and_serve_flag_errors(root, loras, capsys):
    from unigemma.cli import main
    from unigemma.vocab import gemma4_vocab_gguf

    argv = ["run", "--model", str(tiny_checkpoint(root)), "--tokenizer", str(gemma4_vocab_gguf()), "--dtype",
            "float32", "--max-tokens", "3", "--temperature", "0", "Hello"]
    assert main(argv + ["--lora", str(loras / "a1")]) == 0
    assert main(argv + ["--lora", str(loras / "missing")]) == 2
    assert "missing: not an adapter directory" in capsys.readouterr().err
    assert main(["serve", "--lora", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--enable-lora-loading"]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_bad_names_and_adapters_in_use(server, monkeypatch):
    url = server.url
    for name, code in [("../x", 400), ("", 400), ("tiny", 400), ("x" * 200, 400)]:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a1"})
        assert r.status_code == code and r.json()["error"]["param"] == "lora_name", (name, r.text)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": "a1", "extra": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    scheduler = server.server.config.app.state.scheduler
    monkeypatch.setattr(scheduler, "adapter_in_use", lambda name: True)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "lora_in_use"
    monkeypatch.undo()
    assert chat(url, "a1").status_code == 200  # still served
