"""Where in unigemma-mini is a picture's shape, or a spoken word? A linear probe at every decoder layer.

    python -m bench.mini_linear_probe --model CHECKPOINT [--fit 600] [--test 200]
    python -m bench.mini_linear_probe --model CHECKPOINT --spoken TRAIN.jsonl HELDOUT.jsonl --fit 2000

One-shape pictures (bench/mini_reader_probe.py's drawing: `--fit` half in unnamed random fills,
half in named training pairs; `--test` in held-out colour x shape pairs) are asked "What shape
is this?" in the chat format, with the answer, as the recipe trains; the decoder runs once per
picture, masked as in training, and after every layer three features are kept:
- `image`: the mean and max of the image block's hidden states (what the reader probe reads);
- `question`: the mean over the text after the image, up to the position that predicts the answer;
- `answer`: the hidden state of that position, the one the head turns into the answer.
For each layer and feature, an L2-regularised logistic regression (standardised features, LBFGS)
is fitted on the fit pictures and scored on the held-out ones; chance is one in ten. A shape that
is readable in `image` but not in `answer` is seen and not routed to the answer. One JSON line
per layer after one with the machine and settings.

`--spoken FIT TEST` asks the same of hearing: the `spoken_word` items of two bench/mmdata jsonl
files (the first `--fit` of FIT, e.g. fresh training-voice clips the model never trained on, and
the first `--test` of TEST, the held-out voices), each asked its own question with its answer;
`image` is then the audio block's mean and max, and chance is one in the 102 words. A word that a
probe names far more often in the block than the model does at `answer` is heard and not carried
to the answer, a stage for the later layers' work; one named no better in the block is not heard.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.mini_reader_probe import BUDGET, draw, layer_outputs
from bench.mmdata.vocab import SHAPES, WORDS

FEATURES = ("image", "question", "answer")


@torch.no_grad()
def layer_features(model, inputs, at: int, media: str = "image") -> dict:
    """{feature: [layers, dim]} of one prompt (batch of 1) whose answer is predicted at `at`; the
    `image` feature reads the block of `media` ("image" or "audio")."""
    from unigemma.inputs import AUDIO, IMAGE

    image = inputs.mm_token_type_ids[0] == {"image": IMAGE, "audio": AUDIO}[media]
    after = int(image.nonzero()[-1]) + 1
    h = model.embed(inputs.input_ids, **inputs.media())
    rows = {f: [] for f in FEATURES}
    for h in layer_outputs(model, h, inputs.mm_token_type_ids):
        block = h[0, image]
        rows["image"].append(torch.cat([block.mean(0), block.amax(0)]))
        rows["question"].append(h[0, after:at + 1].mean(0))
        rows["answer"].append(h[0, at].clone())
    return {f: torch.stack(v) for f, v in rows.items()}


def pictures_features(gemma, split: str, n: int, seed: int, tmp: Path) -> tuple[dict, torch.Tensor]:
    """({feature: [n, layers, dim]}, shapes [n]) for `n` fresh pictures of `split`, each asked
    "What shape is this?" with its answer, encoded and collated as the trainer does."""
    processor = gemma.processor(image_budget=BUDGET)
    rng, out, ys = random.Random(f"{seed}/{split}"), {f: [] for f in FEATURES}, []
    for i in range(n):
        img, y, _ = draw(rng, split)
        img.save(tmp / f"{split}{i}.png")
        record = {"messages": [{"role": "user", "content": [{"type": "image", "image": f"{split}{i}.png"},
                                                            {"type": "text", "text": "What shape is this?"}]},
                               {"role": "assistant", "content": SHAPES[y]}]}
        for f, v in record_features(gemma.model, processor, record, tmp, "image").items():
            out[f].append(v)
        ys.append(y)
    return {f: torch.stack(v) for f, v in out.items()}, torch.tensor(ys)


def record_features(model, processor, record: dict, root: Path, media: str) -> dict:
    """`layer_features` of one trainer-format conversation (media paths relative to `root`),
    encoded and collated as the trainer does, at the position that predicts its answer."""
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.labels import IGNORE

    b = collate([encode_line(processor, record, root, "linear probe")], 0)
    at = int((b.labels[0] != IGNORE).nonzero()[0]) - 1  # the position that predicts the answer
    return layer_features(model, b.inputs, at, media)


def spoken_features(gemma, path: Path, n: int) -> tuple[dict, torch.Tensor]:
    """({feature: [n, layers, dim]}, word indices [n]) for the first `n` spoken_word items of the
    bench/mmdata jsonl `path`, each its own question and answer, encoded as the trainer does."""
    processor, out, ys = gemma.processor(), {f: [] for f in FEATURES}, []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["kind"] != "spoken_word":
            continue
        for f, v in record_features(gemma.model, processor, {"messages": r["messages"][:2]}, path.parent,
                                    "audio").items():
            out[f].append(v)
        ys.append(WORDS.index(r["answer"]))
        if len(ys) == n:
            break
    if len(ys) < n:
        raise SystemExit(f"{path}: {len(ys)} spoken_word items, {n} asked for")
    return {f: torch.stack(v) for f, v in out.items()}, torch.tensor(ys)


def fit_and_score(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                  l2: float = 1e-2, classes: int = len(SHAPES)) -> tuple[float, float]:
    """(held-out accuracy, fit accuracy) of a logistic regression over `classes` fitted on (x, y)."""
    mu, sd = x.mean(0), x.std(0) + 1e-4  # standardised: a few residual dimensions are huge
    x, x_test = (x - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (round(float(((x_test @ w + b).argmax(-1) == y_test).float().mean()), 3),
                round(float(((x @ w + b).argmax(-1) == y).float().mean()), 3))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a mini checkpoint directory")
    p.add_argument("--fit", type=int, default=600, help="pictures the probes are fitted on (half free fills)")
    p.add_argument("--test", type=int, default=200, help="held-out colour x shape pictures they are scored on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spoken", nargs=2, type=Path, default=None, metavar=("FIT", "TEST"),
                   help="spoken words instead: the spoken_word items of two bench/mmdata jsonl files")
    args = p.parse_args(argv)
    if args.fit < 2 or args.test < 1:
        p.error(f"--fit must be >= 2 and --test >= 1, got {args.fit} and {args.test}")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (a mini checkpoint directory)")
    for path in args.spoken or ():
        if not path.is_file():
            p.error(f"--spoken {path}: not a file")

    import unigemma

    t0 = time.time()
    gemma = unigemma.load(args.model, dtype="float32", fast=False, exact=True)
    classes = len(WORDS) if args.spoken else len(SHAPES)
    if args.spoken:
        x, y = spoken_features(gemma, args.spoken[0], args.fit)
        x_test, y_test = spoken_features(gemma, args.spoken[1], args.test)
    else:
        x, y, x_test, y_test = pictures(gemma, args.fit, args.test, args.seed)
    print(json.dumps({"bench": "mini_linear_probe", **machine(torch.get_num_threads()), "model": str(args.model),
                      "task": "spoken_word" if args.spoken else "shape",
                      "fit": args.fit, "test": args.test, "chance": round(1 / classes, 3),
                      "feature_seconds": round(time.time() - t0)}), flush=True)
    for layer in range(x["image"].shape[1]):
        row = {"layer": layer}
        for f in FEATURES:
            row[f"{f}_heldout"], row[f"{f}_fit"] = fit_and_score(x[f][:, layer], y, x_test[f][:, layer], y_test,
                                                                 classes=classes)
        print(json.dumps(row), flush=True)


def pictures(gemma, fit: int, test: int, seed: int) -> tuple:
    """(x, y, x_test, y_test): `fit` pictures, half free fills, and `test` held-out pairs'."""
    with tempfile.TemporaryDirectory() as tmp:
        parts = [pictures_features(gemma, split, n, seed, Path(tmp))
                 for split, n in (("free", fit // 2), ("train", fit - fit // 2))]
        x = {f: torch.cat([part[0][f] for part in parts]) for f in FEATURES}
        y = torch.cat([part[1] for part in parts])
        x_test, y_test = pictures_features(gemma, "heldout", test, seed, Path(tmp))
    return x, y, x_test, y_test


if __name__ == "__main__":
    main()
