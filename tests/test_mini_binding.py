"""bench/mini_binding.py: colour and shape answers split by the picture's shape count."""

import json

import pytest

from bench.mini_binding import binding, main


def item(i, kind, text, answer, pairs):
    return {"id": f"x-{i}", "kind": kind, "answer": answer, "meta": {"pairs": pairs},
            "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                      {"type": "text", "text": text}]},
                         {"role": "assistant", "content": answer}]}


ITEMS = [
    item(0, "colour", "What colour is the shape?", "red", [["red", "star"]]),
    item(1, "colour", "Which colour is the star?", "red", [["red", "star"], ["blue", "heart"]]),
    item(2, "colour", "Which colour is the heart?", "blue", [["red", "star"], ["blue", "heart"]]),
    item(3, "colour", "What colour is the star?", "red",
         [["red", "star"], ["red", "heart"], ["green", "circle"]]),
    item(4, "shape", "What shape is the blue one?", "heart", [["red", "star"], ["blue", "heart"]]),
    item(5, "count", "How many shapes?", "2", [["red", "star"], ["blue", "heart"]]),
]


def test_binding_splits_by_shape_count_and_names_what_was_read_but_not_bound():
    said = {"x-0": "Red.", "x-1": "blue", "x-2": "blue", "x-3": "green", "x-4": "circle", "x-5": "3"}
    got = binding(ITEMS, said)
    assert set(got) == {"colour", "shape"}  # count items are not about binding
    assert got["colour"]["1"] == {"n": 1, "accuracy": 1.0, "random_in_picture": 1.0, "wrong": 0,
                                  "wrong_in_picture": 0}
    # x-1 named the heart's colour for the star (in the picture), x-2 right
    assert got["colour"]["2"] == {"n": 2, "accuracy": 0.5, "random_in_picture": 0.5, "wrong": 1,
                                  "wrong_in_picture": 1}
    # two distinct colours among three shapes: a random pick of the picture's colours is right half the time
    assert got["colour"]["3"] == {"n": 1, "accuracy": 0.0, "random_in_picture": 0.5, "wrong": 1,
                                  "wrong_in_picture": 1}
    # "circle" is no shape of that picture
    assert got["shape"]["2"]["wrong_in_picture"] == 0 and got["shape"]["2"]["wrong"] == 1


def test_items_without_a_prediction_are_left_out():
    assert binding(ITEMS, {"x-4": "heart"}) == {"shape": {"2": {"n": 1, "accuracy": 1.0, "random_in_picture": 0.5,
                                                                 "wrong": 0, "wrong_in_picture": 0}}}


def test_a_question_that_names_no_shape_of_a_busy_picture_is_an_error():
    bad = item(9, "colour", "What colour is it?", "red", [["red", "star"], ["blue", "heart"]])
    with pytest.raises(ValueError, match="x-9: the question names 0 of the picture's shapes"):
        binding([bad], {"x-9": "red"})


def test_main_prints_one_json_line(tmp_path, capsys):
    data, preds = tmp_path / "heldout.jsonl", tmp_path / "preds.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    preds.write_text(json.dumps({"id": "x-2", "prediction": "blue"}) + "\n", encoding="utf-8")
    main(["--data", str(data), "--predictions", str(preds)])
    line = json.loads(capsys.readouterr().out)
    assert line["bench"] == "mini_binding" and line["colour"]["2"]["accuracy"] == 1.0


def test_main_names_a_malformed_predictions_line(tmp_path, capsys):
    data, preds = tmp_path / "heldout.jsonl", tmp_path / "preds.jsonl"
    data.write_text(json.dumps(ITEMS[0]) + "\n", encoding="utf-8")
    preds.write_text(json.dumps({"id": "x-0", "prediction": "red"}) + "\n" + json.dumps({"id": "x-1"}) + "\n",
                     encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["--data", str(data), "--predictions", str(preds)])
    assert f"{preds}:2: expected" in capsys.readouterr().err
