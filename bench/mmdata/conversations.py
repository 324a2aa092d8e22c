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

No question is asked whose answer the conversation has already said (`said`): "What shape is
the red one?" → "triangle" gives away the answer to a later "What colour is the triangle?", and
"Name the shape that is gray." the colour of a one-shape picture. The first version asked them
anyway, and its 840 steps learned to copy: the trained model named the same colour ("pink") for
every held-out picture and the same shape ("cross"), the picture never looked at.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from .vocab import HIGH_HZ

CATEGORY = {"colour": "colour", "shape": "shape", "count": "count", "beeps": "beeps", "pitch": "pitch",
            "any_shape": "shape"}


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
    if kind == "any_shape":  # free_shapes.py: one shape in an unnamed colour
        out.append(("shape", "What shape is this?", meta["shape"]))
    if kind in ("beeps", "pitch"):
        out.append(("beeps", "How many beeps are there?", str(meta["count"])))
        out.append(("pitch", "Is the tone high or low?", "high" if meta["hz"] >= HIGH_HZ[0] else "low"))
    return out


def conversation(record: dict, rng: random.Random, max_extra: int) -> dict:
    """The record with its messages extended by extra question / answer turns."""
    own = CATEGORY.get(record["kind"])
    extra = [(q, a) for cat, q, a in questions(record) if cat != own]
    rng.shuffle(extra)
    heard = said(record["messages"])
    turns = []
    for q, a in extra:
        if len(turns) == 2 * max_extra:
            break
        if a.lower() in heard:  # the answer is already in the conversation: it would teach copying
            continue
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        heard |= said(turns[-2:])
    return {**record, "messages": record["messages"] + turns}


def said(messages: list[dict]) -> set[str]:
    """The lower-cased words of the messages' text."""
    text = " ".join(m["content"] if isinstance(m["content"], str) else
                    " ".join(p.get("text", "") for p in m["content"]) for m in messages)
    return set(re.findall(r"[a-z0-9]+", text.lower()))


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
