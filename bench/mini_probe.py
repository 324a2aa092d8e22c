"""Does unigemma-mini's media path learn? A short run on one question category, scored as it goes.

    python -m bench.mini_probe --model runs/mini/base --data runs/mini/data --category colour \
        --single --steps 150 --eval-every 50

The full recipe (bench/mini_train.py) takes ~45 minutes before its held-out answers say anything;
this asks one question category (bench/mmdata/conversations.py `questions`: colour, shape, count,
beeps, pitch; or digit, spoken_word: those items' own question) of the items of `--data`, one
question per item (several categories, comma-separated, are trained together and scored each),
and trains the embedders in full and LoRA on the decoder as `unigemma finetune --train-full
media` does (AdamW, no warmup, the lr constant or with `--decay` falling linearly to 0). Every
`--eval-every` steps it scores `--eval-n` held-out items (of each category) by ranking the category's
answers by their first token's logit after the question (one forward an item, no generation;
chance is one over the number of answers), and the whole model's prose perplexity
(bench/mini_quality.py's). Prints one JSON line per evaluation.

`--free-shapes N` trains the shape category on N colour-free pictures instead
(bench/mmdata/free_shapes.py: one shape in an unnamed random colour, "What shape is this?"),
made under `--data` (any other category beside it trains on its own items as before), and also
scores `--eval-n` further such pictures it never trained on ("free_accuracy"), beside the
held-out items' named-colour questions. `--free-start I` takes them from the generator's index I
(a later stage's fresh pictures: the ones before I were an earlier stage's). With `--single`, the
same held-out pictures are also asked "What shape is this?" ("heldout_unnamed_accuracy"): where it
is high and the named-colour question's low, the shape is read and the colour named in the
question overrides it (README, "Tenth look").

`--own-question` asks only the items of the category's own kind, each its own first question: the
generator phrases a kind's question two ways (bench/mmdata/items.py), `questions` one, so a stage
on "How many beeps are there?" alone never met the held-out split's other half, "Count the beeps.
Answer with a number." (answered 74.5% against 80.0%: README, "Twenty-first look"); the ranked
score then runs on the very items and phrasings bench/mini_quality.py asks.

`--from-layer K` trains only the adapter on decoder layers K and up, the embedders and the
layers below frozen: after bench/mini_reader_probe.py's warm-up, whose first layers already read
the shape, it asks whether the later layers learn to carry it to the answer (and backward stops
at layer K, so a step costs less). `--save DIR` writes the adapter and the embedders at the end,
and DIR/checkpoint with both folded into `--model`'s (bench/mini_reader_probe.py `start_checkpoint`).

`--to-layer K` is the other way round: only the adapter on layers below K (and the embedders) trains,
the later layers frozen, so the first layers learn from the answer's own loss through the routing the
later layers already have (the audio probe's warm-up learns them on its own head, whose better
hearing the routing did not read: README, "Twenty-eighth look"). The later layers untrained, the
prose moves only by what the first layers put out on English: `--anchor-text W` holds that where the
start model had it (bench/mini_keep_text.py `TextAnchor`, as on the first-layer probes; the report
gains `text_drift`).

`--hear W` trains the hearing warm-up's objective in the same stage: bench/mini_audio_probe.py's
head (`Hearer`: the audio block after the first `--head-layers` layers, mean and max pooled, a
throw-away BatchNorm + Linear) names the word said in `--batch-size` fresh clips a step (`--hear-task`,
in the wide training voices), and W x its cross-entropy joins the answers' loss. A warm-up trained
alone moves the block the later layers were fitted to, and routing after it won back less than the
warm-up gained (README, "Thirty-fifth look"); here the later layers follow the block as it moves.
It trains every layer (no `--from-layer`), `--anchor-text` then holding the first `--head-layers`
layers' output on English; the report gains `hear_heldout_accuracy` (fixed clips in unseen voices).
`--see W` is the same for pictures: bench/mini_reader_probe.py's head (`Reader`) names the shape in
fresh one-shape pictures (half unnamed fills, half training pairs), scored on held-out colour x shape
pairs (`see_heldout_accuracy`): the shape reader, trained alone, cost the colour and count answers the
later layers had learned on the old tokens (README, "Twenty-third look"); here they train beside it.

`--train-full SPEC` names the embedders trained (default both; `model.embed_audio` alone leaves
every picture's tokens as they were), and `--lr 0` trains no adapter: a run of the audio embedder
alone leaves every text and picture token's computation untouched, so the prose perplexity cannot
move (the decoder's weights are not trained), and it ships without package room (the embedders
ship whole either way; README, "Twenty-seventh look").

`--mix FILE` fills a `--mix-share` of every batch from FILE (trainer-format lines, media paths
relative to FILE's folder: e.g. bench/mini_train.py's train_mixed.jsonl, every kind's
conversations and the replay text), so a run that teaches one category keeps the others and the
prose: trained on shape alone, the later layers answered every question with a shape name and the
prose perplexity went from 11 to 10^10 (README, "Ninth look"). `--mix-drop REGEX` first takes out
of those lines every question that matches (with its answer; the picture or sound moves to the
next question kept, a line left with none is dropped): the recipe's follow-ups ask "What shape is
the gray one?" of training colour × shape pairs only, a colour → shape prior that is wrong by
construction on every held-out pair (README, "Tenth look"). `--keep-text EPS` holds the adapter
off the text's input subspace, as bench/mini_reader_probe.py's does (bench/mini_keep_text.py):
the picture tokens may then learn to be read while every text position, the answer's too, meets
almost no update (README, "Eleventh look").

It is its own loop, not the trainer's, to score during the run; the pieces are the trainer's
(`encode_line`, `collate`, `hidden_states`, `label_loss`, `prepare`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mmdata.conversations import questions  # noqa: E402
from bench.mmdata.free_shapes import QUESTIONS as FREE_QUESTIONS  # noqa: E402


# kinds whose category is the item's own question (conversations.py `questions` asks nothing of a
# spoken digit or word: the item's first turn is the question)
OWN = ("digit", "spoken_word")
CATEGORIES = ("colour", "shape", "count", "beeps", "pitch") + OWN


def asked(record: dict, own: bool = False) -> list[tuple[str, str, str]]:
    """(category, question, answer) of `record`: its own first turn (category: its kind) for the
    OWN kinds, or any kind when `own`; else `questions`'."""
    if record["kind"] not in OWN and not own:
        return questions(record)
    user, answer = record["messages"][:2]
    return [(record["kind"], " ".join(x["text"] for x in user["content"] if x["type"] == "text"), answer["content"])]


