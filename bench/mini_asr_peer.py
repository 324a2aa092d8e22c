"""How hard are the held-out spoken words? The mini against a speech recognizer made for the job.

    python -m bench.mini_asr_peer --model CHECKPOINT --data runs/mini7/data/heldout.jsonl
        [--kinds spoken_word,digit] [--per-kind 200]

The peer is PocketSphinx (CMU; `pip install -e '.[bench]'`), whose en-us acoustic model was trained
on human speech, so none of bench/mmdata's espeak-ng voices is in its training either. It is
asked the question the mini is: its search is held to the kind's answers by a JSGF grammar (the
102 words, or the ten digit names), so both pick one of the same choices. Both hear the same
clips in one run; one JSON line: each one's exact-match accuracy per kind and per voice, and the
mini's ratio to the peer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile
import torch

from bench.machine import machine
from bench.mmdata.predict import predict, select
from bench.mmdata.score import normalize, read_jsonl
from bench.mmdata.vocab import DIGITS, WORDS

# what each kind's grammar allows, and how a recognized word becomes the item's answer
CHOICES = {"spoken_word": {w: w for w in WORDS}, "digit": {w: str(i) for i, w in enumerate(DIGITS)}}


def recognizer(kind: str, folder: Path):
    """A PocketSphinx decoder held to `kind`'s words (their pronunciations from its own dictionary)."""
    from pocketsphinx import Decoder, get_model_path

    model = Path(get_model_path()) / "en-us"
    wanted, lines = set(CHOICES[kind]), []
    with open(model / "cmudict-en-us.dict", encoding="utf-8") as f:
        for line in f:
            word, *phones = line.split()
            if word in wanted:  # the first (main) pronunciation of each
                lines.append(f"{word} {' '.join(phones)}\n")
                wanted.discard(word)
    if wanted:
        raise SystemExit(f"not in PocketSphinx's dictionary: {sorted(wanted)}")
    (folder / f"{kind}.dict").write_text("".join(lines))
    grammar = f"#JSGF V1.0;\ngrammar {kind};\npublic <say> = {' | '.join(CHOICES[kind])} ;\n"
    (folder / f"{kind}.jsgf").write_text(grammar)
    return Decoder(hmm=str(model / "en-us"), dict=str(folder / f"{kind}.dict"), jsgf=str(folder / f"{kind}.jsgf"),
                   loglevel="FATAL")


def hear(decoder, wav: Path) -> str:
    wave, rate = soundfile.read(wav, dtype="int16")
    if rate != 16000:  # the model's rate, and bench/mmdata's
        raise SystemExit(f"{wav}: {rate} Hz, expected 16000")
    decoder.start_utt()
    decoder.process_raw(np.ascontiguousarray(wave).tobytes(), full_utt=True)
    decoder.end_utt()
    return decoder.hyp().hypstr.strip() if decoder.hyp() else ""


def tally(records: list[dict], answers: dict[str, str]) -> dict:
    """Exact-match accuracy, overall and per voice."""
    by_voice = defaultdict(lambda: [0, 0])
    for r in records:
        v = by_voice[r["meta"]["voice"]]
        v[0] += normalize(answers.get(r["id"], "")) == normalize(r["answer"])
        v[1] += 1
    right = sum(a for a, _ in by_voice.values())
    return {"accuracy": round(right / len(records), 4),
            "by_voice": {voice: f"{a}/{n}" for voice, (a, n) in sorted(by_voice.items())}}


def main(argv: list[str] | None = None) -> None:
    import unigemma

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a mini checkpoint (python -m unigemma.weights.mini)")
    p.add_argument("--data", type=Path, required=True, help="bench/mmdata's heldout.jsonl (or train.jsonl)")
    p.add_argument("--kinds", default="spoken_word,digit", help="comma-separated, of " + ",".join(CHOICES))
    p.add_argument("--per-kind", type=int, default=200)
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if bad := [k for k in kinds if k not in CHOICES]:
        p.error(f"--kinds: {bad} not among {sorted(CHOICES)}")
    if args.per_kind < 1:
        p.error("--per-kind must be at least 1")
    if not args.data.is_file():
        p.error(f"--data {args.data}: not a file (give bench/mmdata's heldout.jsonl or train.jsonl)")
    records = select(read_jsonl(args.data), args.per_kind, kinds)
    if none := [k for k in kinds if not any(r["kind"] == k for r in records)]:
        p.error(f"--data {args.data} has no items of {none}")
    if importlib.util.find_spec("pocketsphinx") is None:
        raise SystemExit("the peer needs pocketsphinx: pip install -e '.[bench]'")
    out = {"bench": "mini_asr_peer", **machine(torch.get_num_threads()), "model": args.model,
           "data": str(args.data),
           "peer": f"pocketsphinx {version('pocketsphinx')} en-us, a JSGF grammar of the answers"}
    t0 = time.perf_counter()
    mini = predict(unigemma.load(args.model, dtype="float32"), records, args.data)
    out["mini_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    peer = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            decoder, to_answer = recognizer(kind, Path(tmp)), CHOICES[kind]
            for r in (r for r in records if r["kind"] == kind):
                audio = next(c["audio"] for c in r["messages"][0]["content"] if c["type"] == "audio")
                peer[r["id"]] = to_answer.get(hear(decoder, args.data.parent / audio), "")
    out["peer_seconds"] = round(time.perf_counter() - t0, 1)
    for kind in kinds:
        recs = [r for r in records if r["kind"] == kind]
        m, q = tally(recs, mini), tally(recs, peer)
        out[kind] = {"n": len(recs), "mini": m, "peer": q,
                     "mini_over_peer": round(m["accuracy"] / q["accuracy"], 2) if q["accuracy"] else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
