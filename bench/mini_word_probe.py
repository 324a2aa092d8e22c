"""Can the mini's image embedder and the decoder's first layers learn to read a written word in a font never seen?

    python -m bench.mini_word_probe --model CHECKPOINT --layers 5 [--steps 400] [--batch-size 16]
        [--full-lr 1e-3] [--lr 1e-3] [--eval-n 200] [--eval-every 50] [--keep-text EPS] [--save DIR]

The picture twin of bench/mini_audio_probe.py's word task, and bench/mini_reader_probe.py asked
for the written word instead of the shape. The shipped mini names 0.5% of the held-out split's
written words (README): nothing of it is learned, and no probe had asked whether this embedder
(one Dense over a 48 x 48 patch, no convolution) and the decoder's first layers can read a word
at all, in a font family the training never shows. A picture is drawn as bench/mmdata/items.py
draws a `word` item's (`pictures.text_picture`: one word of the data's vocabulary, as large as
fits, in a contrasting colour on a varied background, blurred now and then; 144 px, the recipe's
budget 70: 64 soft tokens), in a font of the split (training: DejaVu and Liberation faces;
held-out: the FreeFont family, never drawn in training), and the reader (the image embedder, the
first `--layers` layers with the image block bidirectional on sliding layers, a throw-away head
on the mean and max of the block's hidden states) names the word: 102 classes, chance 1%. The
whole model's item also asks for numbers (2 in 5 of them); a class head cannot, so this asks
the words only.

Trained: the image embedder in full and LoRA (r 16) on those layers; every step's pictures are
fresh, in training fonts only. Scored every `--eval-every` steps on fixed pictures it never trained
on, in the held-out fonts and in the training fonts; and the whole model's prose perplexity. One
JSON line per evaluation. `--keep-text` and `--save` as bench/mini_reader_probe.py's.
"""

from __future__ import annotations

import random

import torch

from bench.mini_reader_probe import SIZE, encode
from bench.mmdata import pictures
from bench.mmdata.vocab import WORDS, fonts


def draw(rng: random.Random, split: str) -> tuple:
    """(PIL picture of one written word, its index in WORDS, the font's file name) in a font of `split`."""
    label, font = rng.randrange(len(WORDS)), rng.choice(fonts(split))
    return pictures.text_picture(rng, WORDS[label], font, SIZE), label, font


def batch(rng: random.Random, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels [n, 64, 6912], positions [n, 64, 2], word indices [n]) of fresh pictures in `split`'s fonts."""
    return encode([draw(rng, split)[:2] for _ in range(n)])


def main(argv: list[str] | None = None) -> None:
    from bench.mini_keep_text import project_
    from bench.mini_reader_probe import Reader, check_arguments, first_layers_adapter, load_probed, \
        probe_arguments, reporter, save_run, text_anchor, train
    from unigemma.finetune.full import make_trainable

    p = probe_arguments(__doc__, lr=1e-3)
    args = p.parse_args(argv)
    check_arguments(p, args)
    model, tokenizer, prose_ids = load_probed(args.model)

    torch.manual_seed(args.seed)
    lora, adapter, kept, bases = first_layers_adapter(model, tokenizer, args.layers, args.lora_r, args.seed,
                                                      args.keep_text)
    embedder = make_trainable({"model.embed_vision": model.model.embed_vision})
    reader = Reader(model, args.layers, classes=len(WORDS))
    opt = torch.optim.AdamW([{"params": embedder, "lr": args.full_lr},
                             {"params": adapter + list(reader.head.parameters()), "lr": args.lr}],
                            weight_decay=0.0)
    evals = {split: batch(random.Random(f"{args.seed}/eval/{split}"), split, args.eval_n)
             for split in ("heldout", "train")}

    anchor = text_anchor(args, model, tokenizer)
    rng = random.Random(f"{args.seed}/train")
    report = reporter("mini_word_probe", args, bases, reader, evals, "pictures", "_fonts_accuracy", model, prose_ids,
                      anchor, classes=len(WORDS), chance=round(1 / len(WORDS), 3))

    train(reader, lambda: batch(rng, "train", args.batch_size), opt, lambda: project_(kept, bases), args.steps,
          args.eval_every, report, anchor, args.decay)
    if args.save:
        save_run(model, lora, args.model, args.save)


if __name__ == "__main__":
    main()
