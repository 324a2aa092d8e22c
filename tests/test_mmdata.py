"""The multimodal training / held-out data generator (bench/mmdata): same seed → same bytes, the
held-out split disjoint from training on its axes, answers consistent with what was drawn or
played, the files loadable by the fine-tuning trainer, and the per-kind scorer."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ beside tests/

from bench.mmdata import generate, sounds, vocab  # noqa: E402
from bench.mmdata.score import MISSING, confusion_table, normalize, prompts, read_jsonl, score, summary  # noqa: E402

HAS_ESPEAK = sounds.has_espeak() and not sounds.missing_voices(vocab.TRAIN_VOICES + vocab.HELDOUT_VOICES)
HAS_FONTS = not vocab.missing_fonts()
NEEDS_ESPEAK = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng or its voices missing (Debian: apt-get install -y espeak-ng)")
NEEDS_FONTS = pytest.mark.skipif(not HAS_FONTS, reason=f"fonts missing (Debian: apt-get install -y {vocab.FONT_PACKAGES})")
SPEECH = {"digit", "spoken_word", "number", "match"}
# kinds this machine can make: shapes and tones need only Pillow and numpy
KINDS = [k for k in vocab.KINDS if (HAS_ESPEAK or k not in SPEECH) and (HAS_FONTS or k != "word")]


def make(out, seed=0, n=3, kinds=KINDS, size=96):
    counts = {"train": dict.fromkeys(kinds, n), "heldout": dict.fromkeys(kinds, n)}
    return generate.build(out, seed, counts, size)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm")
    return out, make(out, n=4)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small):
    out, _ = small
    make(tmp_path / "again", n=4)
    a, b = files(out), files(tmp_path / "again")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    kinds = [k for k in ("colour", "beeps", "word", "digit") if k in KINDS]
    make(tmp_path / "other", seed=1, n=2, kinds=kinds)
    c = files(tmp_path / "other")
    media = [k for k in c if k.startswith("media/")]
    assert media and all(c[k] != a[k] for k in media)


@NEEDS_ESPEAK
@NEEDS_FONTS
def test_every_kind_made(small):
    _, recs = small
    for split in ("train", "heldout"):
        assert {r["kind"] for r in recs[split]} == set(vocab.KINDS)


def test_pools_split_on_every_heldout_axis():
    assert not set(vocab.TRAIN_PAIRS) & vocab.HELDOUT_PAIRS and len(vocab.HELDOUT_PAIRS) == 20
    # every colour and every shape is still seen in training; each shape has held-out colours
    assert {c for c, _ in vocab.TRAIN_PAIRS} == set(vocab.COLOURS) and {s for _, s in vocab.TRAIN_PAIRS} == set(vocab.SHAPES)
    assert {s for _, s in vocab.HELDOUT_PAIRS} == set(vocab.SHAPES)
    assert len(vocab.COLOURS) >= 10 and len(vocab.SHAPES) >= 8 and len(vocab.WORDS) >= 100
    assert not set(vocab.TRAIN_FONTS) & set(vocab.HELDOUT_FONTS)
    assert not set(vocab.TRAIN_VOICES) & set(vocab.HELDOUT_VOICES)
    # no accent and no variant of a held-out voice is heard in training
    assert not {v.split("+")[0] for v in vocab.TRAIN_VOICES} & {v.split("+")[0] for v in vocab.HELDOUT_VOICES}
    assert not {v.split("+")[1] for v in vocab.TRAIN_VOICES} & {v.split("+")[1] for v in vocab.HELDOUT_VOICES}
    for band in (vocab.LOW_HZ, vocab.HIGH_HZ):
        assert not set(vocab.tone_grid("train", band)) & set(vocab.tone_grid("heldout", band))


def test_wide_voices_add_training_voices_and_leave_the_heldout_split_alone(tmp_path):
    wide = set(vocab.WIDE_TRAIN_VOICES)
    assert set(vocab.TRAIN_VOICES) < wide and len(wide) >= 4 * len(vocab.TRAIN_VOICES)
    assert not {v.split("+")[0] for v in wide} & {v.split("+")[0] for v in vocab.HELDOUT_VOICES}
    assert not {v.split("+")[1] for v in wide} & {v.split("+")[1] for v in vocab.HELDOUT_VOICES}
    assert vocab.voices("heldout", wide=True) == vocab.HELDOUT_VOICES
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng or its voices missing (Debian: apt-get install -y espeak-ng)")
    assert not sounds.missing_voices(vocab.WIDE_TRAIN_VOICES)
    counts = {"train": {"spoken_word": 40}, "heldout": {"spoken_word": 3}}
    narrow, widened = (generate.build(tmp_path / str(w), 0, counts, 96, wide_voices=w) for w in (False, True))
    heard = {r["meta"]["voice"] for r in widened["train"]}
    assert heard <= wide and heard - set(vocab.TRAIN_VOICES)
    assert widened["heldout"] == narrow["heldout"]
    assert files(tmp_path / "True" / "media" / "heldout") == files(tmp_path / "False" / "media" / "heldout")
    generate.check_disjoint(widened["train"], widened["heldout"])


def test_change_speed_raises_every_frequency_and_shortens_the_clip():
    t = np.arange(sounds.RATE) / sounds.RATE
    wave = np.sin(2 * np.pi * 440 * t).astype(np.float32)  # 1 s of 440 Hz
    for speed in (0.85, 1.15):
        out = sounds.change_speed(wave, speed)
        assert out.dtype == np.float32 and abs(len(out) - sounds.RATE / speed) <= 2
        peak = np.argmax(np.abs(np.fft.rfft(out))) * sounds.RATE / len(out)
        assert abs(peak - 440 * speed) < 2, (speed, peak)
    assert sounds.change_speed(wave, 1.0) is wave


@NEEDS_ESPEAK
def test_speed_perturbation_changes_training_speech_only(tmp_path):
    counts = {"train": {"spoken_word": 12}, "heldout": {"spoken_word": 3}}
    plain = generate.build(tmp_path / "plain", 0, counts, 96)
    fast = generate.build(tmp_path / "fast", 0, counts, 96, speed=(0.85, 1.15))
    speeds = [r["meta"]["speed"] for r in fast["train"]]
    assert all(0.85 <= s <= 1.15 for s in speeds) and len(set(speeds)) > 1
    assert fast["heldout"] == plain["heldout"] and not any("speed" in r["meta"] for r in fast["heldout"])
    assert files(tmp_path / "fast" / "media" / "heldout") == files(tmp_path / "plain" / "media" / "heldout")
    # voice, rate and pitch are drawn before the speed, so each item keeps them
    for a, b in zip(plain["train"], fast["train"]):
        assert [a["meta"][k] for k in ("voice", "wpm", "pitch")] == [b["meta"][k] for k in ("voice", "wpm", "pitch")]
    assert files(tmp_path / "fast" / "media" / "train") != files(tmp_path / "plain" / "media" / "train")
    assert json.loads((tmp_path / "fast" / "manifest.json").read_text())["speed"] == [0.85, 1.15]
    with pytest.raises(SystemExit):
        generate.main(["--out", str(tmp_path / "bad"), "--speed-perturb", "1.2,0.9"])


def test_written_split_is_disjoint(small):
    out, _ = small
    train, held = (read_jsonl(out / f"{s}.jsonl") for s in ("train", "heldout"))
    generate.check_disjoint(train, held)
    a, b = generate.axis_values(train), generate.axis_values(held)
    assert b["pairs"] and b["pairs"] <= vocab.HELDOUT_PAIRS and not a["pairs"] & vocab.HELDOUT_PAIRS
    if HAS_FONTS:
        assert b["font"] and b["font"] <= set(vocab.HELDOUT_FONTS) and a["font"] <= set(vocab.TRAIN_FONTS)
    if HAS_ESPEAK:
        assert b["voice"] and b["voice"] <= set(vocab.HELDOUT_VOICES) and a["voice"] <= set(vocab.TRAIN_VOICES)


@pytest.mark.parametrize("leak", [{"pairs": [sorted(vocab.HELDOUT_PAIRS)[0]]}, {"font": vocab.HELDOUT_FONTS[0]},
                                  {"voice": vocab.HELDOUT_VOICES[0]}, {"hz": vocab.tone_grid("heldout", vocab.LOW_HZ)[0]}])
def test_check_disjoint_catches_a_leak(small, leak):
    _, recs = small
    bad = recs["train"] + [{"meta": {k: [list(p) for p in v] if k == "pairs" else v for k, v in leak.items()}}]
    with pytest.raises(AssertionError):
        generate.check_disjoint(bad, recs["heldout"])


def _bursts(wave: np.ndarray) -> int:
    """Beeps counted from the 10 ms energy envelope."""
    frames = wave[: len(wave) // 160 * 160].reshape(-1, 160)
    on = np.sqrt((frames ** 2).mean(axis=1)) > 0.35 * np.sqrt((frames ** 2).mean(axis=1)).max()
    return int(on[0]) + int(np.sum(on[1:] & ~on[:-1]))


def test_shapes_are_drawn_where_and_as_labelled(small):
    """The pixel at each shape's centre has its named colour (every shape covers its centre),
    and a position item's shape lies on the side its answer names."""
    out, recs = small
    from PIL import Image

    checked = 0
    for r in recs["train"] + recs["heldout"]:
        if "spots" not in r["meta"]:
            continue
        img = np.asarray(Image.open(out / r["messages"][0]["content"][0]["image"]).convert("RGB")).astype(int)
        size = img.shape[0]
        for (colour, _), (cx, cy, _) in zip(r["meta"]["pairs"], r["meta"]["spots"]):
            assert np.abs(img[round(cy), round(cx)] - vocab.COLOURS[colour]).max() <= 24, (r["id"], colour)
            checked += 1
        if r["kind"] == "position":
            cx, cy, _ = r["meta"]["spots"][0]
            dx, dy = cx - size / 2, cy - size / 2
            side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
            assert side == r["answer"] and max(abs(dx), abs(dy)) > 2 * min(abs(dx), abs(dy))
    assert checked > 20