def one_question(path: Path, category: str, single: bool, own: bool = False) -> list[dict]:
    """Each item of `path` asked its `category` questions (one record each); single: pictures of one
    shape only; own: only the items of that kind, each asked its own first question."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if single and "pairs" in r["meta"] and len(r["meta"]["pairs"]) != 1:
            continue
        media = [x for x in r["messages"][0]["content"] if x["type"] != "text"]
        out += [{"answer": a, "category": cat,
                 "messages": [{"role": "user", "content": media + [{"type": "text", "text": q}]},
                              {"role": "assistant", "content": a}]}
                for cat, q, a in asked(r, own) if cat == category]
    return out


def free_shapes(data: Path, n: int, start: int = 0) -> list[dict]:
    """`n` colour-free shape pictures from index `start`, made under `data`, as shape items."""
    from bench.mini_train import free_shape_items

    return [{**json.loads(x), "category": "shape"} for x in free_shape_items(data, n, start=start)]


def with_free_shapes(train: list[dict], data: Path, n: int, start: int = 0) -> list[dict]:
    """`train` with its shape items swapped for `n` colour-free pictures: the shape then has to be read
    from the outline, while the other categories' items stay (a stage that rebuilds every skill
    without teaching shape by the colour a question names: README, "Forty-first look")."""
    return [r for r in train if r["category"] != "shape"] + free_shapes(data, n, start)


def categories(text: str) -> tuple[str, ...]:
    """--category's comma-separated names, each one of CATEGORIES."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in CATEGORIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: each must be one of {', '.join(CATEGORIES)}")
    return names


def unnamed_question(record: dict) -> dict:
    """`record` (one_question's) asked as the free fills are, "What shape is this?": no colour named."""
    user, answer = record["messages"]
    content = [x for x in user["content"] if x["type"] != "text"] + [{"type": "text", "text": FREE_QUESTIONS[0]}]
    return {**record, "messages": [{**user, "content": content}, answer]}


