"""Training items → conversations that ask several questions about the same picture or sound.

    python -m bench.mmdata.conversations data/mm/train.jsonl data/mm/train_multi.jsonl [--max-extra 4]

A model that learns its embedders from scratch gets one answer token per item, and one item costs
a whole forward over its 64 image tokens. Every picture of shapes also answers "how many", the
colour of each shape and the shape of each colour; every tone clip "how many beeps" and "high or
low" (all read from the item's `meta`, never guessed). Each conversation keeps the item's own
question and answer as its first turn, then up to `--max-extra` of those questions (seeded order,
none of the first question's own kind), each a user turn with its assistant answer: 3-5 trained
answers per forward instead of one. Held-out items are never converted: they are asked one
question, as the first turn here is.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .vocab import HIGH_HZ

CATEGORY = {"colour": "colour", "shape": "shape", "count": "count", "beeps": "beeps", "pitch": "pitch"}


def questions(record: dict) -> list[tuple[str, str, str]]:
    """(category, question, answer) the item's meta answers for sure."""
    kind, meta = record["kind"], record["meta"]
    out = []
    if "pairs" in meta and kind != "word":
        pairs = [tuple(p) for p in meta["pairs"]]
        colours, shapes = [c for c, _ in pairs], [s for _, s in pairs]
        if kind != "match":
            out.append(("count", "How many shapes are there?", str(len(pairs))))
        if len(set(shapes)) == len(shapes):
            out += [("colour", f"What colour is the {s if len(pairs) > 1 else 'shape'}?", c) for c, s in pairs]
        if len(set(colours)) == len(colours):
            out += [("shape", f"What shape is the {c} one?", s) for c, s in pairs]
    if kind in ("beeps", "pitch"):
        out.append(("beeps", "How many beeps are there?", str(meta["count"])))
        out.append(("pitch", "Is the tone high or low?", "high" if meta["hz"] >= HIGH_HZ[0] else "low"))
    return out


def conversation(record: dict, rng: random.Random, max_extra: int) -> dict:
    """The record with its messages extended by extra question / answer turns."""
    own = CATEGORY.get(record["kind"])
    extra = [(q, a) for cat, q, a in questions(record) if cat != own]
    rng.shuffle(extra)
    turns = []
    for q, a in extra[:max_extra]:
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {**record, "messages": record["messages"] + turns}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--max-extra", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    lines = [json.loads(x) for x in args.src.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = [conversation(r, rng, args.max_extra) for r in lines]
    args.dst.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in out),
                        encoding="utf-8")
    answers = sum((len(r["messages"]) // 2) for r in out)
    print(json.dumps({"conversations": len(out), "answers": answers}))


if __name__ == "__main__":
    main()
