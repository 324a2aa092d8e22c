"""The fine-tuning demo's task: written dates → ISO 8601 (YYYY-MM-DD), train and held-out splits.

    python bench/finetune_task.py OUT_DIR [--train 2000] [--heldout 100] [--seed 0]

writes OUT_DIR/train.jsonl ({"prompt", "completion"} lines) and OUT_DIR/heldout.jsonl (the same
form; no date of it appears in train.jsonl, and none of its years does either: the model must
learn the rule, not the examples). Written forms vary ("5 March 2024", "March 5, 2024",
"Mar 5 2024", "the 5th of March, 2024"), so the mapping from month names to numbers, the day's
zero padding and the year's place all have to be learned. Gemma 3 270M does not do this before
training (bench/finetune_demo.py measures it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PROMPT = "Convert to ISO 8601 (YYYY-MM-DD): {}"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def written(d: dt.date, style: int) -> str:
    m = MONTHS[d.month - 1]
    return [f"{d.day} {m} {d.year}", f"{m} {d.day}, {d.year}", f"{m[:3]} {d.day} {d.year}",
            f"the {ordinal(d.day)} of {m}, {d.year}"][style]


def example(d: dt.date, style: int) -> dict:
    return {"prompt": PROMPT.format(written(d, style)), "completion": d.isoformat()}


def make(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    years = list(range(1900, 2100))
    rng.shuffle(years)
    held_years = set(years[:20])  # years the training data never shows

    def draw(allowed) -> dt.date:
        while True:
            d = dt.date(rng.choice(years), 1, 1) + dt.timedelta(days=rng.randrange(366))
            if (d.year not in held_years) if allowed is None else (d.year in allowed):
                return d
    train = [example(draw(None), rng.randrange(4)) for _ in range(n_train)]
    heldout = [example(draw(held_years), rng.randrange(4)) for _ in range(n_heldout)]
    return train, heldout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = make(a.train, a.heldout, a.seed)
    for name, rows in (("train", train), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out}/train.jsonl: {len(train)}, {out}/heldout.jsonl: {len(heldout)}")


if __name__ == "__main__":
    main()
