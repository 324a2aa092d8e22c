"""Fine-tuning under torchrun (finetune/distributed.py), gloo on the CPU, fp32, a tiny model:

- 2 ranks with half of each batch each take the same steps as 1 process with the whole batch:
  the same losses and adapter weights after K steps (<= 1e-5), and the same optimizer moments in
  the checkpoint (full tensors, whatever the world size);
- a checkpoint from 2 ranks resumes on 1 process with the losses the uninterrupted run had;
- FSDP2 (`--fsdp`, fully_shard per decoder layer) resumes a 1-process checkpoint on 2 ranks:
  its shards restored from full tensors, the same following losses and weights, and its own
  checkpoint gathered back to the full tensors.

7 examples in batches of 3 (3, 3, 1): uneven halves, and a batch of which rank 1 gets no row.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unigemma.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
K = 4  # optimizer steps: 2 epochs' worth at 3 batches an epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from server_helpers import tiny_checkpoint
    from unigemma.vocab import gemma4_vocab_gguf

    d = tmp_path_factory.mktemp("ddp")
    rows = [{"prompt": f"Question {i}: what is {i} plus {3 * i}?" + " Explain." * (i % 3),
             "completion": f"It is {4 * i}." + " Indeed." * (i % 4)} for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Teal."}]})
    data = d / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["finetune", "--model", str(tiny_checkpoint(d)), "--tokenizer", str(gemma4_vocab_gguf()),
              "--data", str(data), "--dtype", "float32", "--lora-r", "2", "--batch-size", "3",
              "--max-steps", str(K), "--warmup", "0", "--lr", "1e-2", "--save-every", "2", "--quiet"]
    one = d / "one"
    assert one_process(common + ["--out", str(one)]) == 0
    return d, common, one


def one_process(argv: list[str]) -> int:
    from unigemma.cli import main

    return main(argv)


def torchrun(argv: list[str], n: int = 2) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                        "-m", "unigemma", *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # each rank ends with os._exit (cli.main, tp/group.py exit_rank): rank 0's last report still arrives
    assert r.stderr.count("adapter written to") == 1, r.stderr[-3000:]


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= tol, f"max |diff| {worst:.3g}"


def moments(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items() if v.dim() > 0}


def test_two_ranks_with_half_the_batch_each_equal_one_process(setup):
    d, common, one = setup
    two = d / "two"
    torchrun(common + ["--out", str(two)])
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, K + 1))
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-5, (a, b)
    assert_close(adapter(one), adapter(two))
    assert adapter(one)["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 0
    assert_close(moments(one / f"checkpoint-{K}"), moments(two / f"checkpoint-{K}"))


def test_a_two_rank_checkpoint_resumes_on_one_process(setup):
    d, common, one = setup
    two = d / "two"
    if not (two / "checkpoint-2").is_dir():
        torchrun(common + ["--out", str(two)])
    resumed = d / "two-on-one"
    resumed.mkdir()
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    assert one_process(common + ["--out", str(resumed), "--resume"]) == 0
    a, b = losses(one), losses(resumed)
    assert sorted(b) == [3, 4] and max(abs(a[s] - b[s]) for s in b) <= 1e-5, (a, b)
    assert_close(adapter(one), adapter(resumed))


def test_fsdp_resumes_a_one_process_checkpoint_on_two_ranks(setup):
    d, common, one = setup
    sharded = d / "one-on-two-fsdp"
    sharded.mkdir()
    shutil.copytree(one / "checkpoint-2", sharded / "checkpoint-2")
    torchrun(common + ["--out", str(sharded), "--resume", "--fsdp"])
    a, b = losses(one), losses(sharded)
    assert sorted(b) == [3, 4] and max(abs(a[s] - b[s]) for s in b) <= 1e-5, (a, b)
    assert_close(adapter(one), adapter(sharded))
    assert_close(moments(one / f"checkpoint-{K}"), moments(sharded / f"checkpoint-{K}"))


def test_fsdp_without_torchrun_is_a_clear_error(monkeypatch):
    from unigemma.finetune.distributed import from_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match="torchrun"):
        from_env(fsdp=True)
    assert not from_env().active
