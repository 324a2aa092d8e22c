"""One question-answer item of a given kind: its media drawn or synthesized, its labels.

An item's randomness comes only from (seed, split, kind, index), so items do not depend on
how many others are made, and the same arguments give the same bytes. Each item records in
`meta` every value it used on the held-out axes (colour x shape pairs, font, voice, tone
frequencies); `generate.check_disjoint` proves the two splits share none of them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import pictures, sounds
from .vocab import COLOURS, DIGITS, HIGH_HZ, KINDS, LOW_HZ, WORDS, fonts, pairs, tone_grid, voices

QUESTIONS = {
    "colour": ("What colour is the {shape}?", "Which colour is the {shape}? Answer with one word."),
    "shape": ("What shape is the {colour} one?", "Name the shape that is {colour}."),
    "count": ("How many shapes are there?", "Count the shapes. Answer with a number."),
    "position": ("Where is the shape: left, right, top or bottom?", "Is the shape at the left, right, top or bottom?"),
    "word": ("What is written in the picture?", "Read the text in the image."),
    "description": ("Describe the picture in one sentence.", "What does the picture show? One sentence."),
    "digit": ("Which digit is spoken?", "What digit do you hear? Answer with a numeral."),
    "spoken_word": ("Which word is spoken?", "Transcribe the audio."),
    "number": ("Transcribe the number that is spoken.", "What number is said? Answer with digits."),
    "beeps": ("How many beeps are there?", "Count the beeps. Answer with a number."),
    "pitch": ("Is the tone high or low?", "Is this beep high or low?"),
    "match": ("Is the shape the colour that is spoken? Answer yes or no.",
              "Does the spoken colour match the shape's colour? Answer yes or no."),
}
SIDES = ("left", "right", "top", "bottom")


@dataclass
class Item:
    id: str
    split: str
    kind: str
    question: str
    answer: str
    media: list[tuple[str, str]] = field(default_factory=list)  # (type, path relative to the jsonl)
    meta: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict:
        """The jsonl line: the trainer reads `messages`; id / kind / answer / meta label it."""
        parts = [{"type": t, t: p} for t, p in self.media] + [{"type": "text", "text": self.question}]
        return {"id": self.id, "kind": self.kind, "answer": self.answer, "meta": self.meta,
                "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": self.answer}]}


def _rngs(seed: int, split: str, kind: str, index: int) -> tuple[random.Random, np.random.Generator]:
    key = hashlib.sha256(f"{seed}/{split}/{kind}/{index}".encode()).digest()
    return random.Random(key), np.random.default_rng(list(key))


@dataclass(frozen=True)
class Voicing:
    """How a training item's speech is drawn; the held-out split ignores both.
    wide: vocab.WIDE_TRAIN_VOICES instead of TRAIN_VOICES. speed: (lo, hi), each clip resampled to
    play a uniform draw of that many times faster, its pitch and formants as many times higher
    (speed perturbation, Ko et al. 2015: one synthesizer voice becomes a range of vocal tracts)."""
    wide: bool = False
    speed: tuple[float, float] | None = None


def _voice(rng: random.Random, split: str, voicing: Voicing = Voicing()) -> dict:
    v = {"voice": rng.choice(voices(split, voicing.wide)), "wpm": rng.randint(120, 210), "pitch": rng.randint(25, 75)}
    if voicing.speed and split == "train":  # drawn only then, so every other item keeps its bytes
        v["speed"] = round(rng.uniform(*voicing.speed), 3)
    return v


def _say(text: str, v: dict, rng, np_rng) -> np.ndarray:
    wave = sounds.speak(text, v["voice"], v["wpm"], v["pitch"])
    return sounds.finish(sounds.change_speed(wave, v.get("speed", 1.0)), rng, np_rng)


def _shapes(rng, split, n, distinct):
    """n (colour, shape) pairs of the split, distinct on 'shape' or 'colour' (or neither)."""
    pool = pairs(split)
    for _ in range(1000):
        got = [rng.choice(pool) for _ in range(n)]
        key = {"shape": 1, "colour": 0}.get(distinct)
        if key is None or len({p[key] for p in got}) == n:
            return got
    raise RuntimeError(f"cannot draw {n} pairs distinct on {distinct}")


def _picture(rng, chosen, size, spots=None):
    spots = spots or pictures.layout(rng, len(chosen), size, (0.12, 0.2) if len(chosen) > 1 else (0.18, 0.3))
    img = pictures.shapes_picture(rng, [(c, s, x, y, r) for (c, s), (x, y, r) in zip(chosen, spots)], size)
    return img, spots


@dataclass
class Made:
    """What one kind's builder returns: the answer, its media (either may be None), the
    question's fill-ins."""
    answer: str
    image: Any = None
    wave: np.ndarray | None = None
    fmt: dict[str, str] = field(default_factory=dict)


