"""Can the mini's audio embedder and the decoder's first layers learn to hear a spoken digit or word?

    python -m bench.mini_audio_probe --model CHECKPOINT --task digit --layers 5 [--steps 400]
        [--batch-size 16] [--full-lr 1e-3] [--lr 5e-4] [--decay] [--eval-n 200] [--eval-every 50] [--keep-text EPS]
        [--wide-voices] [--speed-perturb LO,HI] [--save DIR]

The audio twin of bench/mini_reader_probe.py. The shipped mini names a held-out spoken digit 23%
of the time and a spoken word 2%, no better on clips of its own training voices (README,
Thirteenth look): it has not learned to hear them, where a picture's shape needed ~5,000 pictures
of that question alone before its first layers began to read it (Eighth look). This asks the
question of the audio block alone: a clip (bench/mmdata's: espeak-ng, the split's voices, rates
and pitches, silence and white noise added) becomes 40 ms frames through the checkpoint's audio
embedder (a scale-free RMSNorm, one Linear), goes through the decoder's first `--layers` layers
(causal, as the model runs audio), and a throw-away head (BatchNorm, Linear) on the mean and max
of the block's hidden states names the digit (10 classes), the word (bench/mmdata's 102),
`--task both` either (112 classes, half the clips digits), or `--task beeps` how many beeps a
tone clip holds (1-5, the held-out split's pitches unseen).
Trained: the audio embedder in full and LoRA (r 16) on those layers; every step's clips are
fresh (synthesized then, none heard twice), in training voices (or pitches) only
(`--wide-voices`: bench/mmdata/vocab.py's wider training pool, still none held out;
`--speed-perturb`: each clip resampled faster or slower, bench/mmdata/items.py `Voicing`). Scored every
`--eval-every` steps on fixed clips it never trained on: unseen voices (the held-out split's
accents and variants) and training voices; and the whole model's prose perplexity. One JSON line
per evaluation. `--keep-text` and `--save` as bench/mini_reader_probe.py's; `--anchor-text W` adds W x
the first layers' drift on English from the start model's output to the loss (bench/mini_keep_text.py
`TextAnchor`: what the later layers see of text held where it was, so the prose with it).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from bench.mmdata.items import Voicing
from bench.mmdata.vocab import DIGITS, WORDS

# what is said (or, "beeps", how many beeps sound); the label is its index. "both": a digit or a
# word, half the clips each (the two kinds the whole model is asked about; by count alone the 10
# digits would be 1 clip in 11)
TASKS = {"digit": DIGITS, "word": WORDS, "both": DIGITS + WORDS, "beeps": ("1", "2", "3", "4", "5")}


def clip(rng: random.Random, np_rng: np.random.Generator, task: str, split: str,
         voicing: Voicing = Voicing()) -> tuple[np.ndarray, int]:
    """(16 kHz samples, label): one clip as bench/mmdata/items.py makes a `digit` / `spoken_word`
    / `beeps` item of `split` (its voices and tone pitches: the held-out split's are all unseen in
    training)."""
    from bench.mmdata.items import _say, _tone_item, _voice

    if task == "beeps":
        made = _tone_item("beeps", split, rng, np_rng, None, {})
        return made.wave, TASKS[task].index(made.answer)
    if task == "both":
        label = rng.randrange(len(DIGITS)) if rng.random() < 0.5 else len(DIGITS) + rng.randrange(len(WORDS))
    else:
        label = rng.randrange(len(TASKS[task]))
    return _say(TASKS[task][label], _voice(rng, split, voicing), rng, np_rng), label


def batch(rng: random.Random, np_rng: np.random.Generator, task: str, split: str,
          n: int, voicing: Voicing = Voicing()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frames [n, T, 640] zero-padded at the end, real [n, T] bool, labels [n]) of fresh clips."""
    from unigemma.processing.audio import preprocess_audio

    clips = [clip(rng, np_rng, task, split, voicing) for _ in range(n)]
    frames = [torch.as_tensor(preprocess_audio(w).input_features).float() for w, _ in clips]
    T = max(len(f) for f in frames)
    out, real = torch.zeros(n, T, frames[0].shape[-1]), torch.zeros(n, T, dtype=torch.bool)
    for i, f in enumerate(frames):
        out[i, :len(f)], real[i, :len(f)] = f, True
    return out, real, torch.tensor([y for _, y in clips])