def test_answers_agree_with_what_was_made(small):
    out, recs = small
    for r in recs["train"] + recs["heldout"]:
        kind, answer, meta = r["kind"], r["answer"], r["meta"]
        media = r["messages"][0]["content"]
        assert r["messages"][1] == {"role": "assistant", "content": answer} and answer
        assert all((out / p[p["type"]]).is_file() for p in media if p["type"] != "text")
        colours = [c for c, _ in meta.get("pairs", ())]
        shapes = [s for _, s in meta.get("pairs", ())]
        if kind == "colour":
            assert answer in colours and len(set(shapes)) == len(shapes)
        elif kind == "shape":
            assert answer in shapes and len(set(colours)) == len(colours)
        elif kind == "count":
            assert answer == str(len(meta["pairs"]))
        elif kind == "description":
            assert all(f"{c} {s}" in answer for c, s in meta["pairs"]) and answer.endswith(".")
        elif kind == "match":
            assert answer == ("yes" if meta["spoken"] == colours[0] else "no")
        elif kind == "pitch":
            assert answer == ("high" if meta["hz"] >= vocab.HIGH_HZ[0] else "low")
        elif kind == "beeps":
            wave, rate = soundfile.read(out / media[0]["audio"], dtype="float32")
            assert rate == 16000 and answer == str(meta["count"]) == str(_bursts(wave))
        elif kind == "digit":
            assert answer in "0123456789" and len(answer) == 1
        for p in media:
            if p["type"] == "audio":
                info = soundfile.info(out / p["audio"])
                assert (info.samplerate, info.channels) == (16000, 1) and info.duration < 5


