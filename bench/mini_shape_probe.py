"""Is a shape in unigemma-mini's image soft tokens at all? A linear probe on the embedder's output.

    python -m bench.mini_shape_probe --model runs/mini4/model --data runs/mini5/data [--compare runs/mini4/base]
        [--train 1500] [--heldout 400] [--fit-embedder STEPS]

The trained mini names a shape at chance, even on training-distribution pictures (README, "Sixth
look"). This asks where the shape is lost: in the embedder (its 64 soft tokens do not carry it) or
in the decoder (they do, and the adapter has not learned to read it). Pictures of one shape
(bench/mmdata items whose meta has one pair) go through the checkpoint's own image embedder at
the recipe's budget (70: 64 tokens); each picture's feature is the mean and the max over its
tokens (2 x 640: any position); a softmax regression (AdamW, weight decay) learns the shape from the
training split's pictures and is scored on 300 training-split pictures it did not fit (seen
colour x shape pairs) and on held-out ones, whose pairs the training never saw, so colour cannot
stand in for shape there. `--compare` runs the same probe on another
checkpoint's embedder (the untrained one: what random projections of the patches already give).
One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.mmdata.vocab import SHAPES

BUDGET = 70
SEEN = 300  # training pictures the probe (and --fit-embedder) leave unfitted


def one_shape(path: Path, limit: int) -> list[dict]:
    """Up to `limit` items of `path` whose picture has exactly one shape and no sound."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if len(r["meta"].get("pairs", ())) == 1 and r["kind"] != "match":
            out.append(r)
            if len(out) == limit:
                break
    return out


def patches(records: list[dict], data: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each picture's (pixel patches, positions) at the recipe's budget."""
    from unigemma.processing.image import preprocess_image

    out = []
    for r in records:
        p = preprocess_image(str(data / r["messages"][0]["content"][0]["image"]), BUDGET)
        out.append((p.pixel_values[:p.num_soft_tokens].float(), p.position_ids[:p.num_soft_tokens]))
    return out


def pooled(vision, pics) -> torch.Tensor:
    """[pictures, 2 * hidden]: mean and max of each picture's soft tokens."""
    rows = []
    for px, pos in pics:
        tokens = vision(px, pos).float()
        rows.append(torch.cat([tokens.mean(0), tokens.amax(0)]))
    return torch.stack(rows)


def features(model, pics) -> torch.Tensor:
    with torch.no_grad():
        return pooled(model.model.embed_vision, pics)


def fit_embedder(vision, pics, labels: torch.Tensor, steps: int, batch: int = 32, lr: float = 1e-3) -> None:
    """Train the embedder itself (with a throw-away linear head on its pooled tokens) to name the
    shape: can its one Dense per patch carry the shape at all, given a signal of its own?"""
    torch.manual_seed(0)
    head = torch.nn.Linear(pooled(vision, pics[:1]).shape[1], len(SHAPES))
    params = [q.requires_grad_(True) for q in vision.parameters()] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(pics), (batch,), generator=g)
        x = pooled(vision, [pics[i] for i in idx])
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        loss = torch.nn.functional.cross_entropy(head(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for q in vision.parameters():
        q.requires_grad_(False)


def probe(train_x, train_y, test_x, test_y, epochs: int = 300, seed: int = 0, seen: int = SEEN) -> dict:
    """Softmax regression on standardised features, fitted on all but the last `seen` training
    pictures: accuracy on those it fitted, on the `seen` it did not (training pairs), and on the
    held-out pictures (unseen pairs)."""
    torch.manual_seed(seed)
    train_x, train_y, seen_x, seen_y = train_x[:-seen], train_y[:-seen], train_x[-seen:], train_y[-seen:]
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b, c = (train_x - mu) / sd, (test_x - mu) / sd, (seen_x - mu) / sd
    head = torch.nn.Linear(a.shape[1], len(SHAPES))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-1)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(a), train_y).backward()
        opt.step()
    with torch.no_grad():
        return {"fitted": round(float((head(a).argmax(-1) == train_y).float().mean()), 3),
                "unseen_pictures_training_pairs": round(float((head(c).argmax(-1) == seen_y).float().mean()), 3),
                "heldout": round(float((head(b).argmax(-1) == test_y).float().mean()), 3)}


def main(argv: list[str] | None = None) -> None:
    import unigemma

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a mini checkpoint (trained: weights/mini.py --trained)")
    p.add_argument("--data", type=Path, required=True, help="bench/mmdata output (train.jsonl, heldout.jsonl)")
    p.add_argument("--compare", type=Path, help="a second checkpoint whose embedder gets the same probe")
    p.add_argument("--train", type=int, default=1500, help="one-shape training pictures")
    p.add_argument("--heldout", type=int, default=400, help="one-shape held-out pictures")
    p.add_argument("--fit-embedder", type=int, default=0, metavar="STEPS",
                   help="first train --model's embedder this many steps to name the shape (pooled tokens, "
                        "a linear head), then probe it: whether the embedder can carry shape at all")
    args = p.parse_args(argv)
    if args.train <= SEEN or args.heldout < 1 or args.fit_embedder < 0:
        p.error(f"--train must exceed the {SEEN} pictures the probe leaves unfitted, --heldout be >= 1, "
                "--fit-embedder >= 0")
    missing = [str(args.data / f) for f in ("train.jsonl", "heldout.jsonl") if not (args.data / f).is_file()]
    if missing:
        p.error(f"no {', '.join(missing)}: --data is bench.mmdata.generate's output directory")
    t0 = time.time()
    train, held = one_shape(args.data / "train.jsonl", args.train), one_shape(args.data / "heldout.jsonl", args.heldout)
    if len(train) <= SEEN or not held:
        p.error(f"{args.data} has {len(train)} one-shape training and {len(held)} held-out pictures; "
                f"the probe needs more than {SEEN} and at least 1")
    ty = torch.tensor([SHAPES.index(r["meta"]["pairs"][0][1]) for r in train])
    hy = torch.tensor([SHAPES.index(r["meta"]["pairs"][0][1]) for r in held])
    result = {"bench": "mini_shape_probe", **machine(torch.get_num_threads()), "train_pictures": len(train),
              "heldout_pictures": len(held), "chance": round(1 / len(SHAPES), 3)}
    tp, hp = patches(train, args.data), patches(held, args.data)
    for name, path in (("model", args.model), ("compare", args.compare)):
        if path is None:
            continue
        model = unigemma.load(path, dtype="float32", fast=False).model
        if name == "model" and args.fit_embedder:  # fitted on the pictures the probe fits on only
            fit_embedder(model.model.embed_vision, tp[:-SEEN], ty[:-SEEN], args.fit_embedder)
            result["fit_embedder_steps"] = args.fit_embedder
        result[name] = {"path": str(path), **probe(features(model, tp), ty, features(model, hp), hy)}
    result["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
