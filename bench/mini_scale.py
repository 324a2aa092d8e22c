"""How much of unigemma-mini's adapter to merge: validation answers and prose against the adapter's scale.

    python -m bench.mini_scale --trained unigemma/mini --data runs/mini6/data [--scales 0.6,0.7,0.8,1.0]

Merging W + s · (alpha / r) B A with s < 1 puts the decoder between Gemma 3 270M (s = 0) and the
fine-tuned one (s = 1): weight-space interpolation, as WiSE-FT does between a pretrained and a
fine-tuned model to keep what pretraining knew. The embedders stay as trained (they have no
pretrained counterpart). Each scale is built exactly as it would ship (`scaled_adapter`: the
adapter's `lora_alpha` times s, merged by weights/mini.py `trained_checkpoint`) and judged on
validation data only, never on what the held-out figures are measured on:

- media: `--per-kind` new items of each kind of the *training* split (indices from 9000, beyond
  any run's training items; seen colour x shape pairs, fonts and voices), greedy, exact match;
- prose: the Python language reference as `pydoc_data` ships it, documentation prose like the
  perplexity test's docstrings, but neither those nor the replay text (which skips pydoc_data).
  Docstring paragraphs of other modules would not do: the replay text trained on such paragraphs,
  and at s = 0.6 their perplexity *fell* 17% while the test prose's rose.

The chosen scale is the largest whose validation prose perplexity rises at most `--max-rise`
over Gemma 3 270M's. One JSON line per scale, then one with the choice. Scales are of the
adapter as `--trained` holds it: the shipped unigemma/mini's is already merged at 0.65 (its card's
`adapter_scale`), so `--trained unigemma/mini --scales 1.0` measures what ships.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import machine  # noqa: E402

KINDS = ("colour", "shape", "count", "word", "digit", "spoken_word", "beeps")
VAL_START = 9000


def scaled_adapter(trained: Path, scale: float, out: Path) -> Path:
    """`out`: the run's embedders and adapter weights (linked), its adapter config with lora_alpha x `scale`."""
    from bench.mini_ship import scaled_config
    from unigemma.mini import WEIGHT_FILES

    out.mkdir(parents=True, exist_ok=True)
    for name in WEIGHT_FILES:
        if name != "adapter_config.json":
            (out / name).symlink_to((trained / name).resolve())
    (out / "adapter_config.json").write_text(json.dumps(scaled_config(trained, scale), indent=2) + "\n")
    return out


def validation_items(data: Path, per_kind: int, kinds=KINDS) -> Path:
    """data/validation.jsonl: `per_kind` new training-split items of each kind (made here)."""
    from bench.mmdata import items

    size = json.loads((data / "manifest.json").read_text())["image_size"]
    path = data / "validation.jsonl"
    recs = [items.make(k, "train", VAL_START + i, 0, data, size).record() for k in kinds for i in range(per_kind)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs))
    return path


def validation_prose(n_tokens: int, tokenizer) -> list[int]:
    """The Python language reference's text as pydoc ships it (`pydoc_data.topics`, in topic
    order): documentation prose like the perplexity test's docstrings, but neither in it nor in
    the replay text (mini_train.py skips pydoc_data)."""
    from pydoc_data.topics import topics

    ids = tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))
    if len(ids) < n_tokens + 1:
        raise SystemExit(f"only {len(ids)} tokens of validation prose")
    return ids[: n_tokens + 1]


def main(argv: list[str] | None = None) -> None:
    import unigemma
    from bench.mini_quality import perplexity
    from bench.mmdata.predict import predict
    from bench.mmdata.score import read_jsonl, score, summary
    from unigemma.weights.mini import default_base, trained_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", type=Path, required=True,
                   help="a run's checkpoint-N, or unigemma/mini (embedders + adapter)")
    p.add_argument("--data", type=Path, required=True, help="bench/mmdata output (its manifest.json: the image size)")
    p.add_argument("--scales", default="0.6,0.7,0.8,1.0")
    p.add_argument("--per-kind", type=int, default=25)
    p.add_argument("--prose-tokens", type=int, default=4096)
    p.add_argument("--max-rise", type=float, default=0.08,
                   help="the chosen scale's most validation prose rise (below the issue's 10%%, a margin for "
                        "the held-out prose)")
    args = p.parse_args(argv)
    try:
        scales = sorted({float(s) for s in args.scales.split(",")})
    except ValueError:
        p.error(f"--scales takes numbers, got {args.scales!r}")
    if not scales or scales[0] <= 0 or args.per_kind < 1:
        p.error("--scales must be > 0 and --per-kind >= 1")
    if not (args.trained / "adapter_config.json").is_file() or not (args.data / "manifest.json").is_file():
        p.error(f"{args.trained} needs adapter_config.json and {args.data} manifest.json")

    t0 = time.perf_counter()
    val = validation_items(args.data, args.per_kind)
    records = read_jsonl(val)
    base = unigemma.load(default_base(), dtype="float32", dequantize=True)
    ids = validation_prose(args.prose_tokens, base.tokenizer)
    ppl_base = perplexity(base.model, ids)
    del base
    rows = []
    with tempfile.TemporaryDirectory(prefix="mini-scale-") as tmp:
        for s in scales:
            work = Path(tmp) / f"s{s}"
            model_dir = trained_checkpoint(scaled_adapter(args.trained, s, work / "in"), work / "model")
            gemma = unigemma.load(model_dir, dtype="float32")
            ppl = perplexity(gemma.model, ids)
            media = summary(score(records, predict(gemma, records, val)))
            row = {"scale": s, "prose_rise": round(ppl / ppl_base - 1, 4), "perplexity": round(ppl, 3),
                   "validation": {k: v["accuracy"] for k, v in media.items()},
                   "mean_accuracy": round(sum(v["accuracy"] for v in media.values()) / len(media), 4)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del gemma
            shutil.rmtree(work)
    ok = [r for r in rows if r["prose_rise"] <= args.max_rise]
    chosen = max(ok, key=lambda r: r["scale"]) if ok else None
    print(json.dumps({"bench": "mini_scale", **machine(torch.get_num_threads()), "trained": str(args.trained),
                      "items_per_kind": args.per_kind, "prose_tokens": len(ids) - 1,
                      "perplexity_gemma3_270m": round(ppl_base, 3), "max_rise": args.max_rise,
                      "chosen": chosen and chosen["scale"], "rows": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
