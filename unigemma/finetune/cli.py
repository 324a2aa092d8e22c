"""`unigemma finetune`: its flags and the call into `train` (run.py).

Under torchrun (`torchrun --nproc-per-node N -m unigemma finetune ...`) every rank runs this;
finetune/distributed.py splits the work."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .train import TrainArgs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, .gguf file or hub id")
    p.add_argument("--data", required=True, help="train.jsonl: {messages} / {prompt, completion} / {text} lines")
    p.add_argument("--eval", help="eval.jsonl, same format: its loss is reported every --eval-every steps")
    p.add_argument("--out", required=True, help="directory for the adapter (PEFT format), log and checkpoints")
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: the checkpoint's)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32; scaling alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized scaling alpha / sqrt(r)")
    p.add_argument("--targets", help="modules to adapt: comma-separated leaf names ('default': the text "
                                     "decoder's q,k,v,o,gate,up,down projections, the default; 'media': the image "
                                     "and audio embedders' projections; 'default,media': both) or one regex over "
                                     "PEFT's module names")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights and activations (adapters are float32); default bfloat16")
    p.add_argument("--quantize", help="QLoRA: the frozen base as int8 or int4 (or a scheme: int8-g32, int4-g128)")
    p.add_argument("--max-len", type=int, default=2048, help="longer examples are skipped and counted (default 2048)")
    p.add_argument("--image-budget", type=int, help="soft tokens per image (70/140/280/560/1120; default: the model's)")
    p.add_argument("--train-full", metavar="MODULES",
                   help="modules trained whole beside the adapters: 'media' (the image and audio embedders, e.g. "
                        "untrained ones) or comma-separated module paths; saved as full_weights.safetensors")
    p.add_argument("--full-lr", type=float, help="learning rate of --train-full's weights (default: --lr)")
    p.add_argument("--init", metavar="DIR", help="start from a finished run's adapter (and full weights) in DIR, "
                                                  "with a fresh optimizer and schedule")
    p.add_argument("--resume", action="store_true", help="continue from the latest --out/checkpoint-* (before "
                                                         "--init: a resumed run keeps its own weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in fields(TrainArgs):
        if f.name == "shuffle":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"float": float, "int": int, "str": str}.get(str(f.type).split(" ")[0], float)
            if f.name == "max_steps":
                kind = int
            p.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default {f.default})")


def main(args: argparse.Namespace) -> None:
    from .run import train

    train_args = {f.name: getattr(args, f.name) for f in fields(TrainArgs) if f.name != "shuffle"}
    result = train(args.model, args.data, args.out, eval=args.eval, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                   lora_dropout=args.lora_dropout, rslora=args.rslora, targets=args.targets, dtype=args.dtype,
                   quantize=args.quantize, max_len=args.max_len, image_budget=args.image_budget,
                   tokenizer=args.tokenizer, train_full=args.train_full, full_lr=args.full_lr, init=args.init,
                   resume=args.resume, progress=not args.quiet, **train_args)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return
    last = f"loss {result.losses[-1]:.4f}" if result.losses else "no step run"
    if result.eval_losses:
        last += f", eval loss {result.eval_losses[-1][1]:.4f}"
    print(f"adapter written to {result.out} ({result.steps} steps, {last})", file=sys.stderr)
