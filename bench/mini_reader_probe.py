"""Can the 270M decoder's first layers learn to read a shape, across colours? A cheap trial of that alone.

    python -m bench.mini_reader_probe --model CHECKPOINT --layers 5 [--steps 400] [--batch-size 16]
        [--free 0.5] [--full-lr 1e-3] [--lr 1e-3] [--eval-n 200] [--eval-every 50] [--save DIR]

The shipped mini names shapes at chance (README, "Sixth look"), and a linear reading of the
embedder's tokens does not carry to unseen colour x shape pairs ("Seventh look"): reading shape
across colours needs the decoder's non-linear layers. The full recipe asks that through all 18
layers, the 262,144-row head and the chat format, ~5 s a step on this CPU; this asks it of the
image block alone. One picture of one shape (bench/mmdata's drawing, 144 px, the recipe's
budget 70: 64 soft tokens) goes through the checkpoint's image embedder and the decoder's first
`--layers` layers (the image block bidirectional on sliding layers, as in the model), and a
throw-away head (BatchNorm, Linear) on the mean and max of the block's hidden states names the
shape. Trained: the image embedder in full and LoRA (r 16) on those layers, as the recipe trains
them; each step draws fresh pictures (no picture is seen twice): a `--free` share with an unnamed
random fill (bench/mmdata/free_shapes.py's rule: never near a colour whose pair with that shape
is held out), the rest in a named colour of a training pair. Scored every `--eval-every` steps
on fixed pictures it never trained on: held-out colour x shape pairs (colour cannot stand in for
shape there), training pairs, and free fills; and the whole model's prose perplexity
(bench/mini_quality.py's), since the adapter also reaches text. One JSON line per evaluation.

`--keep-text EPS` holds the adapter off the text's input subspace (bench/mini_keep_text.py: all
but EPS of its energy), so the prose is kept by construction; without it the reader's adapter
took the prose perplexity from 11.2 to 2,217 (README, "Ninth look").

`--save DIR` writes the embedder and the adapter (PEFT layout, only these layers' modules
non-zero) at the end, and DIR/checkpoint: `--model`'s checkpoint with both folded in
(`start_checkpoint`), a start for `bench/mini_probe.py` or the full recipe.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from bench.machine import machine
from bench.mmdata import pictures
from bench.mmdata.free_shapes import near_heldout
from bench.mmdata.vocab import HELDOUT_PAIR_LIST, SHAPES, TRAIN_PAIRS

SIZE, BUDGET = 144, 70  # the recipe's picture size and image budget


def draw(rng: random.Random, split: str) -> tuple:
    """(PIL picture of one shape, shape index, fill: a colour name or an RGB); split: train (named
    colour, training pair), free (unnamed fill) or heldout (a held-out pair)."""
    if split == "free":
        shape = rng.choice(SHAPES)
        fill = tuple(rng.randint(0, 255) for _ in range(3))
        while near_heldout(shape, fill):
            fill = tuple(rng.randint(0, 255) for _ in range(3))
    else:
        fill, shape = rng.choice(HELDOUT_PAIR_LIST if split == "heldout" else TRAIN_PAIRS)
    (cx, cy, r), = pictures.layout(rng, 1, SIZE, (0.18, 0.3))
    return pictures.shapes_picture(rng, [(fill, shape, cx, cy, r)], SIZE), SHAPES.index(shape), fill


def batch(rng: random.Random, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels [B, 64, 6912], positions [B, 64, 2], shapes [B]) of fresh pictures."""
    return encode([draw(rng, kind)[:2] for kind in kinds])


def encode(labelled: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels [B, 64, 6912], positions [B, 64, 2], labels [B]) of (SIZE-px picture, label) pairs,
    patched as the processor patches them at the recipe's budget."""
    from unigemma.processing.image import preprocess_image

    px, pos = [], []
    for img, _ in labelled:
        p = preprocess_image(img, BUDGET)
        px.append(p.pixel_values[:p.num_soft_tokens].float())
        pos.append(p.position_ids[:p.num_soft_tokens])
    return torch.stack(px), torch.stack(pos), torch.tensor([y for _, y in labelled])


