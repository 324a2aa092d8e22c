"""`train(...)`: the Python API behind `unigemma finetune`, from a model path and a jsonl file to
an adapter directory.

    from unigemma.finetune import train
    result = train(model="path/or/hub-id", data="train.jsonl", out="adapter/", eval="eval.jsonl",
                   lora_r=16, lora_alpha=32, quantize="int4", max_steps=200)
    result.losses, result.eval_losses, result.out

It loads the model unpacked (`unigemma.load(fast=False)`; a GGUF's quantized tensors
dequantized to `dtype` unless `quantize` asks for our int8 / int4), freezes every weight, wraps
the targets with LoRA (unigemma/lora), reads the data (data.py) and runs the `Trainer`. Under
torchrun every rank does all of this (one seed: the same adapters), then trains its share of
each batch (distributed.py); rank 0 alone prints and writes.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InputError
from . import distributed, full
from .data import Dataset, load_jsonl
from .train import QUANT_NAMES, TrainArgs, Trainer


@dataclass
class Result:
    out: Path
    losses: list[float]
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    trainable: int = 0  # adapter parameters trained


def prepare(model, lora_config, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze `model` and add the adapter (seeded: its A matrices are random); returns the
    adapter's parameters. A quantized base (QLoRA) needs nothing more: QuantLinear passes the
    input's gradient through its dequantized weight, recomputed in backward (quant/linear.py).
    bf16 decoder linears on a CPU that emulates bf16 (AVX2) become models/upcast.py's, whose
    forward and backward run float32 GEMMs (torch's emulated bf16 backward is ~100x slower)."""
    from ..lora import add_lora
    from ..models.upcast import upcast_linears
    from ..quant.kernels import plan

    for p in model.parameters():
        p.requires_grad_(False)
    if model.device.type == "cpu" and plan().float_linear(torch.bfloat16) == "upcast":
        upcast_linears(model)
    torch.manual_seed(seed)
    params = add_lora(model, lora_config)
    for p in params:
        p.requires_grad_(True)
    return params


def start_from(model, directory: str | Path, config, whole: dict) -> None:
    """`--init DIR`: a finished run's adapter (and its full_weights.safetensors, with --train-full)
    as this run's starting weights, under a fresh optimizer and schedule at step 0 (PEFT's
    `from_pretrained(..., is_trainable=True)`); `--resume` instead continues a run where it
    stopped. Checked whole before a weight is copied: same rank and alpha, the same modules."""
    from ..lora.peft import lora_state_dict, read_adapter

    theirs, tensors = read_adapter(directory)
    if (theirs.r, theirs.alpha, theirs.use_rslora) != (config.r, config.alpha, config.use_rslora):
        raise InputError(f"--init {directory}: its adapter is r={theirs.r} alpha={theirs.alpha:g}"
                         f"{' rslora' if theirs.use_rslora else ''}, this run's r={config.r} alpha={config.alpha:g}"
                         f"{' rslora' if config.use_rslora else ''} (give the same --lora-r / --lora-alpha / --rslora)")
    mine = lora_state_dict(model)
    odd = sorted(set(tensors) ^ set(mine)) or [k for k, v in mine.items() if tensors[k].shape != v.shape]
    if odd:
        raise InputError(f"--init {directory}: its adapter's tensors are not this run's (other --targets?), "
                         f"e.g. {odd[:2]}")
    weights = Path(directory) / full.FULL_FILE
    if whole and not weights.is_file():
        raise InputError(f"--init {directory}: no {full.FULL_FILE} for --train-full's modules "
                         f"(its run trained none; drop --train-full or --init another run)")
    if weights.is_file() and not whole:
        raise InputError(f"--init {directory}: it holds {full.FULL_FILE} (trained modules): give --train-full "
                         f"as its run did")
    if whole:
        saved = load_file(str(weights))  # read once: checked here, copied by load_full_weights
        odd = sorted(set(saved) ^ set(full.full_state_dict(whole)))
        if odd:
            raise InputError(f"--init {directory}: {full.FULL_FILE} holds other modules than --train-full's, "
                             f"e.g. {odd[:2]}")
        full.load_full_weights(model, saved)
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(tensors[k])


