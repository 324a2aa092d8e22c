"""A reading stage for unigemma-mini on a borrowed GPU: fresh pictures by the ten thousand, a time budget.

    python -m bench.mini_gpu --model /tmp/ck --out $OUT --seconds 330 --mix mix.jsonl --text-ids text.json

On the 2-core CPU a stage takes 7 s a step of 16 conversations, so the picture questions (colour,
shape, count, the written word) were trained on a few thousand pictures seen a few times each; on
an H200 a step of 64 takes a fraction of a second. This stage, on `--model` (bench/mini_bundle.py
unpacks the shipped model there):
  1. draws `--per-kind` new training items of each picture kind and of the tone kinds (beeps,
     pitch) (bench/mmdata/items.py, seed `--seed`, in `--workers` processes) and asks each the
     recipe's several questions (bench/mmdata/conversations.py), and the held-out split's colour,
     shape, count, word and beeps items (seed 0: the same items bench/mini_quality.py scores);
  2. adds a LoRA (r `--lora-r`, alpha 2r) on every decoder layer, kept off the text's input subspace
     (bench/mini_keep_text.py, on `--text-ids`' English), and trains it with the vision embedder
     (the audio embedder frozen), a `--mix-share` of every batch from `--mix` (trainer-format lines:
     the sound kinds and the replay text, so hearing and prose are trained on too), AdamW, the rate
     warmed up over 30 steps then cosine-decayed to a tenth over the time budget;
  3. every `--eval-every` seconds scores the held-out items by exact match, teacher-forced (every
     label token the argmax where it is predicted, the end of turn included: what greedy decoding
     answers, without post-processing), and as many `--fresh` items of the training axes (new
     pictures of the training pairs and fonts: README, Seventeenth look, where these learned
     colour and the held-out ones did not), prints one JSON line and saves the adapter and the
     embedders in bfloat16 to `--out` (overwritten: a run stopped by its limit keeps its last).
`--text-weight W` makes the mix's text lines W of the loss and the conversations 1 - W; by tokens
(the default, the trainer's rule) the replay paragraphs were 70% of it and were memorised there.
Tokens outside the checkpoint's kept.json (a bundle keeps only the rows it was packed for) never
reach the model: an example holding one is skipped and counted.

Two further objectives (README, Eighteenth look), for what the Seventeenth look's stage did not
learn: `--read-weight W` adds bench/mini_patch_read.py's per-patch shape and colour heads after
decoder layer `--read-layer` (a direct signal on every image token); `--distill N` takes the mix's
text lines out of the cross-entropy and puts N rows a batch of text under KL to the start model
(bench/mini_self_distill.py: the paragraphs and `--sample-text` continuations the start model
writes; `--teacher` another checkpoint's, to pull the prose back to it), so the prose is kept
without being memorised; the adapter is then free of the
keep-text projection (leave out `--text-ids`). `--prose-tokens` measures the prose perplexity
(bench/quant_quality.py's text) at every evaluation, `--extra-held` scores more held-out lines
(the spoken kinds, drawn where the speech synthesizer is). `--free N` adds N pictures of one shape
in an unnamed random fill (bench/mmdata/free_shapes.py), which the Eighteenth look's heads needed:
trained on named colours alone they read a held-out pair's shape as one its colour came with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# drawn on the machine: the picture kinds, and the tones (numpy, no speech synthesizer there)
DRAWN = ("colour", "shape", "count", "position", "word", "description", "beeps", "pitch")
SCORED = ("colour", "shape", "count", "word", "beeps")
SIZE = 144  # bench/mmdata/generate.py's default: 3 x 3 patches


def _make(job: tuple) -> dict:
    from bench.mmdata import free_shapes, items

    kind, split, i, seed, out = job
    if kind == free_shapes.KIND:  # one shape in an unnamed random fill (training only)
        return free_shapes.make(i, seed, Path(out), SIZE).record()
    return items.make(kind, split, i, seed, Path(out), SIZE).record()


def draw_items(out: Path, kinds: tuple[str, ...], per_kind: int, heldout: int, fresh: int, seed: int,
               workers: int, free: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(training conversations, held-out records, fresh records: new items of the training axes,
    seed + 1, their media under out/fresh), the rest of the media under `out`; `free` items of
    bench/mmdata/free_shapes.py among the training ones."""
    from bench.mmdata import free_shapes
    from bench.mmdata.conversations import conversation

    scored = [k for k in SCORED if k in kinds]
    jobs = [(k, "train", i, seed, str(out)) for k in kinds for i in range(per_kind)]
    jobs += [(free_shapes.KIND, "train", i, seed, str(out)) for i in range(free)]
    held_jobs = [(k, "heldout", i, 0, str(out)) for k in scored for i in range(heldout)]
    fresh_jobs = [(k, "train", i, seed + 1, str(out / "fresh")) for k in scored for i in range(fresh)]
    with Pool(workers) as pool:
        records = pool.map(_make, jobs + held_jobs + fresh_jobs, chunksize=64)
    rng, a, b = random.Random(seed), len(jobs), len(jobs) + len(held_jobs)
    return [conversation(r, rng, 4) for r in records[:a]], records[a:b], records[b:]


