"""A model's answers to a held-out set, scored: predictions.jsonl and one JSON line of accuracies.

    python -m bench.mmdata.predict --model runs/mini/model --data data/mm/heldout.jsonl --out preds.jsonl
        [--per-kind 200] [--kinds colour,digit] [--dtype float32] [--quant int8] [--batch 16]

Each item's user turn (media + question) goes through the model's own processor and chat
template; the reply is decoded greedily (at most --max-new-tokens) with the engine's batched
decoding (each reply the one the item gets alone), then scored by score.py: exact match after
its normalisation, a confusion table per kind on stderr. The last line on stdout is JSON:
{"heldout": {kind: {n, accuracy, target?, met?}}, "model", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from .score import confusion_table, prompts, read_jsonl, score, summary


def predict(gemma, records: list[dict], data: Path, image_budget: int = 70, batch: int = 16,
            max_new_tokens: int = 24, progress: bool = False) -> dict[str, str]:
    """id -> the model's reply for each record (greedy), in batches of one kind."""
    from unigemma.generate.params import SamplingParams

    asked = prompts(data)
    processor = gemma.processor(image_budget)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    out, done = {}, 0
    for kind, recs in by_kind.items():
        for i in range(0, len(recs), batch):
            chunk = recs[i:i + batch]
            inputs = processor([asked[r["id"]] for r in chunk])
            for r, c in zip(chunk, gemma.engine.generate_batch(inputs, [params] * len(chunk))):
                out[r["id"]] = c.content.strip()
            done += len(chunk)
            if progress:
                print(f"\r{done}/{len(records)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return out


def select(records: list[dict], per_kind: int | None, kinds: list[str] | None, start: int = 0) -> list[dict]:
    """Records `start`..`per_kind`-1 of each kind (file order; all from `start` when per_kind is
    None), of `kinds` only when given."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        if kinds and r["kind"] not in kinds:
            continue
        seen[r["kind"]] += 1
        if seen[r["kind"]] > start and (per_kind is None or seen[r["kind"]] <= per_kind):
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> None:
    import unigemma

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a checkpoint directory (a trained mini: python -m unigemma.weights.mini OUT --trained RUN)")
    p.add_argument("--data", type=Path, required=True, help="heldout.jsonl of bench.mmdata.generate")
    p.add_argument("--out", type=Path, help="write predictions.jsonl here")
    p.add_argument("--per-kind", type=int, help="the first N items of each kind (default: all)")
    p.add_argument("--start", type=int, default=0, help="skip each kind's first N items (a run split in parts)")
    p.add_argument("--kinds", help="comma-separated kinds (default: all)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quant", help="int8 / int4-g32 ... weights quantized as they load")
    p.add_argument("--lora", help="an adapter directory to apply (unmerged)")
    p.add_argument("--full", help="a directory with full_weights.safetensors (finetune --train-full)")
    p.add_argument("--image-budget", type=int, default=70)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    records = select(read_jsonl(args.data), args.per_kind, args.kinds.split(",") if args.kinds else None, args.start)
    t0 = time.perf_counter()
    gemma = unigemma.load(args.model, dtype=args.dtype, quant=args.quant, lora=args.lora)
    if args.full:
        from unigemma.finetune.full import load_full_weights

        load_full_weights(gemma.model, args.full)
    loaded = time.perf_counter()
    preds = predict(gemma, records, args.data, args.image_budget, args.batch, args.max_new_tokens, progress=True)
    if args.out:
        args.out.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    scores = score(records, preds)
    for kind, s in sorted(scores.items()):
        print(f"## {kind}: {s.correct}/{s.n} = {s.accuracy:.1%}\n{confusion_table(s)}\n", file=sys.stderr)
    print(json.dumps({"heldout": summary(scores), "model": args.model, "dtype": args.dtype, "quant": args.quant,
                      "items": len(records), "load_s": round(loaded - t0, 1),
                      "seconds": round(time.perf_counter() - loaded, 1)}))


if __name__ == "__main__":
    main()