def _shapes_item(kind, split, rng, np_rng, size, meta, voicing=Voicing()) -> Made:
    n = {"colour": rng.randint(1, 3), "shape": rng.randint(1, 3), "count": rng.randint(1, 4),
         "description": rng.randint(1, 2)}.get(kind, 1)
    chosen = _shapes(rng, split, n, {"colour": "shape", "shape": "colour", "description": "shape"}.get(kind))
    meta["pairs"] = [list(p) for p in chosen]
    spots = answer = None
    if kind == "position":
        side = rng.choice(SIDES)
        r = rng.uniform(0.12, 0.2) * size
        along = rng.uniform(0.4, 0.6) * size  # the side's middle band: one answer only
        near = rng.uniform(r + 2, 0.3 * size)
        x, y = {"left": (near, along), "right": (size - near, along),
                "top": (along, near), "bottom": (along, size - near)}[side]
        spots, answer = [(x, y, r)], side
    if kind == "description" and n == 2:  # left-to-right order must be unambiguous
        for _ in range(1000):
            spots = pictures.layout(rng, 2, size, (0.12, 0.2))
            if abs(spots[0][0] - spots[1][0]) > 0.25 * size:
                break
    img, spots = _picture(rng, chosen, size, spots)
    meta["spots"] = [[round(v, 1) for v in spot] for spot in spots]  # (cx, cy, r) px, for checks and analysis
    made = Made(answer, img)
    if kind == "colour":
        target = rng.randrange(n)
        made.fmt["shape"] = "shape" if n == 1 else chosen[target][1]
        made.answer = chosen[target][0]
    elif kind == "shape":
        target = rng.randrange(n)
        made.fmt["colour"] = chosen[target][0]
        made.answer = chosen[target][1]
    elif kind == "count":
        made.answer = str(n)
    elif kind == "description":
        order = sorted(range(n), key=lambda k: spots[k][0])
        phrases = [f"{'an' if chosen[k][0][0] in 'aeiou' else 'a'} {chosen[k][0]} {chosen[k][1]}" for k in order]
        made.answer = " and ".join(phrases).capitalize() + "."
    elif kind == "match":  # the picture's one shape, and a colour spoken: the same or another
        same = rng.random() < 0.5
        spoken = chosen[0][0] if same else rng.choice([c for c in COLOURS if c != chosen[0][0]])
        v = _voice(rng, split, voicing)
        meta.update(v, spoken=spoken)
        made.wave = _say(spoken, v, rng, np_rng)
        made.answer = "yes" if same else "no"
    return made


def _text_item(kind, split, rng, np_rng, size, meta, voicing=Voicing()) -> Made:
    text = rng.choice(WORDS) if rng.random() < 0.6 else str(rng.randint(0, 9999))
    meta["font"] = rng.choice(fonts(split))
    return Made(text, pictures.text_picture(rng, text, meta["font"], size))


def _speech_item(kind, split, rng, np_rng, size, meta, voicing=Voicing()) -> Made:
    v = _voice(rng, split, voicing)
    meta.update(v)
    if kind == "digit":
        d = rng.randrange(10)
        text, answer = DIGITS[d], str(d)
    elif kind == "number":
        text = answer = str(rng.randint(10, 999))  # espeak-ng reads numerals as numbers
    else:
        text = answer = rng.choice(WORDS)
    return Made(answer, wave=_say(text, v, rng, np_rng))


def _tone_item(kind, split, rng, np_rng, size, meta, voicing=Voicing()) -> Made:
    high = rng.random() < 0.5
    hz = rng.choice(tone_grid(split, HIGH_HZ if high else LOW_HZ))
    count = rng.randint(1, 5) if kind == "beeps" else rng.randint(1, 3)
    meta.update(hz=hz, count=count)
    wave = sounds.finish(sounds.beeps(count, hz, rng), rng, np_rng, snr_db=(12, 35))
    return Made(str(count) if kind == "beeps" else ("high" if high else "low"), wave=wave)


BUILDERS = {"colour": _shapes_item, "shape": _shapes_item, "count": _shapes_item, "position": _shapes_item,
            "description": _shapes_item, "match": _shapes_item, "word": _text_item, "digit": _speech_item,
            "spoken_word": _speech_item, "number": _speech_item, "beeps": _tone_item, "pitch": _tone_item}
assert set(BUILDERS) == set(KINDS)


def make(kind: str, split: str, index: int, seed: int, out: Path, size: int, voicing: Voicing = Voicing()) -> Item:
    """Build item `index` of `kind` for `split`, writing its media under out/media/split/kind/;
    a training item's speech drawn as `voicing` says."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng, np_rng = _rngs(seed, split, kind, index)
    meta: dict[str, Any] = {}
    made = BUILDERS[kind](kind, split, rng, np_rng, size, meta, voicing)
    rel, stem = Path("media") / split / kind, f"{index:05d}"
    (out / rel).mkdir(parents=True, exist_ok=True)
    media = []
    if made.image is not None:
        made.image.save(out / rel / f"{stem}.png", format="PNG", optimize=False)
        media.append(("image", (rel / f"{stem}.png").as_posix()))
    if made.wave is not None:
        sounds.write_wav(out / rel / f"{stem}.wav", made.wave)
        media.append(("audio", (rel / f"{stem}.wav").as_posix()))
    question = rng.choice(QUESTIONS[kind]).format(**made.fmt)
    return Item(f"{split}-{kind}-{stem}", split, kind, question, made.answer, media, meta)
