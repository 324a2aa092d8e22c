"""bench/mini_bundle.py (the mini packed for a borrowed GPU machine) and bench/mini_gpu.py's pieces."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bench import mini_bundle
from unigemma.config import ModelConfig
from unigemma.models import gemma3
from unigemma.weights.random import randomize_reference
from unigemma.weights.save import save_checkpoint


def test_quantize_rounds_each_weight_to_its_groups_step():
    w = torch.randn(6, 192) * torch.logspace(-3, 1, 192)  # groups of very different ranges
    q, scale = mini_bundle.quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (6, 3)
    back = mini_bundle.dequantize(q, scale)
    step = scale.float().repeat_interleave(mini_bundle.GROUP, 1)
    assert ((back - w).abs() <= step / 2 + 1e-3 * step + 1e-7).all()  # half a step (and fp16's scale rounding)
    with pytest.raises(ValueError, match="not a multiple of 64"):
        mini_bundle.quantize(torch.randn(2, 100))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny mini checkpoint (Gemma 3's tiny decoder at the real vocabulary, the embedders from
    seed 0) with a stand-in tokenizer.json (the bundle stores its bytes)."""
    from unigemma.weights.mini import build_mini_model

    tmp = tmp_path_factory.mktemp("bundle")
    d = {**gemma3.tiny_config(), "vocab_size": 262144}
    base = gemma3.Gemma3ForCausalLM(ModelConfig.from_dict(d))
    randomize_reference(base, seed=5)
    save_checkpoint(base.eval(), d, tmp / "base")
    model, config = build_mini_model(tmp / "base", seed=3)
    path = save_checkpoint(model.eval(), config, tmp / "ck")
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}) * 50)
    return path


