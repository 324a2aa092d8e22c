"""Tensor parallelism (unigemma/tp/): two ranks on gloo (CPU, fp32, one thread each) against one process.

The two ranks run in subprocesses started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*
in the environment): tests/tp_rank.py runs the same `scenario` as the one-process side here —
logits of a Gemma 4 unified prompt with an image and audio and of a Gemma 3 prompt, greedy
tokens, three requests through a two-row continuous batch, speculative decoding with an MTP
drafter — and the results must agree. The last test serves over HTTP with `--tp 2`, kills rank
1 mid-stream and expects the stream to end with an error and rank 0 to exit, not hang.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tp_rank import scenario

from unigemma.config import ModelConfig
from unigemma.errors import ConfigError
from unigemma.models.gemma3 import tiny_config as gemma3_tiny
from unigemma.models.gemma4 import tiny_config as gemma4_tiny
from unigemma.tp.group import Group
from unigemma.tp.load import load_shard
from unigemma.tp.shard import local_config
from unigemma.weights.loader import load_model
from unigemma.weights.random import write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["gemma4", "gemma3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def gemma4_config(**text) -> dict:
    c = gemma4_tiny()
    c["audio_config"] = {"audio_embed_dim": 640}  # (the tiny config's {} reads as "no audio")
    c["text_config"].update(text)
    return c


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {"gemma4": write_random_checkpoint(gemma4_config(), root / "gemma4"),
            "gemma3": write_random_checkpoint(gemma3_tiny(), root / "gemma3")}


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """`scenario` on each checkpoint, run by rank 0 of two."""
    out = tmp_path_factory.mktemp("tp-out") / "results.pt"
    job = json.dumps({"checkpoints": [str(checkpoints[f]) for f in FAMILIES], "out": str(out)})
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "tp_rank.py"), job], env=rank_env(r, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(logs)
    return dict(zip(FAMILIES, torch.load(out)))


@pytest.fixture(scope="module")
def one_process(checkpoints) -> dict[str, dict]:
    return {f: scenario(load_model(checkpoints[f], dtype="float32", pack=True)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_one_process(two_ranks, one_process, family):
    # Gemma 4: a prompt with an image (6 soft tokens) and audio (4 frames) embedded by the
    # replicated embedders. Row-parallel partial sums add in another order than one matmul:
    # 1e-5 relative to the largest logit (measured: 1.6e-5 absolute at logits up to 4.3).
    one, tp = one_process[family]["logits"], two_ranks[family]["logits"]
    assert tp.shape == one.shape
    torch.testing.assert_close(tp, one, rtol=0, atol=1e-5 * float(one.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_identical(two_ranks, one_process, family):
    assert two_ranks[family]["greedy"] == one_process[family]["greedy"]


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_identical(two_ranks, one_process, family):
    # three requests through two rows: the third joins when the first leaves
    assert two_ranks[family]["batched"] == one_process[family]["batched"]


def test_speculative_decoding_identical_to_plain(two_ranks, one_process):
    # the drafter runs on rank 0 only and reads the target's K/V, gathered from the ranks
    tp = two_ranks["gemma4"]
    assert tp["drafted"] > 0
    assert tp["speculative"] == one_process["gemma4"]["greedy"]


def test_each_rank_holds_its_slice(checkpoints):
    # Loading needs no collective: two ranks' loads in this process, checked against the whole.
    whole = load_model(checkpoints["gemma4"], dtype="float32", pack=False)
    shards = [load_shard(checkpoints["gemma4"], Group(r, 2, torch.device("cpu")), dtype="float32", pack=False)
              for r in (0, 1)]
    full_sd, parts = whole.state_dict(), [s.state_dict() for s in shards]
    sharded = 0
    for name, w in full_sd.items():
        a, b = parts[0][name], parts[1][name]
        if a.shape == w.shape:  # replicated: norms, media embedders, 1-KV-head K on full layers
            assert torch.equal(a, w) and torch.equal(b, w), name
            continue
        dim = 0 if a.shape[0] != w.shape[0] else 1
        assert torch.equal(torch.cat([a, b], dim), w), name
        sharded += w.numel()
    t = whole.config.text
    full_kv = [i for i, lt in enumerate(t.layer_types) if lt == "full_attention"][0]
    # the full layers' single K=V head is on both ranks; the sliding layers' 2 KV heads are split
    assert parts[0][f"model.language_model.layers.{full_kv}.self_attn.k_proj.weight"].shape[0] == t.global_head_dim
    assert parts[0]["model.language_model.layers.0.self_attn.k_proj.weight"].shape[0] == t.head_dim
    per_rank = sum(v.numel() for k, v in parts[0].items() if v.shape != full_sd[k].shape)
    assert per_rank * 2 == sharded


def test_kv_heads_split_replicated_or_refused():
    cfg = ModelConfig.from_dict(gemma4_config(num_attention_heads=8, num_key_value_heads=4))
    local = local_config(cfg, 2).text
    assert (local.num_attention_heads, local.kv_heads_of("sliding_attention"), local.kv_heads_of("full_attention")) \
        == (4, 2, 1)
    assert local_config(cfg, 8).text.kv_heads_of("sliding_attention") == 1  # 4 KV heads shared by 8 ranks
    three = ModelConfig.from_dict(gemma4_config(num_attention_heads=6, num_key_value_heads=3, intermediate_size=132))
    with pytest.raises(ConfigError, match="3 key/value heads"):
        local_config(three, 2)
    with pytest.raises(ConfigError, match="not divisible"):
        local_config(cfg, 3)


def test_exit_rank_runs_the_exit_handlers_flushes_and_keeps_the_status():
    # a rank ends with os._exit (tp/group.py exit_rank: no finalization for gloo's threads to
    # abort in), yet what sys.exit would do first still happens: an exit handler (rank 0's
    # Leader.close sends "stop" from one) and output still in a buffer
    code = ("import atexit, sys\n"
            "from unigemma.tp.group import exit_rank\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "sys.stdout.write('buffered, no newline')\n"
            "sys.stderr.write('to stderr')\n"
            "exit_rank(3)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (r.returncode, r.stdout, r.stderr) == (3, "buffered, no newlinehandler ran\n", "to stderr")


def test_a_dead_rank_fails_the_served_requests_and_rank_0_exits(tmp_path):
    from unigemma.vocab import gemma4_vocab_gguf

    ckpt = write_random_checkpoint(gemma4_config(vocab_size=262144), tmp_path / "ckpt")
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "unigemma", "serve", "--model", str(ckpt), "--tokenizer", str(gemma4_vocab_gguf()),
           "--tp", "2", "--tp-timeout", "20", "--port", str(http_port), "--dtype", "float32", "--max-len", "4096",
           "--threads", "1"]
    ranks = [subprocess.Popen(cmd, env=rank_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert ranks[0].poll() is None, ranks[0].communicate()[0]
            try:
                c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4000, "temperature": 0,
                "stream": True, "ignore_eos": True}
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        stream = c.getresponse()
        assert stream.status == 200
        assert stream.readline().startswith(b"data:")  # decoding under way
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rest = stream.read().decode()
        assert '"error"' in rest and "RankLost" in rest and rest.rstrip().endswith("data: [DONE]")
        ranks[0].wait(timeout=20)  # the grace for the error to reach clients, then exit: not a hang
        assert ranks[0].returncode == 1
        assert time.monotonic() - killed < 20
    finally:
        for p in ranks:
            p.kill()
            p.communicate()


def test_what_tp_does_not_mirror_is_refused(checkpoints):
    # a prefix cache's K/V copies and a LoRA adapter's modules would exist on rank 0 only
    from mock_model import MockTokenizer

    from unigemma.errors import InputError
    from unigemma.generate.engine import Engine
    from unigemma.pipeline import Gemma

    shard = load_shard(checkpoints["gemma3"], Group(0, 2, torch.device("cpu")), dtype="float32")
    with pytest.raises(InputError, match="tensor parallelism"):
        Engine(shard, MockTokenizer(), prefix_cache_mb=1)
    with pytest.raises(InputError, match="tensor parallelism"):
        Gemma(shard).load_adapter(checkpoints["gemma3"])
