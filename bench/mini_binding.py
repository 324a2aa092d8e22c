"""Does unigemma-mini tie a colour to its shape? Colour and shape answers split by how many shapes
the picture holds.

    python -m bench.mmdata.predict --model CK --data runs/mini7/data/heldout.jsonl --out preds.jsonl \
        --kinds colour,shape
    python -m bench.mini_binding --data runs/mini7/data/heldout.jsonl --predictions preds.jsonl

A held-out colour question names a shape ("Which colour is the diamond?") or, on a one-shape
picture, none ("What colour is the shape?"); a shape question names a colour. With one shape
the answer needs only the colour (or shape) read; with two or three it needs the named one
picked out, which a model that knows a shape only by the colours it was trained in cannot do on
the held-out split's colour x shape pairs (none of them trained). Per kind and shape count: the
accuracy, what picking one of the picture's own colours (shapes) at random would score, and the
share of the wrong answers that name another shape's colour (another colour's shape) in the
same picture: read, but not bound. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from bench.mmdata.score import normalize, read_jsonl, read_predictions

# kind -> (index of the answer in a [colour, shape] pair, index of the attribute the question names)
ASKED = {"colour": (0, 1), "shape": (1, 0)}


def question(item: dict) -> str:
    """The text of an item's (first) user turn."""
    content = item["messages"][0]["content"]
    return " ".join(part["text"] for part in content if part.get("type") == "text")


def binding(items: list[dict], predictions: dict[str, str]) -> dict:
    """{kind: {shapes in picture: {n, accuracy, random_in_picture, wrong, wrong_in_picture}}} for
    the colour and shape items of `items` that `predictions` (id -> reply) answers."""
    cells: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for item in items:
        if item["kind"] not in ASKED or item["id"] not in predictions:
            continue
        said, named = ASKED[item["kind"]]
        pairs = item["meta"]["pairs"]
        words = set(re.findall(r"[a-z]+", question(item).lower()))
        asked = [p for p in pairs if p[named] in words] if len(pairs) > 1 else pairs
        if len(asked) != 1 or asked[0][said] != item["answer"]:
            raise ValueError(f"{item['id']}: the question names {len(asked)} of the picture's shapes; "
                             f"cannot tell which one {item['answer']!r} answers")
        # a colour two shapes share answers for both: not counted as another shape's
        gold = normalize(item["answer"])
        others = {normalize(p[said]) for p in pairs if p is not asked[0]} - {gold}
        guess = normalize(predictions[item["id"]])
        cell = cells[item["kind"]][len(pairs)]
        cell["n"] += 1
        cell["chance"] += 1 / len({p[said] for p in pairs})
        cell["right"] += guess == gold
        cell["wrong"] += guess != gold
        cell["wrong_in_picture"] += guess in others
    return {kind: {str(k): {"n": c["n"], "accuracy": round(c["right"] / c["n"], 3),
                            "random_in_picture": round(c["chance"] / c["n"], 3),
                            "wrong": c["wrong"], "wrong_in_picture": c["wrong_in_picture"]}
                   for k, c in sorted(by_count.items())}
            for kind, by_count in sorted(cells.items())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="heldout.jsonl of bench.mmdata.generate")
    p.add_argument("--predictions", type=Path, required=True, help="predictions.jsonl of bench.mmdata.predict")
    args = p.parse_args(argv)
    try:
        predictions = read_predictions(args.predictions)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps({"bench": "mini_binding", "data": str(args.data), "predictions": str(args.predictions),
                      **binding(read_jsonl(args.data), predictions)}))


if __name__ == "__main__":
    main()