def test_pack_then_unpack_gives_the_checkpoint_back_within_int8_rounding(checkpoint, tmp_path):
    ids = [0, 1, 2, 3, 17, 4000, 258880]
    manifest = mini_bundle.pack(checkpoint, tmp_path / "b", ids, parts=3)
    assert manifest["kept_ids"] == len(ids) and manifest["largest_group_relative_error"] <= 1 / 254 + 1e-4
    assert sorted(manifest["files"]) == ["layers0", "layers1", "layers2", "rest"]
    # each call of the machine brings some parts: the layers scattered over three folders
    (tmp_path / "p1").mkdir()
    (tmp_path / "b" / "layers1.safetensors").rename(tmp_path / "p1" / "layers1.safetensors")
    with pytest.raises(SystemExit, match=r"decoder layers \[3, 4, 5\] missing"):
        mini_bundle.unpack(tmp_path / "b", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # nothing written
    out = mini_bundle.unpack(tmp_path / "b", tmp_path / "ck", parts=[tmp_path / "p1"])
    want, got = load_file(str(checkpoint / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        if name == mini_bundle.EMBED:
            kept = torch.tensor(ids)
            assert torch.allclose(g[kept], w[kept], atol=float(w[kept].abs().max()) / 254 + 1e-6)
            others = torch.ones(len(w), dtype=torch.bool)
            others[kept] = False
            assert not g[others].any()  # a row not packed is zero: its logit is 0
        elif w.dim() == 2 and "layers." in name:
            assert torch.allclose(g, w, atol=float(w.abs().max()) / 254 + 1e-6), name
        else:
            assert torch.equal(g, w.float()), name  # norms and embedders exact
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    assert json.loads((out / "kept.json").read_text()) == ids


def test_unpack_keeps_the_first_layers_only_when_asked(checkpoint, tmp_path):
    mini_bundle.pack(checkpoint, tmp_path / "b", [0, 1, 2], parts=2)
    (tmp_path / "b" / "layers1.safetensors").unlink()  # layers 4-6 never arrived
    out = mini_bundle.unpack(tmp_path / "b", tmp_path / "ck", layers=2)
    config = json.loads((out / "config.json").read_text())["text_config"]
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    assert {mini_bundle.layer_of(k) for k in load_file(str(out / "model.safetensors"))} == {None, 0, 1}
    import unigemma

    model = unigemma.load_model(out, dtype="float32", pack=False)
    assert len(model.text.layers) == 2


def test_quantize4_rounds_each_weight_to_its_groups_step():
    w = torch.randn(5, 96) * torch.logspace(-2, 1, 96)
    packed, scale = mini_bundle.quantize4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48) and scale.shape == (5, 3)
    back = mini_bundle.dequantize4(packed, scale)
    step = scale.float().repeat_interleave(mini_bundle.GROUP4, 1)
    assert ((back - w).abs() <= step / 2 + 1e-3 * step + 1e-7).all()
    assert not torch.equal(back, mini_bundle.dequantize4(packed ^ 1, scale))  # every nibble counts


def test_all_rows_packs_the_rest_of_the_table_in_int4(checkpoint, tmp_path):
    ids = [0, 1, 2, 3, 40]
    manifest = mini_bundle.pack(checkpoint, tmp_path / "b", ids, parts=1, other_rows=2)
    assert sorted(manifest["files"]) == ["embed0", "embed1", "layers0", "rest"]
    (tmp_path / "p").mkdir()
    (tmp_path / "b" / "embed1.safetensors").rename(tmp_path / "p" / "embed1.safetensors")
    with pytest.raises(SystemExit, match="embed1.safetensors missing"):
        mini_bundle.unpack(tmp_path / "b", tmp_path / "nope")
    mini_bundle.unpack(tmp_path / "b", tmp_path / "small", layers=2)  # a smoke test needs no other rows
    out = mini_bundle.unpack(tmp_path / "b", tmp_path / "ck", parts=[tmp_path / "p"])
    w = load_file(str(checkpoint / "model.safetensors"))[mini_bundle.EMBED]
    g = load_file(str(out / "model.safetensors"))[mini_bundle.EMBED]
    top = w.abs().reshape(len(w), -1, mini_bundle.GROUP4).amax(-1).repeat_interleave(mini_bundle.GROUP4, 1)
    assert ((g - w).abs() <= top / 14 * (1 + 1e-3) + 1e-6).all()  # every row: half an int4 step at most
    kept = torch.tensor(ids)
    assert (g[kept] - w[kept]).abs().max() <= w[kept].abs().max() / 254 + 1e-6  # the kept rows int8


def test_stage_loss_weighs_the_text_lines_apart_when_asked(checkpoint):
    import unigemma
    from bench.mini_gpu import stage_loss
    from unigemma.finetune.labels import IGNORE
    from unigemma.finetune.loss import label_loss

    model = unigemma.load_model(checkpoint, dtype="float32", pack=False)
    torch.manual_seed(0)
    h = torch.randn(3, 6, model.config.text.hidden_size, requires_grad=True)
    labels = torch.randint(0, 500, (3, 6))
    labels[0, :4] = IGNORE  # a conversation: two answer tokens; rows 1-2 text, every token
    is_text = torch.tensor([False, True, True])
    plain = stage_loss(model, h, labels, is_text, None)
    total, n = label_loss(model, h, labels)
    assert torch.allclose(plain, total / n)
    weighted = stage_loss(model, h, labels, is_text, 0.25)
    t, nt = label_loss(model, h[1:], labels[1:])
    m, nm = label_loss(model, h[:1], labels[:1])
    assert nt == 10 and nm == 2 and torch.allclose(weighted, 0.25 * t / nt + 0.75 * m / nm)
    weighted.backward()
    assert h.grad[0].any() and h.grad[1].any()
    assert torch.allclose(stage_loss(model, h, labels, torch.tensor([True] * 3), 0.25), total / n)


@pytest.mark.parametrize("extra, message", [
    (["--kinds", "colour,smell"], "--kinds: a subset of"),
    (["--text-weight", "1.5"], "--text-weight must be in"),
    (["--keep-text", "1"], "--keep-text 1.0: the share"),
    (["--mix", "nowhere.jsonl"], "--mix nowhere.jsonl: not a file"),
    (["--per-kind", "0"], "--per-kind, --batch-size"),
    (["--seconds", "0"], "--seconds and --eval-every must be > 0"),
    (["--distill", "4"], "--distill needs --mix"),
    (["--read-weight", "-1"], "--read-weight must be >= 0"),
    (["--read-weight", "1", "--read-layer", "0"], "--read-layer in 1..18"),
    (["--free", "-2"], "--prose-tokens and --free must be >= 0"),
    (["--extra-held", "nowhere.jsonl"], "--extra-held nowhere.jsonl: not a file"),
    (["--teacher", "nowhere"], "--teacher nowhere: no config.json"),
])
def test_gpu_stage_refuses_bad_arguments_before_drawing(checkpoint, tmp_path, capsys, extra, message):
    from bench import mini_gpu

    with pytest.raises(SystemExit):
        mini_gpu.main(["--model", str(checkpoint), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing drawn


def test_save_stage_casts_the_adapter_and_embedders_when_asked(checkpoint, tmp_path):
    """bench/mini_gpu.py saves in bfloat16 through save_stage (the files a borrowed machine hands
    back stay under 16 MiB); float32 by default, as bench/mini_reader_probe.py's runs save."""
    import unigemma
    from bench.mini_reader_probe import save_stage
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    model = unigemma.load_model(checkpoint, dtype="float32", pack=False)
    lora = LoraConfig(r=2, alpha=4)
    prepare(model, lora, 0)
    save_stage(model, lora, tmp_path / "f32")
    save_stage(model, lora, tmp_path / "bf16", torch.bfloat16)
    for name in ("adapter_model.safetensors", "full_weights.safetensors"):
        full, half = load_file(str(tmp_path / "f32" / name)), load_file(str(tmp_path / "bf16" / name))
        assert sorted(full) == sorted(half) and all(v.dtype == torch.float32 for v in full.values())
        assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in full.items())
    assert (tmp_path / "bf16" / "adapter_config.json").read_text() == (tmp_path / "f32" / "adapter_config.json").read_text()
