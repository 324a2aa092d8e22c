"""Train unigemma-mini from scratch: data, untrained checkpoint, training, the trained checkpoint.

    python -m bench.mini_train --work runs/mini [--steps 3000]

1. the data (bench/mmdata/generate.py, seed 0): 1,200 training and 200 held-out items of each of
   the 12 kinds; the last 8 training items of each kind are held back as the eval-loss set; each
   item becomes a conversation asking up to 4 more questions its meta answers and the conversation
   has not already given away (bench/mmdata/conversations.py: 29,805 trained answers over 14,304
   conversations; 36,755 before that rule, a third of them copyable from an earlier turn), mixed with
   800 paragraphs of plain English (`replay_text`: standard-library docstrings, none from the
   modules the prose perplexity is measured on), every token trained, to keep the decoder's text;
2. the untrained checkpoint (weights/mini.py: Gemma 3 270M's decoder from the installed GGUF,
   embedders initialised from seed 0);
3. `unigemma finetune`, float32: the embedders trained in full (`--train-full media`, lr 1e-3) and
   LoRA r=16 / alpha 32 on the decoder's q, k, v, o, gate, up, down (lr 2e-4, the rate at which
   bench/mini_probe.py took one-shape colour from 8% to 63% in 300 steps); batches of 8
   conversations, 20 warmup steps then a constant rate, so a run can be extended: run the
   script again with a larger `--steps` and the trainer resumes from its latest checkpoint
   (saved every 60 steps; `--resume`), one session after another; `--anneal N` ends a run
   annealed (the rate decays to 0 over its last N steps, `--schedule wsd`); `--init DIR` starts
   from a finished run's weights under a fresh optimizer (the second run: the step-1,680 weights
   of unigemma/mini, 720 steps more, the last 360 annealed: `--work runs/mini4 --init
   unigemma/mini --steps 720 --anneal 360`); `--more KIND=N` adds the seed's next N training
   items of a kind and `--replay-repeat K` puts each replay paragraph in the mix K times (the
   third run: `--work runs/mini5 --init unigemma/mini --steps 600 --anneal 300 --more shape=2400
   --more digit=1200 --replay-repeat 2`); `--free-shapes N` adds N pictures of one shape in an
   unnamed random colour (bench/mmdata/free_shapes.py), so that only the outline can name the
   shape; every image at the smallest budget (70: 8 x 8 patches,
   64 soft tokens);
4. the loss curve drawn to docs/mini-training.png (an `--init` run's to
   docs/mini-training-continued.png; `--curve NAME` another), and the trained model assembled as a checkpoint
   (`python -m unigemma.weights.mini WORK/model --trained WORK/train`: embedders in, adapter
   merged), ready for `python -m bench.mini_quality --model WORK/model --data WORK/data/heldout.jsonl`.

On the 2-core CPU of this project's machines a step takes ~5.5 s (~155 tokens/s) on the AMD EPYC
(AVX2); on the Xeon with AMX bf16, ~240 tokens/s in float32 and ~330 with `--dtype bfloat16`
(the frozen decoder in bf16, the embedders and the adapter still float32: the same losses to
~1e-3 over the first 12 steps; README, Twelfth look). `--init` takes the rank and alpha of the
adapter it starts from (the shipped one's alpha is under the recipe's 32: it ships merged at a
scale), or with `--init-alpha 32` goes on at the recipe's alpha from the same function (its B
rescaled), at the recipe's pace (README, Thirteenth look).

The first run reported in the README used lr 2e-3 (embedders) / 3e-4 (adapter) and a cosine
schedule ending at step 530, and differed from this script in its first 170 steps, which were those of a run on
the conversations alone (no replay text) planned for 680 steps; it was resumed from its
step-170 checkpoint with the replay text mixed in and 530 steps in all (`--resume`: adapter,
embedders, optimizer and position restored; the cosine schedule then ends at 530). Runs that
were stopped: one question per item (960 steps planned, embedders at lr 1e-3, adapter 3e-4)
at step 380: at step 240 it answered every held-out colour question "black", every count "1"
(the answer priors), its eval loss flat from step 160, and its adapter had raised Gemma 3
270M's prose perplexity from 16.5 to 8,597; and the mixed data with embedders at 3e-3 / adapter
2e-4, at step 138: eval loss 3.95 at step 130 (the reported run's: 1.54 at 170), the image soft
tokens grown to norm ~160 (text embeddings ~26) and collapsed onto one direction (tokens of one
picture at cosine 0.87-0.94, pictures' means at +-0.9997).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = {"dtype": "float32", "image_budget": 70, "train_full": "media", "full_lr": 1e-3, "lr": 2e-4,
          "lora_r": 16, "lora_alpha": 32, "batch_size": 8, "warmup": 20, "schedule": "constant", "seed": 0,
          "gradient_checkpointing": False, "return_memory": False}


def split_eval(data: Path, per_kind: int = 8, extra: list[str] = ()) -> tuple[Path, Path]:
    """train.jsonl → train_main.jsonl (+ the `extra` lines) and val.jsonl (the last `per_kind`
    items of each kind)."""
    by_kind = defaultdict(list)
    for line in (data / "train.jsonl").read_text().splitlines():
        by_kind[json.loads(line)["kind"]].append(line)
    train = [x for k in sorted(by_kind) for x in by_kind[k][:-per_kind]] + list(extra)
    val = [x for k in sorted(by_kind) for x in by_kind[k][-per_kind:]]
    (data / "train_main.jsonl").write_text("\n".join(train) + "\n")
    (data / "val.jsonl").write_text("\n".join(val) + "\n")
    return data / "train_main.jsonl", data / "val.jsonl"


# the prose perplexity is measured on (bench/quant_quality.py `prose`): never in the replay text
PROSE_MODULES = {"subprocess", "threading", "logging", "collections", "argparse", "json", "pathlib", "unittest",
                 "inspect"}


def extra_items(data: Path, more: dict[str, int], seed: int = 0) -> list[str]:
    """`more[kind]` training items of a kind beyond those train.jsonl has (the next indices of the
    same seed: new pictures, the training split's own pairs / fonts / voices), as jsonl lines;
    their media go under data/media like the others'. Proven disjoint from the held-out split."""
    from bench.mmdata import generate, items

    manifest = json.loads((data / "manifest.json").read_text())
    have, size = manifest["counts"]["train"], manifest["image_size"]
    recs = [items.make(kind, "train", i, seed, data, size).record()
            for kind, n in sorted(more.items()) for i in range(have[kind], have[kind] + n)]
    heldout = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    generate.check_disjoint(recs, heldout)
    return [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in recs]


def free_shape_items(data: Path, n: int, seed: int = 0, start: int = 0) -> list[str]:
    """`n` colour-free shape pictures from index `start` (bench/mmdata/free_shapes.py: one shape in an
    unnamed random colour, "What shape is this?"), as jsonl lines, their media under data/media/train/any_shape/."""
    from bench.mmdata import free_shapes

    size = json.loads((data / "manifest.json").read_text())["image_size"]
    return [json.dumps(free_shapes.make(i, seed, data, size).record(), ensure_ascii=False, sort_keys=True)
            for i in range(start, start + n)]


def replay_paragraphs(seed: int = 0) -> list[str]:
    """English paragraphs from the docstrings of standard-library modules other than those the
    perplexity is measured on, shuffled by `seed`."""
    import random

    from bench.train_drafter import paragraphs

    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "pydoc_data", "lib2to3", "ensurepip"}
    names = sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in skip | PROSE_MODULES)
    texts = paragraphs(names)
    random.Random(seed).shuffle(texts)
    return texts