def regex(text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {e}") from None


def drop_questions(record: dict, pattern: re.Pattern) -> dict | None:
    """`record` (a trainer-format line) without its questions that match `pattern`, each with its
    answer; a dropped first question hands its media to the next kept one. None when none is kept;
    text lines (no messages) come back as they are."""
    if "messages" not in record:
        return record
    msgs, media, kept = record["messages"], [], []
    for i in range(0, len(msgs) - 1, 2):
        q, a = msgs[i], msgs[i + 1]
        parts = q["content"] if isinstance(q["content"], list) else [{"type": "text", "text": q["content"]}]
        text = " ".join(x["text"] for x in parts if x["type"] == "text")
        if pattern.search(text):
            media += [x for x in parts if x["type"] != "text"]
            continue
        kept += [{**q, "content": media + parts} if media else q, a]
        media = []
    return {**record, "messages": kept} if kept else None


def trained_parts(model, from_layer: int, full: str = "media", adapter: bool = True,
                  to_layer: int | None = None) -> tuple[list, list]:
    """(embedder parameters, adapter parameters) a run trains, the adapter already added: the
    embedders `full` names (unigemma/finetune/full.py `resolve`: "media" is both) and the whole
    adapter, or with `from_layer` K > 0 no embedder and the adapter of layers K and up only, or with
    `to_layer` K the adapter of layers below K only (the embedders as without it);
    `adapter` False: no adapter at all (it stays as added, zero, and gets no gradient)."""
    from unigemma.finetune.full import make_trainable, resolve

    n = len(model.text.layers)
    frozen = range(from_layer) if to_layer is None else range(to_layer, n)
    below = {f"language_model.layers.{i}." for i in frozen}
    for name, q in model.named_parameters():
        if any(b in name for b in below) or not adapter:
            q.requires_grad_(False)  # outside the trained layers (backward stops at --from-layer's K), or all
    trained = [q for q in model.parameters() if q.requires_grad]
    return (make_trainable(resolve(model, full)) if from_layer == 0 else []), trained


def batch_loss(model, own: list, mixed: list, together: bool = False) -> tuple[torch.Tensor, int]:
    """(sum, count) of the label tokens' loss over two lists of encoded items (the category's and
    the --mix lines'), each list padded to its own longest; `together`: as one batch, the plain
    path. Padding is masked, so the sum is the same either way (to float rounding): a spoken
    clip's conversation is ~45 tokens and a mix line's ~100 (up to ~160), so one batch of 16
    padded every clip to the longest mix line (~2,150 tokens for ~925 real) and a step took ~1.7x
    as long (AVX2 EPYC, words and digits with a quarter mix: 21-25 s against 12-15 s)."""
    from unigemma.finetune.data import collate
    from unigemma.finetune.loss import hidden_states, label_loss

    total, n = 0, 0
    for group in ([own + mixed] if together else [g for g in (own, mixed) if g]):
        b = collate(group, 0)
        t, k = label_loss(model, hidden_states(model, b.inputs), b.labels)
        total, n = total + t, n + k
    return total, n


class Head:
    """A throw-away head's side task (`--hear`, `--see`): `probe` (a module whose `.head` is its own)
    trained on fresh inputs each step (`draw()` → inputs..., labels) and scored on fixed held-out
    ones (`held`), the same each time for a seed."""

    def __init__(self, probe, draw, held: tuple):
        self.probe, self.draw, self.held = probe, draw, held

    def loss(self) -> torch.Tensor:
        *inputs, labels = self.draw()
        return torch.nn.functional.cross_entropy(self.probe(*inputs), labels)

    def accuracy(self) -> float:
        from bench.mini_reader_probe import probe_accuracy

        return probe_accuracy(self.probe, self.held)


def hearing(model, args: argparse.Namespace) -> Head:
    """`--hear`: bench/mini_audio_probe.py's head on the first `--head-layers` layers, its loss on
    `--batch-size` fresh training-voice clips a step (the wide pool) and its accuracy on `--eval-n`
    fixed clips in the held-out voices (the same clips for a seed as the audio probe's)."""
    import numpy as np

    from bench.mini_audio_probe import TASKS, Hearer, batch
    from bench.mmdata.items import Voicing

    rng, np_rng = random.Random(f"{args.seed}/hear"), np.random.default_rng([args.seed, 0])
    held = batch(random.Random(f"{args.seed}/eval/heldout"), np.random.default_rng([args.seed, 1]),
                 args.hear_task, "heldout", args.eval_n)
    return Head(Hearer(model, args.head_layers, len(TASKS[args.hear_task])),
                lambda: batch(rng, np_rng, args.hear_task, "train", args.batch_size, Voicing(wide=True)), held)


def seeing(model, args: argparse.Namespace) -> Head:
    """`--see`: bench/mini_reader_probe.py's head on the first `--head-layers` layers naming the
    shape of `--batch-size` fresh one-shape pictures a step (half in unnamed random fills, half in
    training colour x shape pairs, as the reader probe draws them), scored on `--eval-n` fixed
    pictures of held-out pairs (colour cannot stand in for shape there)."""
    from bench.mini_reader_probe import Reader, batch

    rng = random.Random(f"{args.seed}/see")
    held = batch(random.Random(f"{args.seed}/eval/heldout"), ["heldout"] * args.eval_n)
    return Head(Reader(model, args.head_layers),
                lambda: batch(rng, [rng.choice(("free", "train")) for _ in range(args.batch_size)]), held)


def main(argv: list[str] | None = None) -> None:
    import unigemma
    from bench import mini_keep_text as keep_text
    from bench.mini_quality import perplexity
    from bench.mini_reader_probe import add_decay_argument, linear_decay, save_run, save_stage, text_anchor
    from bench.quant_quality import prose
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.labels import IGNORE
    from unigemma.finetune.loss import hidden_states
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="an untrained mini checkpoint (weights/mini.py)")
    p.add_argument("--data", type=Path, required=True, help="bench/mmdata output: train.jsonl, heldout.jsonl")
    p.add_argument("--category", required=True, type=categories,
                   help=f"one or more of {', '.join(CATEGORIES)}, comma-separated: trained together, scored each")
    p.add_argument("--single", action="store_true", help="pictures of one shape only")
    p.add_argument("--own-question", action="store_true",
                   help="ask only the category's own kind, each item its own first question (the "
                        "held-out split's phrasings, as bench/mini_quality.py asks them)")
    p.add_argument("--image-budget", type=int, default=None, help="default: the checkpoint's (mini: 70)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--full-lr", type=float, default=1e-3, help="the embedders'")
    p.add_argument("--lr", type=float, default=3e-4, help="the adapter's; 0 trains no adapter (the embedders alone)")
    p.add_argument("--train-full", default="media", metavar="SPEC",
                   help="the embedders trained in full (unigemma finetune's --train-full: media, or "
                        "model.embed_audio / model.embed_vision alone); with --from-layer 0 only")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--eval-n", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--free-shapes", type=int, default=0, metavar="N",
                   help="train on N colour-free shape pictures (category shape only)")
    p.add_argument("--free-start", type=int, default=0, metavar="I",
                   help="with --free-shapes: the pictures from the generator's index I (0: the first)")
    p.add_argument("--from-layer", type=int, default=0, metavar="K",
                   help="train only the adapter on layers K and up (K > 0 freezes the embedders too)")
    p.add_argument("--save", type=Path, default=None, metavar="DIR",
                   help="write the adapter, the embedders and DIR/checkpoint (both folded in) at the end; the "
                        "adapter and embedders also at each evaluation, so a run stopped early keeps its last")
    p.add_argument("--mix", type=Path, default=None, metavar="FILE",
                   help="trainer-format lines mixed into every batch (media relative to FILE's folder)")
    p.add_argument("--mix-share", type=float, default=0.5, help="the share of each batch from --mix")
    p.add_argument("--mix-drop", type=regex, default=None, metavar="REGEX",
                   help="take the questions matching REGEX (and their answers) out of the --mix lines")
    p.add_argument("--to-layer", type=int, default=None, metavar="K",
                   help="train only the adapter on layers below K (and the embedders): the first layers "
                        "learn from the answer's loss through the later layers as they are")
    keep_text.add_argument(p)
    keep_text.add_anchor_arguments(p)
    p.add_argument("--hear", type=float, default=0.0, metavar="W",
                   help="add W x the hearing head's loss on fresh clips (bench/mini_audio_probe.py) to each step's")
    p.add_argument("--see", type=float, default=0.0, metavar="W",
                   help="add W x the shape-reading head's loss on fresh pictures (bench/mini_reader_probe.py)")
    p.add_argument("--head-layers", "--hear-layers", type=int, default=5, dest="head_layers",
                   help="with --hear or --see: the layers the head reads after")
    p.add_argument("--hear-task", choices=("word", "digit", "both", "beeps"), default="word",
                   help="with --hear: what the head names")
    p.add_argument("--pad-together", action="store_true",
                   help="pad the --mix lines and the category's items as one batch (the plain path; "
                        "by default each is padded to its own longest: the same loss, less padding)")
    add_decay_argument(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.free_shapes and "shape" not in args.category:
        p.error("--free-shapes trains the shape category: --category must name shape")
    if args.free_shapes < 0:
        p.error(f"--free-shapes must be >= 0, got {args.free_shapes}")
    if args.free_start < 0 or (args.free_start and not args.free_shapes):
        p.error(f"--free-start must be >= 0 and goes with --free-shapes, got {args.free_start}")
    if args.mix is not None and not args.mix.is_file():
        p.error(f"--mix {args.mix}: not a file")
    if args.mix is not None and not 0 < args.mix_share < 1:
        p.error(f"--mix-share {args.mix_share}: must be in (0, 1)")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (a mini checkpoint directory)")
    n_layers = json.loads((args.model / "config.json").read_text()).get("text_config", {}).get("num_hidden_layers")
    if args.from_layer < 0 or (isinstance(n_layers, int) and args.from_layer >= n_layers):
        p.error(f"--from-layer {args.from_layer}: must be >= 0 and below the {n_layers} decoder layers")

    if args.to_layer is not None and (args.from_layer or args.to_layer < 1
                                      or (isinstance(n_layers, int) and args.to_layer >= n_layers)):
        p.error(f"--to-layer {args.to_layer}: must be above 0 and below the {n_layers} decoder layers, "
                "without --from-layer")
    if args.anchor_text < 0 or args.anchor_rows < 1:
        p.error(f"--anchor-text {args.anchor_text} / --anchor-rows {args.anchor_rows}: must be >= 0 / >= 1")
    for name, w in (("--hear", args.hear), ("--see", args.see)):
        if w < 0 or (w and (args.from_layer or args.to_layer is not None or args.lr == 0)):
            p.error(f"{name} {w}: a weight >= 0, training every layer's adapter (no --from-layer / --to-layer, "
                    "--lr above 0)")
    if args.hear and args.see:
        p.error("--hear and --see: one head a stage")
    head_task = args.hear or args.see
    if head_task and not (isinstance(n_layers, int) and 0 < args.head_layers < n_layers):
        p.error(f"--head-layers {args.head_layers}: must be above 0 and below the {n_layers} decoder layers")
    if args.anchor_text and ((args.to_layer is None and not head_task) or args.lr == 0):
        p.error("--anchor-text holds the first layers' output on English: it needs --to-layer K "
                "and an adapter, or --hear / --see")
    if args.lr < 0 or args.full_lr < 0:
        p.error(f"--lr {args.lr} / --full-lr {args.full_lr}: must be >= 0")
    if args.lr == 0 and args.from_layer:
        p.error("--lr 0 trains no adapter, and --from-layer K no embedder: nothing would train")
    if args.lr == 0 and args.keep_text is not None:
        p.error("--keep-text holds the adapter off the text, and --lr 0 trains none")

    torch.manual_seed(args.seed)
    gemma = unigemma.load(args.model, dtype="float32", fast=False, exact=True)
    model, processor, tok = gemma.model, gemma.processor(image_budget=args.image_budget), gemma.tokenizer
    prose_ids = prose(2048, tok)
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r)
    prepare(model, lora, args.seed)
    embedders, adapter = trained_parts(model, args.from_layer, args.train_full, args.lr > 0, args.to_layer)
    kept, bases = {}, {}
    if args.keep_text is not None:
        from unigemma.lora.inject import lora_modules

        trained = {id(q) for q in adapter}
        kept = {n: m for n, m in lora_modules(model).items() if id(m.lora_A["default"].weight) in trained}
        bases = keep_text.keep_off_text(model, kept, tok, len(model.text.layers), args.keep_text)
    # before any step: the adapter is still zero
    anchor = text_anchor(args, model, tok, args.head_layers if head_task else args.to_layer)
    side, weight = ((hearing(model, args), args.hear) if args.hear else (seeing(model, args), args.see) if args.see
                    else (None, 0.0))
    head = list(side.probe.head.parameters()) if side else []
    opt = torch.optim.AdamW([g for g in ({"params": embedders, "lr": args.full_lr},
                                         {"params": adapter + head, "lr": args.lr}) if g["params"]],
                            weight_decay=0.0)
    train = [r for c in args.category
             for r in one_question(args.data / "train.jsonl", c, args.single, args.own_question)]
    held = []
    for c in args.category:  # --eval-n of each
        some = one_question(args.data / "heldout.jsonl", c, args.single, args.own_question)
        random.Random(args.seed).shuffle(some)
        held += some[:args.eval_n]
    free_held = []
    if args.free_shapes:
        train = with_free_shapes(train, args.data, args.free_shapes, args.free_start)
        free_held = free_shapes(args.data, args.eval_n, start=args.free_start + args.free_shapes)
    unnamed = [unnamed_question(r) for r in held] if args.category == ("shape",) and args.single else []
    answers, first, candidates = {}, {}, {}  # per category: answers ranked among their own
    for c in args.category:
        answers[c] = sorted({r["answer"] for r in train + held if r["category"] == c})
        first[c] = {tok.encode(a, add_special_tokens=False)[0]: a for a in answers[c]}
        if len(first[c]) != len(answers[c]):
            raise SystemExit(f"{c}: answers share a first token, ranking cannot tell them apart")
        candidates[c] = torch.tensor(list(first[c]))

    def encode(r, where=args.data):
        return encode_line(processor, r, where, "probe")

    mix = [json.loads(x) for x in args.mix.read_text(encoding="utf-8").splitlines()] if args.mix else []
    if args.mix_drop is not None:
        mix = [r for r in (drop_questions(r, args.mix_drop) for r in mix) if r is not None]
    n_mix = round(args.mix_share * args.batch_size) if mix else 0

    @torch.no_grad()
    def accuracy(held=held) -> float:
        right = 0
        for r in held:
            b = collate([encode(r)], 0)
            labels = b.labels[0]
            at = int((labels != IGNORE).nonzero()[0]) - 1  # the position that predicts the answer
            logits = model.output(hidden_states(model, b.inputs)[0, at])
            c = candidates[r["category"]]
            right += first[r["category"]][int(c[logits[c].argmax()])] == r["answer"]
        return right / len(held)

    def scores() -> dict:
        """heldout_accuracy, of each category when there are several; chance likewise."""
        one = len(args.category) == 1
        acc = {c: round(accuracy([r for r in held if r["category"] == c]), 3) for c in args.category}
        chance = {c: round(1 / len(answers[c]), 3) for c in args.category}
        return {"heldout_accuracy": acc[args.category[0]] if one else acc,
                "chance": chance[args.category[0]] if one else chance}

    def report(step, losses, t0):
        print(json.dumps({"category": ",".join(args.category), "single": args.single,
                          "image_budget": processor.image_budget,
                          "from_layer": args.from_layer, "mix_share": args.mix_share if mix else 0,
                          **({"to_layer": args.to_layer} if args.to_layer is not None else {}),
                          "keep_text": args.keep_text, "step": step,
                          "train_loss": round(sum(losses) / len(losses), 3) if losses else None,
                          **scores(), "heldout_items": len(held),
                          **({"heldout_unnamed_accuracy": round(accuracy(unnamed), 3)} if unnamed else {}),
                          **({"free_accuracy": round(accuracy(free_held), 3)} if free_held else {}),
                          "prose_perplexity": round(perplexity(model, prose_ids), 3),
                          **({"text_drift": anchor.drift()} if anchor else {}),
                          **({f"{'hear' if args.hear else 'see'}_heldout_accuracy": side.accuracy()}
                             if side else {}),
                          "seconds": round(time.time() - t0)}), flush=True)

    schedule = linear_decay(opt, args.steps) if args.decay else None
    rng, t0, losses = random.Random(args.seed), time.time(), []
    report(0, losses, t0)
    for step in range(1, args.steps + 1):
        total, n = batch_loss(model, [encode(r) for r in rng.sample(train, args.batch_size - n_mix)],
                              [encode(r, args.mix.parent) for r in rng.sample(mix, n_mix)], args.pad_together)
        opt.zero_grad()
        (total / n + (anchor.weight * anchor.loss() if anchor else 0)
         + (weight * side.loss() if side else 0)).backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        if bases:
            keep_text.project_(kept, bases)
        losses.append(float(total.detach()) / n)
        if step % args.eval_every == 0:
            model.eval()
            report(step, losses[-args.eval_every:], t0)
            if args.save and step < args.steps:  # a long stage stopped for time keeps what it reached
                save_stage(model, lora, args.save)
            model.train()
    if args.save:
        save_run(model, lora, args.model, args.save)


if __name__ == "__main__":
    main()