class Hearer(nn.Module):
    """The audio embedder and the decoder's first `layers` layers on one audio block, then a head."""

    def __init__(self, model, layers: int, classes: int):
        super().__init__()
        from unigemma.inputs import AUDIO

        self.model, self.layers, self.audio = model, layers, AUDIO
        width = model.config.text.hidden_size
        # per feature over the batch, as the reader's head (a per-clip LayerNorm would let the
        # residual stream's few huge dimensions swamp the rest)
        self.head = nn.Sequential(nn.BatchNorm1d(2 * width, affine=False), nn.Linear(2 * width, classes))

    def forward(self, frames: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        from bench.mini_reader_probe import layer_outputs

        h = self.model.model.embed_audio(frames)  # [B, T, width], as embed_audio gathers them
        # audio is causal, so the zero frames padded after a clip never reach its real ones
        for h in layer_outputs(self.model, h, torch.full(h.shape[:2], self.audio), self.layers):
            pass
        m = real.unsqueeze(-1)
        mean = (h * m).sum(1) / m.sum(1)
        return self.head(torch.cat([mean, h.masked_fill(~m, float("-inf")).amax(1)], -1))


def main(argv: list[str] | None = None) -> None:
    from bench.mini_keep_text import project_
    from bench.mmdata.generate import speed_range
    from bench.mini_reader_probe import check_arguments, first_layers_adapter, load_probed, probe_arguments, \
        reporter, save_run, text_anchor, train
    from unigemma.finetune.full import make_trainable

    p = probe_arguments(__doc__, lr=5e-4)
    p.add_argument("--task", choices=sorted(TASKS), default="digit")
    p.add_argument("--wide-voices", action="store_true", help="train on bench/mmdata/vocab.py's wider voice pool")
    p.add_argument("--speed-perturb", type=speed_range, metavar="LO,HI",
                   help="training clips played LO-HI times faster (bench/mmdata/generate.py's option)")
    args = p.parse_args(argv)
    check_arguments(p, args)
    model, tokenizer, prose_ids = load_probed(args.model)

    torch.manual_seed(args.seed)
    lora, adapter, kept, bases = first_layers_adapter(model, tokenizer, args.layers, args.lora_r, args.seed,
                                                      args.keep_text)
    embedder = make_trainable({"model.embed_audio": model.model.embed_audio})
    hearer = Hearer(model, args.layers, len(TASKS[args.task]))
    opt = torch.optim.AdamW([{"params": embedder, "lr": args.full_lr},
                             {"params": adapter + list(hearer.head.parameters()), "lr": args.lr}],
                            weight_decay=0.0)

    evals = {split: batch(random.Random(f"{args.seed}/eval/{split}"), np.random.default_rng([args.seed, k]),
                          args.task, split, args.eval_n)
             for k, split in enumerate(("heldout", "train"), 1)}

    anchor = text_anchor(args, model, tokenizer)
    rng, np_rng = random.Random(f"{args.seed}/train"), np.random.default_rng([args.seed, 0])
    report = reporter("mini_audio_probe", args, bases, hearer, evals, "clips", "_voices_accuracy", model, prose_ids,
                      anchor, task=args.task, classes=len(TASKS[args.task]), chance=round(1 / len(TASKS[args.task]), 3))

    voicing = Voicing(args.wide_voices, args.speed_perturb)
    train(hearer, lambda: batch(rng, np_rng, args.task, "train", args.batch_size, voicing), opt,
          lambda: project_(kept, bases), args.steps, args.eval_every, report, anchor, args.decay)
    if args.save:
        save_run(model, lora, args.model, args.save)


if __name__ == "__main__":
    main()