def replay_text(path: Path, n: int = 800, seed: int = 0) -> Path:
    """`n` of `replay_paragraphs`, as {"text": ...} lines: mixed into training so the adapter keeps
    the decoder's language modelling (a run without them left Gemma 3 270M's prose perplexity at
    8,597 against 16.5)."""
    texts = replay_paragraphs(seed)
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} paragraphs of replay text")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:n]))
    return path


def mixed(conversations: Path, text: Path, out: Path, seed: int = 0, repeat: int = 1) -> Path:
    """The conversations and the replay text (`repeat` times) in one shuffled file."""
    import random

    lines = conversations.read_text().splitlines() + text.read_text().splitlines() * repeat
    random.Random(seed).shuffle(lines)
    out.write_text("\n".join(lines) + "\n")
    return out


def adapter_shape(directory: Path) -> dict:
    """The rank and alpha of the adapter in `directory`, which `--init` must repeat: the shipped
    one's alpha was the recipe's 32 times the scale it shipped at (README, Seventh and Twelfth
    looks); joined from staged adapters it is r 32 at scaling 1 (bench/mini_join.py)."""
    from unigemma.lora.config import LoraConfig

    where = directory / "adapter_config.json"
    c = LoraConfig.from_peft(json.loads(where.read_text()), str(where))
    return {"lora_r": c.r, "lora_alpha": c.alpha}