class Reader(nn.Module):
    """The image embedder and the decoder's first `layers` layers on one image block, then a head
    naming one of `classes` (the shapes by default; bench/mini_word_probe.py's words)."""

    def __init__(self, model, layers: int, scratch: int = 0, classes: int = len(SHAPES)):
        super().__init__()
        from unigemma.inputs import IMAGE

        self.model, self.layers, self.image = model, layers, IMAGE
        width = model.config.text.hidden_size
        self.scratch = None
        if scratch:  # a small fresh transformer in place of the decoder's layers: a yardstick
            layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
            self.scratch = nn.TransformerEncoder(layer, scratch, enable_nested_tensor=False)
        # standardised per feature over the batch (BatchNorm), not per picture: the residual stream's
        # few huge dimensions would swamp a LayerNorm's scale and hide every other feature
        self.head = nn.Sequential(nn.BatchNorm1d(2 * width, affine=False), nn.Linear(2 * width, classes))

    def forward(self, px: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.model.model.embed_vision(px, pos)  # [B, 64, width], as model.embed scatters them
        h = self.scratch(h) if self.scratch is not None else self.decoder_layers(h)
        return self.head(torch.cat([h.mean(1), h.amax(1)], -1))

    def decoder_layers(self, h: torch.Tensor) -> torch.Tensor:
        """The first `layers` decoder layers over a batch of lone image blocks."""
        for h in layer_outputs(self.model, h, torch.full(h.shape[:2], self.image), self.layers):
            pass
        return h


def layer_outputs(model, h: torch.Tensor, types: torch.Tensor, layers: int | None = None):
    """Yield the hidden states [B, S, width] after each of the decoder's first `layers` layers
    (all by default), from embedded `h` whose tokens have mm_token_type_ids `types` [B, S],
    masked as the model's forward masks them (images bidirectional on sliding layers)."""
    from unigemma.config import FULL, SLIDING

    (B, S), idx = h.shape[:2], torch.arange(h.shape[1], device=h.device)
    masks = model.masks(idx, {SLIDING: idx, FULL: idx}, {SLIDING: None, FULL: None}, types.to(h.device),
                        model.block_mask)
    tables = {t: rope.cos_sin(idx.expand(B, S), h.dtype) for t, rope in model.text.ropes.items()}
    for layer in model.text.layers[:layers]:
        cos, sin = tables[layer.layer_type]
        h = layer(h, cos, sin, masks[layer.layer_type])
        yield h


def start_checkpoint(model_dir: Path, saved: Path, out: Path) -> Path:
    """`--model`'s checkpoint with a `--save`d embedder and adapter folded in (the adapter merged),
    written as a mini checkpoint under `out`: a start for bench/mini_probe.py or the recipe."""
    from unigemma import load_model
    from unigemma.finetune.full import load_full_weights
    from unigemma.lora import load_adapter
    from unigemma.lora.inject import merge
    from unigemma.weights.save import copy_side_files, save_checkpoint

    model = load_model(model_dir, dtype="float32", pack=False)
    load_full_weights(model, saved)
    load_adapter(model, saved)
    merge(model)
    save_checkpoint(model, json.loads((Path(model_dir) / "config.json").read_text()), out)
    copy_side_files(model_dir, out)  # the tokenizer files
    return Path(out)


def save_stage(model, lora, out: Path, dtype: torch.dtype | None = None) -> None:
    """A stage's adapter (PEFT format) and both embedders under `out` (cast to `dtype` if given)."""
    from unigemma.finetune.full import save_full_weights
    from unigemma.lora.peft import save_adapter

    save_adapter(model, out, lora, dtype=dtype)
    save_full_weights({n: model.get_submodule(n) for n in ("model.embed_vision", "model.embed_audio")}, out, dtype)


def save_run(model, lora, model_dir: Path, out: Path) -> Path:
    """Write a run's adapter and embedders to `out`, and `out`/checkpoint: `model_dir`'s
    checkpoint with both folded in (`start_checkpoint`)."""
    save_stage(model, lora, out)
    return start_checkpoint(model_dir, out, out / "checkpoint")


def add_decay_argument(p: argparse.ArgumentParser) -> None:
    """`--decay` (`linear_decay`), for every probe that trains."""
    p.add_argument("--decay", action="store_true",
                   help="every learning rate falls linearly to 0 by the last step (default: constant)")


def probe_arguments(doc: str, lr: float) -> argparse.ArgumentParser:
    """The options this probe and bench/mini_audio_probe.py share (`lr`: the adapter's and head's default)."""
    from bench.mini_keep_text import add_anchor_arguments, add_argument as add_keep_text

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a mini checkpoint (shipped, or weights/mini.py's)")
    p.add_argument("--layers", type=int, default=5, help="decoder layers the block goes through (0: none)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--full-lr", type=float, default=1e-3, help="the embedder's")
    p.add_argument("--lr", type=float, default=lr, help="the adapter's and the head's")
    p.add_argument("--lora-r", type=int, default=16)
    add_decay_argument(p)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save", type=Path, help="write the embedders and adapter here at the end, and under "
                   "DIR/checkpoint a mini checkpoint with them folded into --model's")
    add_keep_text(p)
    add_anchor_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    return p


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`probe_arguments`' checks, before any model loads: counts below 1, negative layers,
    `--model` without a checkpoint or with fewer decoder layers than `--layers`."""
    if args.layers < 0 or min(args.steps, args.batch_size, args.lora_r, args.eval_n, args.eval_every,
                              args.anchor_rows) < 1:
        p.error("--layers must be >= 0; --steps, --batch-size, --lora-r, --eval-n, --eval-every and "
                "--anchor-rows >= 1")
    if args.anchor_text < 0:
        p.error(f"--anchor-text {args.anchor_text}: a weight, >= 0")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (a mini checkpoint directory)")
    n_layers = json.loads((args.model / "config.json").read_text()).get("text_config", {}).get("num_hidden_layers")
    if isinstance(n_layers, int) and args.layers > n_layers:
        p.error(f"--layers {args.layers}: {args.model} has {n_layers} decoder layers")


def load_probed(model_dir: Path):
    """(model, tokenizer, prose token ids): the checkpoint in float32, exact kernels, and the text
    its prose perplexity is measured on (bench/mini_quality.py's)."""
    import unigemma
    from bench.quant_quality import prose

    gemma = unigemma.load(model_dir, dtype="float32", fast=False, exact=True)
    return gemma.model, gemma.tokenizer, prose(2048, gemma.tokenizer)


def first_layers_adapter(model, tokenizer, layers: int, r: int, seed: int, keep_text: float | None):
    """LoRA r (alpha 2r) on every layer, of which only the first `layers`' parts are returned to
    train: (config, those parameters, the modules kept off the text and their text subspaces, empty
    without `keep_text`; bench/mini_keep_text.py)."""
    from bench.mini_keep_text import keep_off_text
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig
    from unigemma.lora.inject import lora_modules

    lora = LoraConfig(r=r, alpha=2 * r)
    prepare(model, lora, seed)
    used = {f"language_model.layers.{i}." for i in range(layers)}
    adapter = [q for n, q in model.named_parameters() if q.requires_grad and any(u in n for u in used)]
    kept, bases = {}, {}
    if keep_text is not None:
        kept = {n: m for n, m in lora_modules(model).items() if any(u in n for u in used)}
        bases = keep_off_text(model, kept, tokenizer, layers, keep_text)
    return lora, adapter, kept, bases


def text_anchor(args: argparse.Namespace, model, tokenizer, layers: int | None = None):
    """`--anchor-text`'s bench/mini_keep_text.py `TextAnchor` on the first `layers` layers (default
    `--layers`; None without it): its targets taken now, so before any step."""
    from bench.mini_keep_text import TextAnchor

    return (TextAnchor(model, tokenizer, args.layers if layers is None else layers, args.anchor_rows,
                       weight=args.anchor_text, seed=args.seed)
            if args.anchor_text else None)


@torch.no_grad()
def probe_accuracy(probe: nn.Module, fixed: tuple, chunk: int = 32) -> float:
    """The share of a fixed evaluation set (inputs..., labels) the probe names, `chunk` at a time, in
    eval mode (its head's running statistics, not the chunk's), back in training mode after."""
    *inputs, ys = fixed
    probe.eval()
    got = torch.cat([probe(*(x[i:i + chunk] for x in inputs)).argmax(-1) for i in range(0, len(ys), chunk)])
    probe.train()
    return round(float((got == ys).float().mean()), 3)


def reporter(name: str, args: argparse.Namespace, bases: dict, probe: nn.Module, evals: dict, unit: str,
             suffix: str, model, prose_ids: torch.Tensor, anchor=None, **settings):
    """`train`'s report(step, loss) for a probe: one JSON line an evaluation, with the step, the
    `unit`s seen (pictures, clips), the mean train loss, each fixed set's accuracy (`{split}{suffix}`),
    the whole model's prose perplexity, with `anchor` the mean text drift it measured since, and the
    seconds since; the first line also holds the machine, the shared settings, the text dimensions
    kept off and the probe's own `settings`."""
    from bench.mini_quality import perplexity

    t0 = time.time()
    info = {"bench": name, **machine(torch.get_num_threads()), "model": str(args.model), "layers": args.layers,
            "batch_size": args.batch_size, "lr": args.lr, "full_lr": args.full_lr, "keep_text": args.keep_text,
            "anchor_text": args.anchor_text, "anchor_rows": args.anchor_rows,
            "text_dims_kept_off": {n.split("language_model.")[-1]: P.shape[1] for n, P in bases.items()},
            **settings}

    def report(step, loss):
        print(json.dumps({**info, "step": step, unit: step * args.batch_size, "train_loss": loss,
                          **{f"{s}{suffix}": probe_accuracy(probe, evals[s]) for s in evals},
                          "prose_perplexity": round(perplexity(model, prose_ids), 3),
                          **({"text_drift": anchor.drift()} if anchor is not None else {}),
                          "seconds": round(time.time() - t0)}),
              flush=True)
        info.clear()  # the machine and settings once, on the first line

    return report


def linear_decay(opt, steps: int):
    """Every group's rate falling linearly from its own to 0 by step `steps` (call `.step()` after
    each optimizer step). `steps` 0 (an evaluation-only run) leaves the rates as they are."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda done: 1 - done / max(steps, 1))


def train(probe: nn.Module, draw, opt, after_step, steps: int, every: int, report, anchor=None,
          decay: bool = False) -> None:
    """`steps` optimizer steps of `probe` on fresh batches (`draw()` → inputs..., labels), each
    followed by `after_step()` (the keep-text projection); `report(step, mean train loss)` at step
    0 (loss None) and every `every` steps. With `anchor` (bench/mini_keep_text.py `TextAnchor`)
    each step's loss adds its weight × its text drift (the train loss reported is the task's).
    `decay`: the rates fall linearly to 0 by the last step (a constant rate's last steps are as
    noisy as its first, and the fresh clips keep the loss noisy too)."""
    schedule = linear_decay(opt, steps) if decay else None
    losses = []
    report(0, None)
    for step in range(1, steps + 1):
        *inputs, ys = draw()
        loss = nn.functional.cross_entropy(probe(*inputs), ys)
        opt.zero_grad()
        (loss + anchor.weight * anchor.loss() if anchor is not None else loss).backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        after_step()
        losses.append(float(loss.detach()))
        if step % every == 0:
            report(step, round(sum(losses) / len(losses), 3))
            losses.clear()


def main(argv: list[str] | None = None) -> None:
    from bench.mini_keep_text import project_
    from unigemma.finetune.full import make_trainable, resolve

    p = probe_arguments(__doc__, lr=1e-3)
    p.add_argument("--scratch", type=int, default=0, metavar="N",
                   help="instead, N layers of a small fresh transformer (its width the decoder's, 4 heads), all "
                        "trained: how many pictures a reader that starts from nothing needs")
    p.add_argument("--pos-std", type=float, default=None, metavar="S",
                   help="first draw the image embedder's 2-D position table afresh at std S (weights/mini.py "
                        "draws it at 0.02: ~2%% of a LayerNorm'd patch's norm)")
    p.add_argument("--free", type=float, default=0.5, help="share of each batch in unnamed random fills")
    args = p.parse_args(argv)
    if args.scratch < 0 or not 0 <= args.free <= 1:
        p.error("--scratch must be >= 0 and --free in [0, 1]")
    check_arguments(p, args)
    model, tokenizer, prose_ids = load_probed(args.model)

    torch.manual_seed(args.seed)
    lora, adapter, kept, bases = first_layers_adapter(model, tokenizer, args.layers, args.lora_r, args.seed,
                                                      args.keep_text)
    if args.pos_std is not None:
        with torch.no_grad():
            model.model.embed_vision.pos_embedding.normal_(std=args.pos_std)
    embedder = make_trainable(resolve(model, "media"))
    reader = Reader(model, args.layers, args.scratch)
    mine = list(reader.head.parameters()) + (list(reader.scratch.parameters()) if args.scratch else [])
    opt = torch.optim.AdamW([{"params": embedder, "lr": args.full_lr},
                             {"params": adapter + mine, "lr": args.lr}], weight_decay=0.0)

    evals = {split: batch(random.Random(f"{args.seed}/eval/{split}"), [split] * args.eval_n)
             for split in ("heldout", "train", "free")}

    anchor = text_anchor(args, model, tokenizer)
    rng = random.Random(f"{args.seed}/train")
    report = reporter("mini_reader_probe", args, bases, reader, evals, "pictures", "_accuracy", model, prose_ids,
                      anchor, scratch=args.scratch, pos_std=args.pos_std, free=args.free,
                      chance=round(1 / len(SHAPES), 3))

    def draw_batch():
        return batch(rng, ["free" if rng.random() < args.free else "train" for _ in range(args.batch_size)])

    train(reader, draw_batch, opt, lambda: project_(kept, bases), args.steps, args.eval_every, report, anchor,
          args.decay)
    if args.save:
        save_run(model, lora, args.model, args.save)


if __name__ == "__main__":
    main()