class Batches(torch.utils.data.IterableDataset):
    """Endless (batch, which rows are text lines, examples skipped so far): `n - n_mix` training
    conversations and `n_mix` mix lines, each worker drawing with its own seed; an example holding
    a token outside `kept` is replaced by another draw."""

    def __init__(self, processor, train, base, mix, mix_base, n, n_mix, kept, seed, patches=False):
        super().__init__()
        self.args = (processor, train, base, mix, mix_base, n, n_mix, kept, seed, patches)

    def __iter__(self):
        from bench.mini_patch_read import patch_targets
        from unigemma.finetune.data import collate, encode_line

        processor, train, base, mix, mix_base, n, n_mix, kept, seed, patches = self.args
        info = torch.utils.data.get_worker_info()
        torch.set_num_threads(1)
        rng = random.Random(seed * 1000 + (info.id if info else 0))
        skipped = 0

        def one(pool, where):
            """(an example of `pool`, whether it is a text line, its record), drawn until its ids are all kept."""
            nonlocal skipped
            while True:
                record = rng.choice(pool)
                e = encode_line(processor, record, where, "stage")
                if kept is None or bool(torch.isin(e.inputs.input_ids, kept).all()):
                    return e, "messages" not in record, record
                skipped += 1

        while True:
            examples = [one(train, base) for _ in range(n - n_mix)] + [one(mix, mix_base) for _ in range(n_mix)]
            targets = None
            if patches:  # one picture an example at most, in batch order: the image tokens' order
                targets = torch.cat([patch_targets(r, e.inputs.image.position_ids, SIZE)
                                     for e, _, r in examples if e.inputs.image is not None] or
                                    [torch.zeros(0, 2, dtype=torch.long)])
            yield (collate([e for e, _, _ in examples], 0), torch.tensor([t for _, t, _ in examples]), skipped,
                   targets)


@torch.no_grad()
def exact_match(model, processor, held: list[dict], base: Path, batch: int = 64) -> dict[str, float]:
    """Per kind, the share of held-out items whose every label token is the argmax where predicted."""
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.labels import IGNORE
    from unigemma.finetune.loss import hidden_states

    right: dict[str, list[bool]] = {}
    for a in range(0, len(held), batch):
        part = held[a:a + batch]
        b = collate([encode_line(processor, r, base, r["id"]) for r in part], 0)
        h = hidden_states(model, b.inputs)
        labels = b.labels.to(h.device)
        for row, r in enumerate(part):
            at = (labels[row, 1:] != IGNORE).nonzero().flatten()
            pred = model.output(h[row, at]).argmax(-1)
            right.setdefault(r["kind"], []).append(bool((pred == labels[row, at + 1]).all()))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(right.items())}