def train(model: str | Path, data: str | Path, out: str | Path, *, eval: str | Path | None = None,
          lora_r: int = 16, lora_alpha: float = 32.0, lora_dropout: float = 0.0, rslora: bool = False,
          targets: str | list[str] | None = None, dtype: str = "bfloat16", quantize: str | None = None,
          max_len: int = 2048, image_budget: int | None = None, tokenizer: str | None = None,
          train_full: str | None = None, full_lr: float | None = None, init: str | Path | None = None,
          resume: bool = False, progress: bool = True, **train_args) -> Result:
    """Fine-tune `model` on `data`; the adapter lands in `out`. train_args: `TrainArgs` fields.
    train_full: modules trained whole beside the adapters (full.py; "media": the embedders), at
    `full_lr` (default: the adapters' lr), saved as full_weights.safetensors in `out`. init: a
    finished run's output directory whose weights this run starts from (`start_from`)."""
    import unigemma
    from ..lora import DEFAULT_TARGETS, LoraConfig, save_adapter
    from ..lora.config import parse_targets

    known = {f.name for f in fields(TrainArgs)}
    unknown = set(train_args) - known
    if unknown:
        raise InputError(f"unknown training options: {', '.join(sorted(unknown))}")
    args = TrainArgs(**train_args)
    if full_lr is not None and not full_lr > 0:
        raise InputError(f"--full-lr must be positive, got {full_lr}")
    if isinstance(targets, str):
        try:
            targets = parse_targets(targets)
        except re.error as e:
            raise InputError(f"--targets {targets!r}: not a list of module names and not a regex ({e})") from e
    with distributed.joined(args.fsdp) as dist:
        quant = QUANT_NAMES.get(quantize, quantize) if quantize else None
        is_gguf = str(model).endswith(".gguf")
        # sharded (--fsdp): loaded on the CPU, fully_shard moves each layer's shard to the device
        gemma = unigemma.load(model, dtype=dtype, fast=False, quant=quant, dequantize=is_gguf and quant is None,
                              tokenizer=tokenizer, exact=True, device="cpu" if dist.fsdp else dist.device)
        config = LoraConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, use_rslora=rslora,
                            target_modules=targets or DEFAULT_TARGETS, base_model=str(model))
        params = prepare(gemma.model, config, args.seed)
        whole = full.resolve(gemma.model, train_full) if train_full else {}
        if init is not None:
            start_from(gemma.model, init, config, whole)
        if whole and dist.fsdp:
            raise InputError("--train-full is not supported with --fsdp (the whole modules are not sharded)")
        if dist.fsdp:
            params = dist.shard(gemma.model, params)  # the sharded parameters replace the adapters'
        whole_params = full.make_trainable(whole)
        # the whole modules train at their own lr; built after sharding, so the groups hold the live tensors
        groups = [{"params": params}, {"params": whole_params, "lr": full_lr or args.lr}] if whole else None
        params = params + whole_params
        progress = progress and dist.is_main
        processor = gemma.processor(image_budget=image_budget)
        train_data = load_jsonl(data, processor, max_len, progress)
        eval_data: Dataset | None = load_jsonl(eval, processor, max_len, progress) if eval else None
        if progress:
            n = sum(p.numel() for p in params)
            print(f"{len(train_data)} examples ({train_data.trained_tokens} trained tokens"
                  + (f", {train_data.skipped['too_long']} longer than --max-len {max_len} skipped"
                     if train_data.skipped else "") + f"); LoRA r={lora_r} on {len(params) // 2} modules, "
                  f"{n:,} trainable parameters" + (f" ({', '.join(whole)} in full)" if whole else "")
                  + f"; {dtype}" + (f", base {quant}" if quant else ""), file=sys.stderr)
        out = Path(out)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        tok = gemma.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_ids[0]

        def save(m, d):
            save_adapter(m, d, config)
            if whole:
                full.save_full_weights(whole, d)
        trainer = Trainer(gemma.model, params, train_data, pad, args, eval_data, out, save=save,
                          progress=progress, dist=dist, groups=groups)
        if resume:
            where = trainer.resume()
            if progress:
                print(f"resumed from {where} (step {trainer.step})" if where else "nothing to resume: starting",
                      file=sys.stderr)
        trainer.run()
        if args.save_every and trainer.step % args.save_every:
            trainer.checkpoint()  # the last step too, so --resume can extend the run
        with dist.gathered():
            if dist.is_main:
                save(gemma.model, out)
        if dist.is_main:
            (out / "training_args.json").write_text(json.dumps(
                {"model": str(model), "data": str(data), "lora_r": lora_r, "lora_alpha": lora_alpha,
                 "lora_dropout": lora_dropout, "rslora": rslora, "dtype": dtype, "quantize": quant,
                 "max_len": max_len, "train_full": train_full, "full_lr": full_lr,
                 "init": str(init) if init is not None else None,
                 **{f.name: getattr(args, f.name) for f in fields(TrainArgs)}}, indent=2))
        return Result(out, trainer.losses, trainer.eval_losses, dict(train_data.skipped), trainer.step,
                      sum(p.numel() for p in params))
