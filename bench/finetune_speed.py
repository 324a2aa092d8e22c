"""Training speed: LoRA training tokens/s, ours against transformers + PEFT, same model, same run.

    python bench/finetune_speed.py [--seq 512 --batch 1 --repeats 3 --threads 1]

Model: the random mid-size Gemma 4 unified checkpoint (bench/checkpoint.py: hidden 1536, 8
layers, the real 262,144 vocabulary, bf16). Both sides: bf16 weights (--dtype float32: fp32), LoRA r=16 / alpha 32 on
q/k/v/o/gate/up/down (float32 adapters, the same initial values), gradient checkpointing per
decoder layer (non-reentrant), torch AdamW (no clipping on either side). Ours is `Trainer.train_step`. One step: forward, loss, backward and optimizer
step on one batch of `seq` random tokens whose last quarter is the label (an SFT reply;
--label-fraction 1: every token).
transformers' loop is the plain one (`model(input_ids, labels=...)`, loss.backward()). Steps
alternate between the two (ours, theirs, ours, ...) after a warm-up step each; best of repeats.
Prints one JSON line: tokens/s each, the ratio, and where our step's time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label-fraction", type=float, default=0.25, help="the trained tail of each sequence")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="both sides' weights (bf16 where bf16 is emulated, AVX2: ours runs float32 GEMMs "
                         "over upcast blocks, transformers' the emulated bf16 kernels)")
    ap.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first (0: the slow peer's "
                                                                 "bf16 steps on AVX2 take many minutes)")
    ap.add_argument("--root", default=None, help="where the mid-size checkpoint is (bench/checkpoint.py's runs/bench)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from checkpoint import make_checkpoint
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import Gemma4UnifiedForConditionalGeneration

    import unigemma
    from unigemma.finetune import Dataset, TrainArgs, Trainer, prepare
    from unigemma.finetune.data import Example
    from unigemma.finetune.labels import Encoded
    from unigemma.finetune.labels import IGNORE
    from unigemma.finetune.loss import hidden_states, label_loss
    from unigemma.inputs import ModelInputs
    from unigemma.lora import LoraConfig, lora_state_dict
    from unigemma.quant.kernels import plan

    path = make_checkpoint(args.root)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200_000, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, IGNORE)
    n_labels = max(1, round(args.seq * args.label_fraction))
    labels[:, -n_labels:] = ids[:, -n_labels:]
    tokens = ids.numel()

    gemma = unigemma.load(path, dtype=args.dtype, fast=False)
    config = LoraConfig(r=16, alpha=32)
    params = prepare(gemma.model, config, seed=0)
    inputs = ModelInputs(ids, torch.ones_like(ids), torch.zeros_like(ids))
    # our step is the Trainer's (what `unigemma finetune` runs), on a dataset of this one batch
    examples = [Example(Encoded(ModelInputs(ids[i:i + 1], torch.ones_like(ids[i:i + 1]),
                                            torch.zeros_like(ids[i:i + 1])), labels[i]), i + 1)
                for i in range(args.batch)]
    trainer = Trainer(gemma.model, params, Dataset(path, examples), 0,
                      TrainArgs(lr=1e-4, max_steps=10 ** 6, batch_size=args.batch, warmup=0, schedule="constant",
                                max_grad_norm=0.0, gradient_checkpointing=True, shuffle=False))

    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, args.dtype))
    ref = get_peft_model(ref, PeftConfig(r=16, lora_alpha=32, target_modules=list(config.target_modules)))
    set_peft_model_state_dict(ref, lora_state_dict(gemma.model))
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.enable_input_require_grads()
    ref.train()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4, weight_decay=0.0)  # as TrainArgs

    def ours() -> float:
        return trainer.train_step()[0]

    def theirs() -> float:
        out = ref(input_ids=ids, labels=labels)
        out.loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    times = {"ours": [], "transformers_peft": []}
    losses = {}
    for k in range(args.repeats + args.warmup_rounds):
        for name, fn in (("ours", ours), ("transformers_peft", theirs))[:: 1 if k % 2 == 0 else -1]:
            t0 = time.perf_counter()
            losses[name] = fn()
            if k >= args.warmup_rounds:  # the first rounds warm up both
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    # where our step goes: forward (no grad), the loss head alone, the rest is backward + optimizer
    with torch.no_grad():
        t0 = time.perf_counter()
        h = hidden_states(gemma.model, inputs)
        fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        label_loss(gemma.model, h, labels)
        head = time.perf_counter() - t0
    print(json.dumps({
        "bench": "finetune_speed", "model": "random mid-size Gemma 4 unified (hidden 1536, 8 layers, vocab 262144)",
        "dtype": args.dtype, "bf16_kernel": plan().float_linear(torch.bfloat16), "lora_r": 16, "seq": args.seq, "batch": args.batch,
        "label_tokens": args.batch * n_labels,
        "gradient_checkpointing": True, "repeats": args.repeats,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in best.items()},
        "step_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_vs_transformers_peft": round(best["transformers_peft"] / best["ours"], 3),
        "ours_breakdown_s": {"forward_no_grad": round(fwd, 3), "loss_head_no_grad": round(head, 3)},
        "last_loss": {k: round(v, 4) for k, v in losses.items()},
        "machine": machine(args.threads)}))


if __name__ == "__main__":
    main()