def test_loads_in_the_finetune_trainer(small):
    from test_tokenizer import VOCAB_GGUF

    import unigemma
    from unigemma.finetune.data import load_jsonl
    from unigemma.finetune.labels import IGNORE
    from unigemma.processing.chat import Processor
    from unigemma.processing.tokenizer import Tokenizer
    from unigemma.templates import from_file

    template = Path(unigemma.__file__).parent / "templates" / "gemma4.jinja"
    proc = Processor(Tokenizer.from_gguf(VOCAB_GGUF), from_file(template, "test").source, image_budget=70)
    out, recs = small
    for split in ("train", "heldout"):
        data = load_jsonl(out / f"{split}.jsonl", proc)
        assert len(data) == len(recs[split]) and not data.skipped
        for ex, r in zip(data.examples, recs[split]):
            enc = ex.encoded
            has = {p["type"] for p in r["messages"][0]["content"]}
            assert (enc.inputs.image is not None) == ("image" in has)
            assert (enc.inputs.audio is not None) == ("audio" in has)
            trained = [t for t, lab in zip(enc.inputs.input_ids[0].tolist(), enc.labels.tolist()) if lab != IGNORE]
            assert proc.tokenizer.decode(trained).strip() == r["answer"] + "<turn|>"
    asked = prompts(out / "heldout.jsonl")  # what a judged model is given: the question, no reply
    r = recs["heldout"][0]
    assert [m["role"] for m in asked[r["id"]]] == ["user"]
    assert all(Path(p[p["type"]]).is_absolute() and Path(p[p["type"]]).is_file()
               for p in asked[r["id"]][0]["content"] if p["type"] != "text")


