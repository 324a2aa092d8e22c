"""Held-out scoring: exact-match accuracy per kind and a confusion table, from predictions.

    python -m bench.mmdata.score data/mm/heldout.jsonl predictions.jsonl

predictions.jsonl: one `{"id": ..., "prediction": "..."}` a line (ids of the data's items).
Prints each kind's confusion table, then one JSON line: per kind n, accuracy and, for the
kinds the issue sets a target for, the target and whether it is met. An item with no
prediction counts as wrong ("<missing>").

Exact match after `normalize` only: case, surrounding spaces / quotes and a final full stop
are forgiven ("Red." == "red"), nothing else ("seven" != "7").
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# issue 22's targets on the held-out split (exact-match accuracy)
TARGETS = {"colour": 0.95, "shape": 0.90, "count": 0.80, "word": 0.70, "digit": 0.90, "spoken_word": 0.75,
           "beeps": 0.80}
MISSING = "<missing>"
OTHER = "(other)"


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip().strip("\"'`").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.lower()


@dataclass
class KindScore:
    n: int = 0
    correct: int = 0
    confusion: Counter = field(default_factory=Counter)  # (gold, predicted) -> count, normalized

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def score(items: list[dict], predictions: dict[str, str]) -> dict[str, KindScore]:
    """items: records with id, kind, answer (as in the jsonl); predictions: id -> text."""
    out: dict[str, KindScore] = {}
    for it in items:
        s = out.setdefault(it["kind"], KindScore())
        gold = normalize(it["answer"])
        pred = normalize(predictions[it["id"]]) if it["id"] in predictions else MISSING
        s.n += 1
        s.correct += pred == gold
        s.confusion[gold, pred] += 1
    return out


def confusion_table(s: KindScore, max_labels: int = 12) -> str:
    """Rows: gold answers, columns: predictions; the `max_labels` most frequent gold answers get
    a row and a column each, everything else is "(other)"."""
    golds = Counter()
    for (g, _), c in s.confusion.items():
        golds[g] += c
    labels = [g for g, _ in golds.most_common(max_labels)]
    keep = set(labels)
    cols = labels + [OTHER]
    rows = labels + ([OTHER] if len(golds) > len(labels) else [])
    grid = Counter()
    for (g, p), c in s.confusion.items():
        grid[g if g in keep else OTHER, p if p in keep else OTHER] += c
    width = max(len(x) for x in cols + rows + ["gold \\ predicted"]) + 1
    cell = max(6, max(len(x) for x in cols) + 1)
    lines = ["gold \\ predicted".ljust(width) + "".join(c.rjust(cell) for c in cols)]
    lines += [r.ljust(width) + "".join(str(grid[r, c] or ".").rjust(cell) for c in cols) for r in rows]
    return "\n".join(lines)


def summary(scores: dict[str, KindScore]) -> dict:
    out = {}
    for kind, s in sorted(scores.items()):
        row = {"n": s.n, "accuracy": round(s.accuracy, 4)}
        if kind in TARGETS:
            row.update(target=TARGETS[kind], met=s.accuracy >= TARGETS[kind])
        out[kind] = row
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_predictions(path: Path) -> dict[str, str]:
    """id -> prediction of a predictions.jsonl; ValueError naming the first malformed line."""
    out = {}
    for n, r in enumerate(read_jsonl(path), 1):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("prediction"), str):
            raise ValueError(f"{path}:{n}: expected {{\"id\": str, \"prediction\": str}}")
        out[r["id"]] = r["prediction"]
    return out


def prompts(path: Path) -> dict[str, list[dict]]:
    """id -> the item's messages without the reply, media paths made absolute: what a model is
    asked when it is judged (its reply is compared with the record's `answer`)."""
    path = Path(path)
    out = {}
    for r in read_jsonl(path):
        user = r["messages"][0]
        parts = [{**p, p["type"]: str(path.parent / p[p["type"]])} if p["type"] in ("image", "audio") else p
                 for p in user["content"]]
        out[r["id"]] = [{**user, "content": parts}]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="the held-out jsonl (id, kind, answer per line)")
    p.add_argument("predictions", type=Path, help='jsonl of {"id": ..., "prediction": ...}')
    args = p.parse_args(argv)
    try:
        preds = read_predictions(args.predictions)
    except ValueError as e:
        p.error(str(e))
    scores = score(read_jsonl(args.data), preds)
    for kind, s in sorted(scores.items()):
        print(f"## {kind}: {s.correct}/{s.n} = {s.accuracy:.1%}\n{confusion_table(s)}\n")
    print(json.dumps({"heldout": summary(scores)}))


if __name__ == "__main__":
    main()
