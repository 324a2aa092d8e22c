"""bench/mini_asr_peer.py: the spoken items' peer (PocketSphinx held to the answers) and the tally."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import soundfile

from bench.mini_asr_peer import CHOICES, hear, main, recognizer, tally
from bench.mmdata import sounds, vocab


def test_tally_counts_exact_matches_per_voice():
    records = [{"id": str(i), "answer": a, "meta": {"voice": v}}
               for i, (a, v) in enumerate([("red", "x"), ("bed", "x"), ("7", "y"), ("cat", "y")])]
    got = tally(records, {"0": "Red.", "1": "road", "2": "7", "3": ""})  # case and a full stop forgiven
    assert got == {"accuracy": 0.5, "by_voice": {"x": "1/2", "y": "1/2"}}


def test_each_kind_offers_the_answers_the_mini_is_scored_on():
    assert set(CHOICES["spoken_word"].values()) == set(vocab.WORDS)
    assert sorted(CHOICES["digit"].values()) == [str(d) for d in range(10)]


def test_wrong_arguments_are_named_before_any_work(tmp_path, capsys):
    only_pictures = tmp_path / "heldout.jsonl"
    only_pictures.write_text('{"id": "a", "kind": "colour", "answer": "red", "meta": {}, "messages": []}\n')
    for argv, named in ((["--data", str(tmp_path / "none.jsonl")], "not a file"),
                        (["--data", str(only_pictures), "--kinds", "colour"], "--kinds"),
                        (["--data", str(only_pictures), "--per-kind", "0"], "--per-kind"),
                        (["--data", str(only_pictures)], "no items of ['spoken_word', 'digit']")):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tmp_path / "no-model"), *argv])
        assert e.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is None,
                    reason="the peer is in the bench extra (pip install -e '.[bench]'), not in dev")
@pytest.mark.skipif(not sounds.has_espeak(), reason="espeak-ng missing (Debian: apt-get install -y espeak-ng)")
def test_the_peer_names_clear_speech_from_the_answers_only(tmp_path):
    heard = {}
    for kind, said in (("digit", "seven"), ("spoken_word", "banana")):
        decoder = recognizer(kind, tmp_path)
        wav = tmp_path / f"{said}.wav"
        wave = sounds.finish(sounds.speak(said, "en-us+m1", 140, 50), random.Random(0), np.random.default_rng(0),
                             snr_db=(40, 40))
        soundfile.write(wav, wave, sounds.RATE, subtype="PCM_16")
        heard[kind] = hear(decoder, wav)
        assert heard[kind] in CHOICES[kind]  # the grammar allows nothing else
    assert heard == {"digit": "seven", "spoken_word": "banana"}
