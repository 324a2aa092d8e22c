"""Tensor parallelism on one machine: TP 2 (2 processes x 1 thread) vs TP 1 (1 process x 2 threads, and x 1 thread).

Same cores, same weights (bench/checkpoint.py's random mid-size Gemma 4 unified: hidden 1536,
8 layers, real vocabulary, ~730 M parameters, bf16), so the ratio is what splitting the model
costs or gains here: the collectives (two all-reduces per layer, the embedding's all-reduce, the
head's gather, rank 0's broadcast of each step) against two independent single-threaded
matmuls. TP 1 with one thread is the second peer: on a machine whose cores other processes also
use, one process's two OpenMP threads wait for each other at every barrier (measured here at load
average ~4 on 2 cores: a 64-token bf16 forward took 1.2 s on one thread, 17-24 s on two), so TP 2
may beat TP 1 x 2 threads for that reason alone; the load average is in the JSON line. Each
configuration runs in processes of its own (RSS figures do not mix); rank 0 of TP 2 launches
like torchrun (RANK, WORLD_SIZE, MASTER_* in the environment).

  prefill_tok_s   P / (time to the prompt's last hidden state), P-token random prompt
  decode_tok_s    (D - 1) / (first token -> last token), greedy, end-of-sequence ignored
  collective_share_of_wall   TP 2's rank 0: the share of the measured runs' wall time spent inside
                  collectives (the transfer and the wait for the other rank: what TP adds)
  weights_mib     per rank: the weights it holds (parameters, buffers, oneDNN-packed copies)
  rss_mib         per rank after the runs (VmRSS; the weights are touched by then, mapped or not),
                  and peak_rss_mib (VmHWM)

Figures are best of --repeats after a warm-up. The last stdout line is one JSON object with
`machine(2)`, each configuration's figures and ratio_<figure>_vs_<peer> = TP 2 / that TP 1 (above 1:
TP 2 faster).

    python -m bench.tp_speed [--prompt-tokens 128] [--decode-tokens 16] [--repeats 2] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> dict:
    fields = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            fields[k] = round(int(v.split()[0]) / 1024, 1)
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


def weights_mib(model) -> float:
    """The model's weights held by this process: parameters, buffers and oneDNN-packed copies."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        for packed in [getattr(m, "packed", None), *getattr(m, "parts", [])]:
            if isinstance(packed, torch.Tensor):
                total += packed.numel() * packed.element_size()
    return round(total / 2**20, 1)


def measure(gemma, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    """Best prefill and decode figures of `repeats` greedy generations after one warm-up."""
    from unigemma.generate.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 200_000, (1, prompt_tokens), generator=g)
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    gemma.engine.generate({"input_ids": ids}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    group = getattr(gemma.model, "tp_group", None)
    calls, comm_s, wall = (group.calls, group.seconds, time.perf_counter()) if group else (0, 0.0, 0.0)
    prefill, decode = 0.0, 0.0
    for _ in range(repeats):
        t = gemma.engine.generate({"input_ids": ids}, params).timings
        prefill, decode = max(prefill, prompt_tokens / t.prefill_s), max(decode, t.decode_tokens_per_s)
    out = {"prefill_tok_s": round(prefill, 2), "decode_tok_s": round(decode, 2)}
    if group:  # rank 0's time inside collectives (its own and waiting for the other rank's) over the runs
        out["collectives"] = group.calls - calls
        out["collective_share_of_wall"] = round((group.seconds - comm_s) / (time.perf_counter() - wall), 3)
    return out


def run_config(args) -> None:
    """One process of one configuration (--child): load, measure on rank 0, print JSON lines."""
    import unigemma

    torch.set_num_threads(args.threads)
    group = None
    if args.tp > 1:
        from unigemma.tp.group import init_group
        from unigemma.tp.load import follow_model, load_shard

        group = init_group(args.tp, timeout_s=600)
        if group.rank != 0:
            model = load_shard(args.model, group, dtype=args.dtype)
            code = follow_model(model, group)
            print(json.dumps({"rank": group.rank, "weights_mib": weights_mib(model), **rss_mib()}), flush=True)
            sys.exit(code)
    gemma = unigemma.load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, tp=group)
    figures = measure(gemma, args.prompt_tokens, args.decode_tokens, args.repeats)
    print(json.dumps({"rank": 0, **figures, "weights_mib": weights_mib(gemma.model), **rss_mib()}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, tp: int, threads: int) -> list[dict]:
    """Run one configuration: `tp` processes of `threads` threads; their JSON lines, by rank."""
    cmd = [sys.executable, "-m", "bench.tp_speed", "--child", "--tp", str(tp), "--threads", str(threads),
           "--model", str(args.model), "--tokenizer", str(args.tokenizer), "--dtype", args.dtype,
           "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
           "--repeats", str(args.repeats)]
    port = free_port()
    env = lambda r: dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1",  # noqa: E731
                         MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(cmd, env=env(r), stdout=subprocess.PIPE, text=True, cwd=REPO) for r in range(tp)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"TP {tp} failed: exit codes {[p.returncode for p in procs]}")
    lines = [json.loads(next(ln for ln in reversed(o.splitlines()) if ln.startswith("{"))) for o in outs]
    return sorted(lines, key=lambda d: d["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--root", help="where bench checkpoints are cached (default runs/bench)")
    p.add_argument("--model", help="a checkpoint directory (default: bench/checkpoint.py's mid-size one)")
    p.add_argument("--tokenizer", help="default: the Gemma 4 vocabulary GGUF")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_config(args)
    from bench.checkpoint import VOCAB_GGUF, make_checkpoint
    from bench.machine import machine

    args.model = args.model or make_checkpoint(args.root)
    args.tokenizer = args.tokenizer or VOCAB_GGUF
    load_before = round(os.getloadavg()[0], 2)
    peers = {"tp1_2threads": launch(args, tp=1, threads=2)[0], "tp1_1thread": launch(args, tp=1, threads=1)[0]}
    two = launch(args, tp=2, threads=1)
    result = {"bench": "tp_speed", "model": Path(args.model).name, "dtype": args.dtype,
              "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
              **peers, "tp2_1thread": {"rank0": two[0], "rank1": two[1]}}
    for name, peer in peers.items():
        for k in ("prefill_tok_s", "decode_tok_s"):
            result[f"ratio_{k}_vs_{name}"] = round(two[0][k] / peer[k], 3)
    result["ratio_max_rank_rss_vs_tp1"] = round(max(r["rss_mib"] for r in two) / peers["tp1_1thread"]["rss_mib"], 3)
    result["loadavg_1m"] = {"before": load_before, "after": round(os.getloadavg()[0], 2)}
    result["machine"] = machine(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