def rescaled(directory: Path, alpha: float, out: Path) -> Path:
    """A copy of the run in `directory` whose adapter has lora_alpha `alpha`, every lora_B scaled by
    old alpha / `alpha`: the same function, trained on at `alpha`'s pace. (Under Adam each step moves
    A and B by ~lr whatever alpha is, so the adapter's update moves ~alpha/r per step: the shipped
    adapter, at alpha 32 x its merge scales, trains on slower than the recipe's by that factor.)"""
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    ratio = adapter_shape(directory)["lora_alpha"] / alpha
    tensors = {k: (t * ratio if ".lora_B." in k else t) for k, t in
               load_file(directory / "adapter_model.safetensors").items()}
    return copied_run(directory, out, tensors, {**config, "lora_alpha": alpha})


def padded(directory: Path, out: Path) -> Path:
    """`directory` itself when its adapter has one rank; else a copy whose adapter has one, its r,
    on every module: the trainer's --init takes one r, and bench/mini_join.py writes each module at
    its own (rank_pattern / alpha_pattern). A module below r gets zero rank columns after its own,
    its B scaled so the update is the same at the config's scaling; the zero columns stay zero in
    training (each one's gradient is the other's), as the old joins' padding did."""
    import torch
    from safetensors.torch import load_file

    from unigemma.lora.config import LoraConfig
    from unigemma.lora.peft import PREFIX

    config = json.loads((directory / "adapter_config.json").read_text())
    if not config.get("rank_pattern"):
        return directory
    c = LoraConfig.from_peft(config)
    tensors = load_file(directory / "adapter_model.safetensors")
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[:-len(".lora_A.weight")]
        a, b = tensors[key], tensors[module + ".lora_B.weight"]
        pad, ratio = c.r - a.shape[0], c.scaling_for(module.removeprefix(PREFIX), r=a.shape[0]) / c.scaling
        if pad < 0:
            raise SystemExit(f"--init {directory}: {module} is r {a.shape[0]}, over the adapter's r {c.r}")
        tensors[key] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[module + ".lora_B.weight"] = torch.cat([b * ratio, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    return copied_run(directory, out, tensors, {**config, "rank_pattern": {}, "alpha_pattern": {}})


def copied_run(directory: Path, out: Path, tensors: dict, config: dict) -> Path:
    """`out`: the adapter `tensors` and `config`, beside `directory`'s embedders and card (a shipped
    start's: its steps)."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for side in ("full_weights.safetensors", "card.json"):
        if (directory / side).is_file():
            shutil.copyfile(directory / side, out / side)
    return out


def run(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "mini")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--train-per-kind", type=int, default=1200)
    p.add_argument("--anneal", type=int, default=0,
                   help="end the run annealed: the rate decays (cosine) to 0 over its last N steps "
                        "(--schedule wsd); 0: constant to the end, so it can be extended")
    p.add_argument("--init", type=Path,
                   help="start from a finished run's weights (a checkpoint-N of an earlier run, or the shipped "
                        "unigemma/mini) with a fresh optimizer (`unigemma finetune --init`)")
    p.add_argument("--init-alpha", type=float, metavar="A",
                   help="with --init: go on at lora_alpha A, its adapter rescaled to the same function (`rescaled`; "
                        "the recipe's 32 restores its pace to a shipped adapter merged at a scale)")
    p.add_argument("--more", action="append", default=[], metavar="KIND=N",
                   help="N more training items of KIND than --train-per-kind (repeatable)")
    p.add_argument("--free-shapes", type=int, default=0, metavar="N",
                   help="N colour-free shape pictures in the training mix (bench/mmdata/free_shapes.py)")
    p.add_argument("--replay-repeat", type=int, default=1, help="each replay paragraph this many times in the mix")
    p.add_argument("--dtype", default=RECIPE["dtype"], choices=("float32", "bfloat16"),
                   help="the frozen decoder's weights and activations (the embedders and the adapter train in "
                        "float32 either way); bfloat16 where the CPU has bf16 arithmetic (AVX512-BF16 / AMX) "
                        "or on a GPU: ~1.4x the tokens a second on an AMX Xeon (README, Twelfth look)")
    p.add_argument("--curve", help="the loss curve's file name under docs/ (default: mini-training.png, "
                                   "mini-training-continued.png for an --init run)")
    args = p.parse_args(argv)
    try:
        more = {k: int(n) for k, n in (m.split("=") for m in args.more)}
    except ValueError:
        p.error(f"--more takes KIND=N, got {args.more}")
    from bench.mmdata.vocab import KINDS

    bad = [f"{k}={n}" for k, n in more.items() if k not in KINDS or n < 0]
    if bad or args.replay_repeat < 1 or args.free_shapes < 0:
        p.error(f"--more {bad}: KIND one of {','.join(KINDS)}, N >= 0" if bad else
                "--replay-repeat must be >= 1" if args.replay_repeat < 1 else "--free-shapes must be >= 0")
    if args.init is not None and not (args.init / "adapter_config.json").is_file():
        p.error(f"--init {args.init}: no adapter_config.json (a run's checkpoint-N or unigemma/mini)")
    if args.init_alpha is not None and (args.init is None or args.init_alpha <= 0):
        p.error("--init-alpha takes a positive alpha, with --init")
    data, base, out = args.work / "data", args.work / "base", args.work / "train"
    if not (data / "train.jsonl").is_file():
        run("-m", "bench.mmdata.generate", "--out", str(data), "--train-per-kind", str(args.train_per_kind))
    extra = (extra_items(data, more) if more else []) + free_shape_items(data, args.free_shapes)
    train, val = split_eval(data, extra=extra)
    for src in (train, val):
        run("-m", "bench.mmdata.conversations", str(src), str(src.with_name(src.stem + "_multi.jsonl")))
    train, val = train.with_name("train_main_multi.jsonl"), val.with_name("val_multi.jsonl")
    train = mixed(train, replay_text(data / "replay.jsonl"), data / "train_mixed.jsonl", repeat=args.replay_repeat)
    if not (base / "config.json").is_file():
        run("-m", "unigemma.weights.mini", str(base))
    if args.init is not None:
        args.init = padded(args.init, args.work / "init-padded")
    if args.init_alpha is not None:
        args.init = rescaled(args.init, args.init_alpha, args.work / "init")
    r = {**RECIPE, **(adapter_shape(args.init) if args.init else {})}
    run("-m", "unigemma", "finetune", "--model", str(base), "--data", str(train), "--eval", str(val),
        "--out", str(out), "--dtype", args.dtype, "--image-budget", str(r["image_budget"]),
        "--train-full", r["train_full"], "--full-lr", str(r["full_lr"]), "--lr", str(r["lr"]),
        "--lora-r", str(r["lora_r"]), "--lora-alpha", str(r["lora_alpha"]), "--batch-size", str(r["batch_size"]),
        "--max-steps", str(args.steps), "--warmup", str(r["warmup"]),
        *(("--schedule", "wsd", "--decay-steps", str(args.anneal)) if args.anneal else ("--schedule", r["schedule"])),
        "--eval-every", "120", "--save-every", "60",
        "--no-gradient-checkpointing", "--no-return-memory", "--resume", "--quiet",
        *(("--init", str(args.init)) if args.init else ()))
    # a run from shipped weights draws its own curve: the from-scratch one stays
    curve(out, args.steps, args.curve or ("mini-training-continued.png" if args.init else "mini-training.png"),
          args.init)
    run("-m", "unigemma.weights.mini", str(args.work / "model"), "--trained", str(out))


def curve(out: Path, steps: int, name: str = "mini-training.png", start: Path | None = None) -> Path:
    """The run's loss curve, drawn to docs/NAME (`start`: the weights an --init run began from)."""
    from bench.loss_curve import draw, read_log

    begun = f", from {start}" if start else ""
    return draw(*read_log(out / "log.jsonl"), ROOT / "docs" / name,
                f"unigemma-mini training ({steps} steps of 8 conversations{begun}): answer cross-entropy (log scale)",
                eval_label="eval loss (96 held-back training conversations)")


if __name__ == "__main__":
    main()