def test_score_per_kind_and_confusion():
    items = [{"id": "a", "kind": "colour", "answer": "red"}, {"id": "b", "kind": "colour", "answer": "blue"},
             {"id": "c", "kind": "colour", "answer": "red"}, {"id": "d", "kind": "digit", "answer": "7"},
             {"id": "e", "kind": "description", "answer": "A red star."}, {"id": "f", "kind": "digit", "answer": "3"}]
    preds = {"a": " Red. ", "b": "red", "c": "green", "d": "seven", "e": "a red star"}
    s = score(items, preds)
    assert (s["colour"].n, s["colour"].correct) == (3, 1)
    assert s["digit"].correct == 0 and s["digit"].confusion[("3", MISSING)] == 1 and s["digit"].confusion[("7", "seven")] == 1
    assert s["description"].accuracy == 1.0
    assert s["colour"].confusion == {("red", "red"): 1, ("blue", "red"): 1, ("red", "green"): 1}
    table = confusion_table(s["colour"]).splitlines()
    assert table[0].split()[-3:] == ["red", "blue", "(other)"]
    assert table[1].split() == ["red", "1", ".", "1"] and table[2].split() == ["blue", "1", ".", "."]
    sm = summary(s)
    assert sm["colour"] == {"n": 3, "accuracy": 0.3333, "target": 0.95, "met": False}
    assert "target" not in sm["description"]
    assert normalize('  "Seven."  ') == "seven" and normalize("7") != normalize("seven")


