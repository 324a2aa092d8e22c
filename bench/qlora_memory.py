"""QLoRA on the exact 12B shape: peak RSS (VmHWM of a fresh process) of one training step.

    python -m bench.qlora_memory [--quant int4-g32 --seq 1024 --rank 16 --threads 2]

The child process loads bench/full_12b.py's random 12B checkpoint (the exact config in
../shared/configs/gemma-4-12B, bf16 shards on disk) with every weight quantized as it streams
in (`unigemma.load_model(quant=...)`: the bf16 12B is never held), adds LoRA r=16 on
q/k/v/o/gate/up/down of all 48 layers, and runs one optimizer step on `seq` random tokens, all
of them labels (the worst case for the loss head): gradient checkpointing per decoder layer, the
loss head in chunks (finetune/loss.py), gradients through the dequantized int4 weights
(quant/linear.py), torch AdamW. Peak RSS covers loading and the step. Prints one JSON line
(target: ≤ 12 GiB, a 16 GB machine). `--ckpt DIR` runs another checkpoint (a quick check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.machine import machine
from bench.peers import rss_mib, run_child


def child(ckpt: str, quant: str, seq: int, rank: int) -> dict:
    from pathlib import Path

    import unigemma
    from unigemma.finetune import Dataset, TrainArgs, Trainer, prepare
    from unigemma.finetune.data import Example
    from unigemma.finetune.labels import Encoded
    from unigemma.inputs import ModelInputs
    from unigemma.lora import LoraConfig

    t = time.perf_counter()
    model = unigemma.load_model(ckpt, dtype="bfloat16", quant=quant, pack=False, exact=True)
    load_s, rss_load = time.perf_counter() - t, rss_mib()
    params = prepare(model, LoraConfig(r=rank, alpha=2 * rank), seed=0)
    ids = torch.randint(10, 200_000, (1, seq), generator=torch.Generator().manual_seed(0))
    example = Encoded(ModelInputs(ids, torch.ones_like(ids), torch.zeros_like(ids)), ids[0].clone())
    trainer = Trainer(model, params, Dataset(Path(ckpt), [Example(example, 1)]), 0,
                      TrainArgs(lr=1e-4, max_steps=1, warmup=0, schedule="constant", gradient_checkpointing=True))
    t = time.perf_counter()
    loss, _ = trainer.train_step()  # forward, loss, backward, AdamW step: what `unigemma finetune` runs
    step_s = time.perf_counter() - t
    moved = sum(int(p.abs().sum() > 0) for p in params[1::2])  # B: zero until the step
    return {"load_s": round(load_s, 1), "rss_after_load_mib": round(rss_load), "peak_rss_mib": round(rss_mib()),
            "step_s": round(step_s, 1), "loss": round(loss, 4), "label_tokens": seq - 1,
            "trainable_params": sum(p.numel() for p in params),
            "lora_B_nonzero_after_step": f"{moved}/{len(params) // 2}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quant", default="int4-g32")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ckpt", help="checkpoint directory (default: bench/full_12b.py's 12B)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(a.ckpt, a.quant, a.seq, a.rank)))
        return
    from bench.full_12b import write_checkpoint

    ckpt = a.ckpt or str(write_checkpoint())
    out = run_child("bench.qlora_memory", ["--child", "--ckpt", ckpt, "--quant", a.quant, "--seq", a.seq,
                                           "--rank", a.rank, "--threads", a.threads], timeout=3600)
    peak = out.get("peak_rss_mib")
    print(json.dumps({"bench": "qlora_memory", "checkpoint": ckpt, "quant": a.quant, "seq": a.seq, "rank": a.rank,
                      "gradient_checkpointing": True, **out,
                      "peak_rss_gib": round(peak / 1024, 2) if peak else None, "target_gib": 12,
                      "machine": machine(a.threads)}))
    sys.exit(0 if peak else 1)


if __name__ == "__main__":
    main()
