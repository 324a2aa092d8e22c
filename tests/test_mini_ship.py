"""bench/mini_ship.py's card: the steps and eval losses of a run that went on from shipped weights
(`--init`) are counted on from the card of the weights it started from."""

import json

import pytest

from bench.mini_ship import card, checkpoint_step, earlier_card
from unigemma.mini import WEIGHT_FILES

QUALITY = {"float32": {"colour": {"n": 200, "accuracy": 0.5}}, "prose": {"rise": 0.2},
           "cpu_model": "x", "cpu_capability": "AVX2"}


def run_dir(tmp_path, init=None):
    out = tmp_path / "train"
    ckpt = out / "checkpoint-240"
    ckpt.mkdir(parents=True)
    for f in WEIGHT_FILES:
        (ckpt / f).write_bytes(b"")
    rows = [{"step": 120, "loss": 1.0, "eval_loss": 0.98123}, {"step": 240, "loss": 0.9, "eval_loss": 0.95},
            {"step": 360, "loss": 0.8, "eval_loss": 0.9}]  # past the checkpoint: not its history
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "training_args.json").write_text(json.dumps({"init": str(init) if init else None}))
    return ckpt


def test_a_run_from_scratch_counts_its_own_steps(tmp_path):
    ckpt = run_dir(tmp_path)
    assert earlier_card(ckpt) is None
    c = card(ckpt, QUALITY, None)
    assert c["trained_steps"] == 240 and c["eval_loss"] == {120: 0.9812, 240: 0.95}


def test_an_init_run_goes_on_from_its_start(tmp_path):
    start = tmp_path / "shipped"
    start.mkdir()
    (start / "card.json").write_text(json.dumps({"trained_steps": 1680, "eval_loss": {"1560": 1.03, "1680": 0.99}}))
    ckpt = run_dir(tmp_path, init=start)
    c = card(ckpt, QUALITY, earlier_card(ckpt))
    assert c["trained_steps"] == 1920
    assert c["eval_loss"] == {1560: 1.03, 1680: 0.99, 1800: 0.9812, 1920: 0.95}
    assert c["heldout"] == QUALITY["float32"] and c["measured_on"]["cpu_capability"] == "AVX2"


def test_a_start_without_a_card_and_a_wrong_directory_are_refused(tmp_path):
    ckpt = run_dir(tmp_path, init=tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="no card.json"):
        earlier_card(ckpt)
    with pytest.raises(SystemExit, match="not a checkpoint-N"):
        checkpoint_step(tmp_path / "train")


def test_the_shipped_model_shipped_again_at_a_scale(tmp_path, monkeypatch):
    """--trained unigemma/mini --adapter-scale S: the weights stay, the adapter config's lora_alpha
    is S times its own, the card keeps the steps and eval losses and records the scale (compounded
    over an earlier one); measured figures are the new quality line's."""
    import bench.mini_ship as ship

    package = tmp_path / "mini"
    package.mkdir()
    for f in WEIGHT_FILES:
        (package / f).write_bytes(b"w-" + f.encode())
    (package / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32.0}))
    (package / "card.json").write_text(json.dumps({
        "name": "unigemma-mini", "base": "b", "recipe": "r", "trained_steps": 2400, "eval_loss": {"2400": 0.88},
        "heldout": {}, "prose": {"rise": 0.3}, "adapter_scale": 1.0}))
    (tmp_path / "quality.json").write_text("progress\n" + json.dumps(QUALITY) + "\n")
    monkeypatch.setattr(ship, "PACKAGE", package)
    monkeypatch.setattr(ship, "first_items", lambda heldout: [])
    monkeypatch.setattr(ship, "copy_items", lambda items, data, out: None)
    weights = {f: (package / f).read_bytes() for f in WEIGHT_FILES if f != "adapter_config.json"}
    for scale, alpha in ((0.5, 16.0), (0.5, 8.0)):
        ship.main(["--trained", str(package), "--quality", str(tmp_path / "quality.json"), "--data", str(tmp_path),
                   "--adapter-scale", str(scale)])
        assert json.loads((package / "adapter_config.json").read_text()) == {"r": 16, "lora_alpha": alpha}
        c = json.loads((package / "card.json").read_text())
        assert c["trained_steps"] == 2400 and c["eval_loss"] == {"2400": 0.88}
        assert c["adapter_scale"] == alpha / 32 and c["prose"] == QUALITY["prose"]
        assert {f: (package / f).read_bytes() for f in weights} == weights
    with pytest.raises(SystemExit):
        ship.main(["--trained", str(package), "--quality", str(tmp_path / "quality.json"), "--data", str(tmp_path),
                   "--adapter-scale", "0"])