def test_conversations_ask_what_the_meta_answers(small):
    """conversations.py: the item's own turn first, then questions whose answers are read from its
    meta (count, each shape's colour, each colour's shape; beeps and pitch of a tone), none of the
    first question's kind, all true to the picture / tone the item was made from, none whose
    answer the conversation has already said (it would train copying, not looking)."""
    import random

    from bench.mmdata.conversations import conversation, questions, said

    _, recs = small
    seen = 0
    for r in recs["train"]:
        c = conversation(r, random.Random(0), max_extra=4)
        assert c["messages"][:2] == r["messages"]
        extra = c["messages"][2:]
        assert [m["role"] for m in extra] == ["user", "assistant"] * (len(extra) // 2) and len(extra) <= 8
        answers = {q: a for _, q, a in questions(r)}
        for i, (q, a) in enumerate(zip(extra[::2], extra[1::2])):
            assert answers[q["content"]] == a["content"]
            assert a["content"].lower() not in said(c["messages"][:2 + 2 * i])
            seen += 1
        m = r["meta"]
        if r["kind"] in ("beeps", "pitch"):
            want = {"How many beeps are there?": str(m["count"]),
                    "Is the tone high or low?": "high" if m["hz"] >= vocab.HIGH_HZ[0] else "low"}
            assert answers == want
            assert (r["answer"] == want["How many beeps are there?"] if r["kind"] == "beeps"
                    else r["answer"] == want["Is the tone high or low?"])
        elif r["kind"] == "count":
            assert answers["How many shapes are there?"] == r["answer"] == str(len(m["pairs"]))
            assert not any(q["content"].startswith("How many") for q in extra[::2])  # not its own kind again
        elif r["kind"] in ("colour", "shape") and len(m["pairs"]) == 1:
            colour, shape = m["pairs"][0]
            assert answers.get("What colour is the shape?", colour) == colour
            assert answers.get(f"What shape is the {colour} one?", shape) == shape
    assert seen > len(recs["train"])  # more than one extra answer per item on average


def test_the_patch_layernorm_keeps_only_the_hue_of_a_uniform_patch(capsys):
    from bench.mmdata import patch_colours

    def cos(a, b):
        return float(patch_colours.interior(a) @ patch_colours.interior(b)) / patch_colours.PATCH_VALUES

    assert cos((255, 140, 0), (130, 80, 30)) > 0.99  # orange and brown: one hue
    assert cos((220, 30, 30), (30, 70, 220)) < 0  # red and blue apart
    assert cos((12, 5, 20), (5, 20, 12)) < 0  # two near-blacks: their jitter's hues, nothing of black
    patch_colours.main(["--draws", "20"])
    out = json.loads(capsys.readouterr().out)
    assert out["taken_for"]["red"] == {"red": 10} and out["taken_for"]["cyan"] == {"cyan": 10}
    assert out["taken_for"]["black"].get("black", 0) < 5 and out["nearest_centroid_accuracy"] < 0.9


def test_alignment_targets_share_each_patch_between_its_shapes_and_the_background():
    from bench.mini_align import coverage

    # a square (side 2 x 0.85 r) drawn at 96 px, 96 px a side once scaled to the 192 px the
    # processor gives, centred in the picture: it fills exactly the four centre patches
    meta = {"pairs": [["red", "square"]], "spots": [[48.0, 48.0, 96 / 1.7 / 2]]}
    shares = coverage(meta, 96, (192, 192))
    assert shares.shape == (16, 2)
    np.testing.assert_allclose(shares.sum(1), 1, atol=1e-6)
    covered = shares[:, 0].reshape(4, 4)
    np.testing.assert_allclose(covered[1:3, 1:3], 1, atol=0.05)  # the four centre patches
    assert covered[0].max() < 0.05 and covered[3].max() < 0.05  # the outer ring: background
    two = coverage({"pairs": [["red", "circle"], ["blue", "star"]], "spots": [[24, 24, 20], [72, 72, 20]]},
                   96, (192, 192))
    assert two.shape == (16, 3) and two[0, 0] > 0.3 and two[0, 1] == 0 and two[15, 1] > 0.1 and two[15, 0] == 0


def test_more_training_items_continue_the_seed(tmp_path):
    """bench/mini_train.py --more KIND=N: the next N training items of a kind, the very items (and
    media bytes) a larger --train-per-kind would have made, written beside the others without
    touching them, and put in training only (never in the eval set)."""
    from bench.mini_train import extra_items, split_eval

    kinds = ["shape", "beeps"]
    make(tmp_path / "a", n=3, kinds=kinds)
    before = files(tmp_path / "a")
    lines = extra_items(tmp_path / "a", {"shape": 2})
    recs = [json.loads(x) for x in lines]
    assert [r["id"] for r in recs] == ["train-shape-00003", "train-shape-00004"]
    make(tmp_path / "b", n=5, kinds=kinds)
    whole = {r["id"]: r for r in read_jsonl(tmp_path / "b" / "train.jsonl")}
    assert all(r == whole[r["id"]] for r in recs)
    after, bigger = files(tmp_path / "a"), files(tmp_path / "b")
    assert all(after[k] == before[k] for k in before)
    new = [r["messages"][0]["content"][0]["image"] for r in recs]
    assert new and all(after[p] == bigger[p] for p in new)
    train, val = split_eval(tmp_path / "a", per_kind=1, extra=lines)
    ids = [json.loads(x)["id"] for x in train.read_text().splitlines()]
    assert ids[-2:] == [r["id"] for r in recs] and len(ids) == 2 * 2 + 2
    assert not {json.loads(x)["id"] for x in val.read_text().splitlines()} & set(ids)


def test_free_shapes_hide_the_colour_and_keep_heldout_pairs_unseen(tmp_path):
    """bench/mmdata/free_shapes.py: one shape in an unnamed random colour, drawn where and as
    labelled, the same bytes for the same index; no fill passes for a colour whose pair with that
    shape is held out, and none carries a named pair; the trainer's conversations and
    bench/mini_train.py --free-shapes ask its shape."""
    import random

    from PIL import Image

    from bench.mini_train import free_shape_items
    from bench.mmdata import free_shapes
    from bench.mmdata.conversations import conversation, questions

    for c, s in vocab.HELDOUT_PAIRS:
        assert free_shapes.near_heldout(s, vocab.COLOURS[c])
    assert {c for c, s in vocab.HELDOUT_PAIRS if s == "circle"} == {"red", "pink"}
    assert free_shapes.near_heldout("circle", (150, 20, 20)) and not free_shapes.near_heldout("circle", (250, 220, 20))
    recs = [free_shapes.make(i, 0, tmp_path, 96).record() for i in range(40)]
    assert len({r["answer"] for r in recs}) >= 8 and len({tuple(r["meta"]["fill"]) for r in recs}) == 40
    for r in recs:
        assert r["kind"] == "any_shape" and r["answer"] in vocab.SHAPES and "pairs" not in r["meta"]
        assert not free_shapes.near_heldout(r["answer"], r["meta"]["fill"])
        img = np.asarray(Image.open(tmp_path / r["messages"][0]["content"][0]["image"]).convert("RGB")).astype(int)
        cx, cy, _ = r["meta"]["spots"][0]
        assert np.abs(img[round(cy), round(cx)] - r["meta"]["fill"]).max() <= 24, r["id"]
        assert questions(r) == [("shape", "What shape is this?", r["answer"])]
        assert conversation(r, random.Random(0), 4)["messages"] == r["messages"]
    first = files(tmp_path)
    again = tmp_path / "again"
    free_shapes.make(3, 0, again, 96)
    assert files(again) == {k: v for k, v in first.items() if k.endswith("00003.png")}
    (again / "manifest.json").write_text(json.dumps({"image_size": 96}))
    lines = [json.loads(x) for x in free_shape_items(again, 5)]
    assert [r["id"] for r in lines] == [f"train-any_shape-{i:05d}" for i in range(5)]
    generate.check_disjoint(lines, [{"meta": {"pairs": [list(p)]}} for p in vocab.HELDOUT_PAIR_LIST])