@torch.no_grad()
def reading_accuracy(model, processor, reader, held: list[dict], base: Path, batch: int = 64) -> dict | None:
    """The patch heads on held-out pictures: shape and colour accuracy over their object patches."""
    from bench.mini_patch_read import patch_targets
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.loss import hidden_states

    pictures = [r for r in held if (r.get("meta") or {}).get("spots")]
    right, n = [0.0, 0.0], 0
    for a in range(0, len(pictures), batch):
        examples = [encode_line(processor, r, base, r["id"]) for r in pictures[a:a + batch]]
        b = collate(examples, 0)
        hidden_states(model, b.inputs)
        targets = torch.cat([patch_targets(r, e.inputs.image.position_ids, SIZE)
                             for r, e in zip(pictures[a:a + batch], examples)])
        shape, colour, k = reader.accuracy(b.inputs.mm_token_type_ids, targets)
        right, n = [right[0] + shape * k, right[1] + colour * k], n + k
    return {"shape": round(right[0] / n, 3), "colour": round(right[1] / n, 3), "patches": n} if n else None


def stage_loss(model, h: torch.Tensor, labels: torch.Tensor, is_text: torch.Tensor,
               text_weight: float | None) -> torch.Tensor:
    """The mean label-token loss (text_weight None: every token alike, as the trainer's), or the
    text lines' mean counting `text_weight` of it and the conversations' mean the rest: a replay
    paragraph has ~70 label tokens to an answer's ~3, so by tokens the text outweighs the media."""
    from unigemma.finetune.loss import label_loss

    if text_weight is None or bool(is_text.all()) or not bool(is_text.any()):
        total, n = label_loss(model, h, labels)
        return total / max(n, 1)
    on = is_text.to(h.device)
    text, n_text = label_loss(model, h[on], labels[is_text])
    media, n_media = label_loss(model, h[~on], labels[~is_text])
    return text_weight * text / max(n_text, 1) + (1 - text_weight) * media / max(n_media, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a mini checkpoint directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/mini_gpu"), help="where the pictures are drawn")
    p.add_argument("--seconds", type=float, default=300, help="training time budget (evaluations excluded)")
    p.add_argument("--kinds", default=",".join(DRAWN), help="the kinds drawn (comma-separated subset)")
    p.add_argument("--per-kind", type=int, default=6000)
    p.add_argument("--heldout", type=int, default=200, help="held-out items of each scored kind")
    p.add_argument("--fresh", type=int, default=100,
                   help="new items of the training axes (seed + 1) of each scored kind, scored beside the held-out")
    p.add_argument("--text-weight", type=float, default=None, metavar="W",
                   help="the mix's text lines count W of the loss, the conversations 1 - W (default: by tokens)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mix", type=Path, default=None)
    p.add_argument("--mix-share", type=float, default=0.25)
    p.add_argument("--text-ids", type=Path, default=None, help="JSON token-id lists of English for --keep-text")
    p.add_argument("--keep-text", type=float, default=0.01,
                   help="with --text-ids: the share of text's input energy the adapter may reach (bench/mini_keep_text.py)")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--full-lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=float, default=90, help="seconds of training between evaluations")
    p.add_argument("--free", type=int, default=0, metavar="N",
                   help="N more training items of one shape in an unnamed random fill (bench/mmdata/free_shapes.py)")
    p.add_argument("--read-weight", type=float, default=0.0,
                   help="weight of the per-patch shape and colour heads' loss (bench/mini_patch_read.py); 0: none")
    p.add_argument("--read-layer", type=int, default=5, help="the heads read the image tokens after this many layers")
    p.add_argument("--read-lr", type=float, default=1e-3)
    p.add_argument("--distill", type=int, default=0, metavar="N",
                   help="N rows a batch of text under KL to the start model (bench/mini_self_distill.py); "
                        "the mix's text lines then leave the cross-entropy")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--teacher", type=Path, default=None,
                   help="with --distill: the checkpoint whose text distributions are matched (default: --model's)")
    p.add_argument("--distill-length", type=int, default=128, help="tokens a distilled row at most")
    p.add_argument("--sample-text", type=int, default=256,
                   help="with --distill: continuations the start model writes from the paragraphs' first words")
    p.add_argument("--prose-tokens", type=int, default=0, help="measure the prose perplexity on this many tokens")
    p.add_argument("--extra-held", type=Path, default=None, help="more held-out lines (jsonl) scored at every evaluation")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(DRAWN):
        p.error(f"--kinds: a subset of {','.join(DRAWN)}")
    if not 0 <= args.keep_text < 1:
        p.error(f"--keep-text {args.keep_text}: the share of text's energy left in reach, in [0, 1)")
    if args.text_weight is not None and not 0 <= args.text_weight <= 1:
        p.error("--text-weight must be in [0, 1]")
    if args.mix is not None and not 0 < args.mix_share < 1:
        p.error("--mix-share must be in (0, 1)")
    if args.teacher is not None and not (args.teacher / "config.json").is_file():
        p.error(f"--teacher {args.teacher}: no config.json")
    if args.distill and args.mix is None:
        p.error("--distill needs --mix (its text lines are the paragraphs distilled)")
    if not 0 <= args.read_weight or args.read_weight and not 1 <= args.read_layer <= 18:
        p.error("--read-weight must be >= 0 and --read-layer in 1..18")
    if min(args.distill, args.sample_text, args.prose_tokens, args.free) < 0 or args.distill_length < 8:
        p.error("--distill, --sample-text, --prose-tokens and --free must be >= 0, --distill-length >= 8")
    for name in ("mix", "text_ids", "extra_held"):
        if getattr(args, name) is not None and not getattr(args, name).is_file():
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: not a file")
    if min(args.per_kind, args.batch_size, args.lora_r, args.workers) < 1 or min(args.heldout, args.fresh) < 0:
        p.error("--per-kind, --batch-size, --lora-r and --workers must be >= 1, --heldout and --fresh >= 0")
    if not args.seconds > 0 or not args.eval_every > 0:
        p.error("--seconds and --eval-every must be > 0")

    import unigemma
    from bench import mini_keep_text as keep_text
    from bench.mini_reader_probe import save_stage
    from unigemma.finetune.full import make_trainable, resolve
    from unigemma.finetune.loss import hidden_states
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig
    from unigemma.lora.inject import lora_modules

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()
    train, held, fresh = draw_items(args.work, kinds, args.per_kind, args.heldout, args.fresh, args.seed, args.workers,
                                    args.free)
    mix = [json.loads(x) for x in args.mix.read_text(encoding="utf-8").splitlines() if x.strip()] if args.mix else []
    paragraphs = [r["text"] for r in mix if "messages" not in r] if args.distill else []
    mix = [r for r in mix if "messages" in r] if args.distill else mix
    extra = ([json.loads(x) for x in args.extra_held.read_text(encoding="utf-8").splitlines() if x.strip()]
             if args.extra_held else [])
    drawn = time.time() - t_start

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 products, float32 weights and sums
    torch.backends.cudnn.allow_tf32 = True
    gemma = unigemma.load(args.model, dtype="float32", device=device, fast=False, exact=True)
    model, processor = gemma.model, gemma.processor()
    kept_file = args.model / "kept.json"
    kept = torch.tensor(json.loads(kept_file.read_text())) if kept_file.is_file() else None
    teacher, pool = None, []
    if args.distill:
        from bench import mini_self_distill as distill

        teacher = (distill.frozen_copy(model) if args.teacher is None else
                   distill.frozen(unigemma.load(args.teacher, dtype="float32", device=device, fast=False,
                                                exact=True).model))
        pool = [[2] + gemma.tokenizer.encode(t) for t in paragraphs]
        pool = [r for r in pool if kept is None or bool(torch.isin(torch.tensor(r), kept).all())]
        t0 = time.time()
        pool += distill.sample(teacher, [r[:6] for r in pool if len(r) >= 6][:args.sample_text],
                               args.distill_length, seed=args.seed)
        sampled = time.time() - t0
    prose_ids = None
    if args.prose_tokens:
        from bench.mini_quality import perplexity  # on the model's device
        from bench.quant_quality import prose

        prose_ids = prose(args.prose_tokens, gemma.tokenizer)
    lora = LoraConfig(r=args.lora_r, alpha=2 * args.lora_r)
    prepare(model, lora, args.seed)
    adapter = [q for q in model.parameters() if q.requires_grad]
    vision = make_trainable(resolve(model, "model.embed_vision"))
    modules = lora_modules(model)
    bases = {}
    if args.text_ids is not None:
        texts = json.loads(args.text_ids.read_text())
        if kept is not None:
            texts = [t for t in texts if bool(torch.isin(torch.tensor(t), kept).all())]
        cov = keep_text.text_covariance(model, modules, texts, len(model.text.layers))
        bases = keep_text.text_subspaces(cov, args.keep_text)
        keep_text.project_(modules, bases)
    groups = [{"params": vision, "lr": args.full_lr}, {"params": adapter, "lr": args.lr}]
    reader = None
    if args.read_weight:
        from bench.mini_patch_read import PatchReader

        reader = PatchReader(model, args.read_layer)
        groups.append({"params": list(reader.parameters()), "lr": args.read_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    n_mix = round(args.mix_share * args.batch_size) if mix else 0
    data = Batches(processor, train, args.work, mix, args.mix.parent if args.mix else None, args.batch_size, n_mix,
                   kept, args.seed, patches=reader is not None)
    loader = iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                              persistent_workers=True))
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.jsonl", "a", encoding="utf-8")

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    def report(step, losses, trained, skipped):
        model.eval()
        if reader is not None:
            reader.eval()
        line = {"step": step, "trained_seconds": round(trained), "wall_seconds": round(time.time() - t_start),
                "train_loss": mean([x[0] for x in losses]), "read_loss": mean([x[1] for x in losses if x[1] is not None]),
                "distill_kl": mean([x[2] for x in losses if x[2] is not None]),
                "exact_match": exact_match(model, processor, held, args.work),
                "fresh_exact_match": exact_match(model, processor, fresh, args.work / "fresh") if fresh else None,
                "extra_exact_match": exact_match(model, processor, extra, args.extra_held.parent) if extra else None,
                "reading_heldout": reading_accuracy(model, processor, reader, held, args.work) if reader else None,
                "prose_perplexity": round(perplexity(model, prose_ids), 3) if prose_ids else None,
                "skipped_examples_one_worker": skipped,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        if step:  # bfloat16: each file under the 16 MiB a borrowed machine hands back
            save_stage(model, lora, args.out, torch.bfloat16)
        model.train()
        if reader is not None:
            reader.train()
        print(json.dumps(line), flush=True)
        log.write(json.dumps(line) + "\n")
        log.flush()

    print(json.dumps({"train_conversations": len(train), "heldout": len(held), "fresh": len(fresh), "mix": len(mix),
                      "draw_seconds": round(drawn), "distilled_rows": len(pool),
                      "sample_seconds": round(sampled, 1) if args.distill else None,
                      "kept_text_dims": {k: v.shape[1] for k, v in list(bases.items())[:3]},
                      "adapter_params": sum(q.numel() for q in adapter), "vision_params": sum(q.numel() for q in vision)}),
          flush=True)
    report(0, [], 0, 0)
    step, trained, losses, last_eval, skipped = 0, 0.0, [], 0.0, 0
    rng = random.Random(args.seed)
    while trained < args.seconds:
        t0 = time.time()
        batch, is_text, skipped, targets = next(loader)
        step += 1
        frac = trained / args.seconds
        scale = min(1.0, step / 30) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * scale
        loss = stage_loss(model, hidden_states(model, batch.inputs), batch.labels, is_text, args.text_weight)
        parts = [float(loss.detach()), None, None]
        if reader is not None:
            read = reader.loss(batch.inputs.mm_token_type_ids, targets)
            parts[1] = float(read.detach())
            loss = loss + args.read_weight * read
        if teacher is not None:
            kl = distill.kl_loss(model, teacher, *distill.batch_rows(pool, args.distill, args.distill_length, rng))
            parts[2] = float(kl.detach())
            loss = loss + args.distill_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bases:
            keep_text.project_(modules, bases)
        losses.append(parts)
        trained += time.time() - t0
        if trained - last_eval >= args.eval_every or trained >= args.seconds:
            report(step, losses, trained, skipped)
            losses, last_eval = [], trained
    log.close()


if __name__ == "__main__":
    main()
