"""Write the training and held-out data sets (jsonl for `unigemma finetune` + media files).

    python -m bench.mmdata.generate --out data/mm --train-per-kind 2000 --heldout-per-kind 200

writes out/train.jsonl, out/heldout.jsonl, out/media/<split>/<kind>/*.png|wav and
out/manifest.json (arguments, counts per kind, and the held-out axes' values). Each jsonl line
is `{"id", "kind", "answer", "meta", "messages"}`: the trainer reads `messages` (media paths
relative to the jsonl); `kind` and `answer` are for bench/mmdata/score.py. Fixed seed → the
same bytes on every run (espeak-ng, Pillow and libsndfile versions held equal).

Picture size: Gemma 4's processor scales every picture to its soft-token budget (70 at the
least: a square becomes 384 x 384 px, 64 tokens) whatever its size, so --image-size only sets
how finely shapes and text are drawn. 144 px is 3 x 3 patches of 48: 9 tokens for a model
whose processor keeps small pictures as they are (issue 22's mini family may add that budget).

`--wide-voices`: training items speak in vocab.WIDE_TRAIN_VOICES (125 voices instead of 24; the
held-out split's items are the same bytes either way). `--speed-perturb 0.85,1.15`: each training
clip of speech resampled to play 0.85-1.15 times as fast, its pitch and formants as much higher, so
one voice becomes many vocal tracts (the held-out split again untouched).

Needs espeak-ng and the fonts of vocab.FONT_PACKAGES (Debian: apt-get install -y espeak-ng
fonts-dejavu-core fonts-liberation fonts-freefont-ttf). Before writing, the held-out split is
proven disjoint from training on every held-out axis (`check_disjoint`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
from pathlib import Path

from . import items, sounds, vocab

# meta key -> the axis it belongs to; pairs are lists of [colour, shape]
AXES = ("pairs", "font", "voice", "hz")


def axis_values(records: list[dict]) -> dict[str, set]:
    """Every value each held-out axis takes over the records (as read back from jsonl)."""
    seen: dict[str, set] = {a: set() for a in AXES}
    for r in records:
        m = r["meta"]
        seen["pairs"].update(tuple(p) for p in m.get("pairs", ()))
        for a in ("font", "voice", "hz"):
            if a in m:
                seen[a].add(m[a])
    return seen


def check_disjoint(train: list[dict], heldout: list[dict]) -> None:
    """AssertionError unless no held-out-axis value of a held-out item appears in training, and
    every held-out item's values are the held-out pools' own."""
    a, b = axis_values(train), axis_values(heldout)
    for axis in AXES:
        common = a[axis] & b[axis]
        assert not common, f"held-out split leaks into training on {axis}: {sorted(common)[:5]}"
    assert b["pairs"] <= vocab.HELDOUT_PAIRS and not a["pairs"] & vocab.HELDOUT_PAIRS
    assert b["font"] <= set(vocab.HELDOUT_FONTS) and not a["font"] & set(vocab.HELDOUT_FONTS)
    assert b["voice"] <= set(vocab.HELDOUT_VOICES) and not a["voice"] & set(vocab.HELDOUT_VOICES)
    held_hz = set(vocab.tone_grid("heldout", vocab.LOW_HZ) + vocab.tone_grid("heldout", vocab.HIGH_HZ))
    assert b["hz"] <= held_hz and not a["hz"] & held_hz


def tool_versions() -> dict[str, str]:
    """What the bytes depend on besides the seed: the same versions give the same files."""
    import PIL
    import soundfile
    import soxr

    out = {"pillow": PIL.__version__, "libsndfile": soundfile.__libsndfile_version__, "soxr": soxr.__version__}
    if sounds.has_espeak():
        out["espeak-ng"] = subprocess.run([sounds.ESPEAK, "--version"], capture_output=True, text=True).stdout.strip()
    return out


def build(out: Path, seed: int, counts: dict[str, dict[str, int]], size: int,
          wide_voices: bool = False, speed: tuple[float, float] | None = None) -> dict[str, list[dict]]:
    """counts: split -> kind -> number of items. Returns split -> records (also written).
    `wide_voices`: training items speak in vocab.WIDE_TRAIN_VOICES; `speed`: their speech
    speed-perturbed (items.Voicing)."""
    out.mkdir(parents=True, exist_ok=True)
    kinds = {k for per_kind in counts.values() for k, n in per_kind.items() if n}
    if kinds & {"digit", "spoken_word", "number", "match"}:
        wanted = vocab.voices("train", wide_voices) + vocab.HELDOUT_VOICES
        missing = sounds.missing_voices(wanted) if sounds.has_espeak() else ["espeak-ng"]
        if missing:
            raise SystemExit(f"espeak-ng or its voices missing: {missing} (Debian: apt-get install -y espeak-ng)")
    if "word" in kinds and vocab.missing_fonts():
        raise SystemExit(f"fonts missing: {vocab.missing_fonts()} (Debian: apt-get install -y {vocab.FONT_PACKAGES})")
    records = {split: [items.make(kind, split, i, seed, out, size, items.Voicing(wide_voices, speed)).record()
                       for kind, n in per_kind.items() for i in range(n)]
               for split, per_kind in counts.items()}
    check_disjoint(records.get("train", []), records.get("heldout", []))
    for split, recs in records.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    manifest = {"seed": seed, "image_size": size, "wide_voices": wide_voices, "speed": speed, "tools": tool_versions(),
                "counts": {s: dict(Counter(r["kind"] for r in recs)) for s, recs in records.items()},
                "heldout_axes": {"pairs": sorted(map(list, vocab.HELDOUT_PAIRS)), "fonts": list(vocab.HELDOUT_FONTS),
                                 "voices": list(vocab.HELDOUT_VOICES),
                                 "hz": list(vocab.tone_grid("heldout", vocab.LOW_HZ) + vocab.tone_grid("heldout", vocab.HIGH_HZ))}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return records


def speed_range(text: str) -> tuple[float, float]:
    """'0.85,1.15' -> (0.85, 1.15), for --speed-perturb."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two speeds, LO,HI (e.g. 0.85,1.15)") from None
    if not 0.5 <= lo <= hi <= 2.0:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0.5 <= LO <= HI <= 2")
    return lo, hi


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-kind", type=int, default=2000)
    p.add_argument("--heldout-per-kind", type=int, default=200, help="the issue asks for >= 200 per kind")
    p.add_argument("--kinds", default=",".join(vocab.KINDS), help="comma-separated subset of " + ",".join(vocab.KINDS))
    p.add_argument("--image-size", type=int, default=144, help="pictures are square, this many pixels a side")
    p.add_argument("--wide-voices", action="store_true",
                   help="training items speak in more voices (vocab.WIDE_TRAIN_VOICES; the held-out split's unchanged)")
    p.add_argument("--speed-perturb", type=speed_range, metavar="LO,HI",
                   help="training speech resampled to play LO-HI times faster (pitch and formants as much higher)")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in vocab.KINDS]
    if bad:
        p.error(f"unknown kinds {bad}; kinds are {','.join(vocab.KINDS)}")
    if min(args.train_per_kind, args.heldout_per_kind) < 0:
        p.error("counts must be >= 0")
    if args.image_size < 48:
        p.error("--image-size must be at least 48 (one patch)")
    counts = {"train": dict.fromkeys(kinds, args.train_per_kind), "heldout": dict.fromkeys(kinds, args.heldout_per_kind)}
    recs = build(args.out, args.seed, counts, args.image_size, args.wide_voices, args.speed_perturb)
    print(json.dumps({s: len(r) for s, r in recs.items()}))


if __name__ == "__main__":
    main()
