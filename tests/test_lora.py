"""LoRA adapters against transformers + PEFT (the oracle) on the tiny random checkpoints of the
parity tests: adapter-applied logits equal in fp32 (≤ 1e-4) with the same adapter weights, the
PEFT file format both ways, mismatched adapters refused, rsLoRA / alpha scaling, QLoRA over
int8 / int4 weights (gradients on A and B only, equal to those over the dequantized floats).
Every adapter has random non-zero B: a zero B would hide a missing or misnamed term."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reference import Shape, audio_frames, load_reference, patches, write_checkpoint
from safetensors.torch import load_file, save_file
from test_gemma3 import write_gemma3
from test_parity import build_prompt

import unigemma
from unigemma.errors import CheckpointError
from unigemma.lora import LoraConfig, add_lora, load_adapter, lora_modules, save_adapter, set_adapter

peft = pytest.importorskip("peft", reason="PEFT is the reference implementation of LoRA")
TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora(model: torch.nn.Module, seed: int) -> None:
    """Every lora_A / lora_B random and non-zero (PEFT's modules and ours alike)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="module")
def gemma4(ckpt_root):
    return write_checkpoint(Shape(), ckpt_root)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    write_gemma3(path)
    return path


def gemma3_reference(path):
    import transformers

    return transformers.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def multimodal_prompt():
    """Text, an image and an audio clip (the Gemma 4 unified inputs)."""
    g = torch.Generator().manual_seed(21)
    shape = Shape()
    pv, pos = patches([(2, 3)], 8, g)
    feats, fmask = audio_frames([5], g)
    ids, types = build_prompt(shape, [("text", 4), ("image", 6), ("text", 3), ("audio", 5), ("text", 4)], g)
    return ids, dict(mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos, input_features=feats,
                     input_features_mask=fmask)


def peft_adapter(ref, path, seed, **kw):
    """A PEFT adapter over `ref` with random weights, saved to `path`; returns the PeftModel."""
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **kw})
    model = peft.get_peft_model(ref, cfg)
    randomize_lora(model, seed)
    model.save_pretrained(path)
    return model.eval()


def compare(ours, theirs, ids, **kw):
    with torch.no_grad():
        want = theirs(input_ids=ids, **kw).logits
    got = ours.logits(ids, **kw)
    diff = (got - want).abs().max().item()
    print(f"\n[lora] max abs logit diff {diff:.3e}")
    return diff


def test_peft_adapter_loads_into_unigemma_gemma4_multimodal(gemma4, tmp_path):
    ids, media = multimodal_prompt()
    theirs = peft_adapter(load_reference(gemma4), tmp_path, seed=1)
    ours = unigemma.load_model(gemma4, dtype="float32", block_mask="all")
    base = ours.logits(ids, **media)
    load_adapter(ours, tmp_path)
    # Gemma 4's K=V full layer has no v_proj: 4 layers x 7 - 1 wrapped modules
    assert len(lora_modules(ours)) == 27
    assert compare(ours, theirs, ids, **media) <= TOL
    assert (ours.logits(ids, **media) - base).abs().max() > 1e-2  # the adapter changes something


def test_unigemma_adapter_loads_into_peft_gemma4_rslora(gemma4, tmp_path):
    ids, media = multimodal_prompt()
    ours = unigemma.load_model(gemma4, dtype="float32", block_mask="all")
    config = LoraConfig(r=8, alpha=4.0, use_rslora=True)
    add_lora(ours, config)
    randomize_lora(ours, seed=2)
    save_adapter(ours, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["r"] == 8
    assert "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight" in load_file(
        tmp_path / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(load_reference(gemma4), tmp_path).eval()
    assert theirs.peft_config["default"].use_rslora
    assert compare(ours, theirs, ids, **media) <= TOL


def test_media_embedder_targets_both_ways(gemma4, tmp_path):
    """Embedders' projections are optional targets; their names are transformers' module names."""
    ids, media = multimodal_prompt()
    theirs = peft_adapter(load_reference(gemma4), tmp_path, seed=3,
                          target_modules=TARGETS + ["patch_dense", "embedding_projection"])
    ours = unigemma.load_model(gemma4, dtype="float32", block_mask="all")
    load_adapter(ours, tmp_path)
    assert "model.embed_audio.embedding_projection" in lora_modules(ours)
    assert compare(ours, theirs, ids, **media) <= TOL


@pytest.mark.parametrize("direction", ["peft-to-ours", "ours-to-peft"])
def test_gemma3_both_directions(gemma3, tmp_path, direction):
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(4))
    ours = unigemma.load_model(gemma3, dtype="float32")
    if direction == "peft-to-ours":
        theirs = peft_adapter(gemma3_reference(gemma3), tmp_path, seed=4, lora_alpha=16,
                              alpha_pattern={"down_proj": 2})
        load_adapter(ours, tmp_path)
        assert lora_modules(ours)["model.layers.0.mlp.down_proj"].scaling["default"] == 0.5
    else:
        config = LoraConfig(r=4, alpha=16.0, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
        add_lora(ours, config)
        randomize_lora(ours, seed=5)
        save_adapter(ours, tmp_path, config)
        theirs = peft.PeftModel.from_pretrained(gemma3_reference(gemma3), tmp_path).eval()
    assert compare(ours, theirs, ids) <= TOL


def test_adapter_of_another_prefix_is_refused_naming_expected(gemma4, tmp_path):
    """vLLM #41754: an adapter whose names match nothing must not load as a no-op."""
    peft_adapter(load_reference(gemma4), tmp_path, seed=6)
    weights = tmp_path / "adapter_model.safetensors"
    t = load_file(weights)
    save_file({k.replace("base_model.model.model.", "base_model.model.model.decoder."): v for k, v in t.items()},
              weights)
    ours = unigemma.load_model(gemma4, dtype="float32")
    with pytest.raises(CheckpointError, match=r"match no module.*language_model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(ours, tmp_path)
    assert not lora_modules(ours)  # nothing half-loaded


def test_text_class_adapter_loads_onto_unified_model(gemma4, tmp_path):
    """An adapter trained on the text-only class (decoder at model.layers.) loads onto the
    multimodal model (model.language_model.layers.) — the one known rename — and acts the same."""
    ids, _ = build_prompt(Shape(), [("text", 12)], torch.Generator().manual_seed(7))
    theirs = peft_adapter(load_reference(gemma4), tmp_path / "a", seed=7)
    t = load_file(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "b").mkdir()
    save_file({k.replace("model.language_model.layers.", "model.layers."): v for k, v in t.items()},
              tmp_path / "b" / "adapter_model.safetensors")
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    ours = unigemma.load_model(gemma4, dtype="float32")
    load_adapter(ours, tmp_path / "b")
    assert compare(ours, theirs, ids) <= TOL


def test_unsupported_adapters_are_refused(gemma4, tmp_path):
    peft_adapter(load_reference(gemma4), tmp_path, seed=8)
    ours = unigemma.load_model(gemma4, dtype="float32")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    t = load_file(tmp_path / "adapter_model.safetensors")
    save_file({**t, "base_model.model.lm_head.weight": torch.zeros(4, 4)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="modules_to_save"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_adapter(ours, tmp_path)
    assert not lora_modules(ours)


def test_set_adapter_none_is_the_base(gemma4, tmp_path):
    ids, _ = build_prompt(Shape(), [("text", 10)], torch.Generator().manual_seed(9))
    ours = unigemma.load_model(gemma4, dtype="float32")
    base = ours.logits(ids)
    add_lora(ours, LoraConfig(r=2))
    randomize_lora(ours, seed=9)
    assert (ours.logits(ids) - base).abs().max() > 1e-3
    set_adapter(ours, None)
    assert torch.equal(ours.logits(ids), base)


@pytest.mark.parametrize("quant", ["int8", "int4-g32"])
def test_qlora_gradients_reach_adapters_only(gemma4, quant):
    """Over quantized weights: the adapters train, nothing else gets a gradient, and the
    gradients equal those over a float model holding the dequantized weights."""
    from unigemma.quant.linear import QuantLinear

    ids, _ = build_prompt(Shape(), [("text", 12)], torch.Generator().manual_seed(10))
    grads = {}
    for kind in ("quantized", "dequantized"):
        model = unigemma.load_model(gemma4, dtype="float32", quant=quant, exact=True)  # float activations
        if kind == "dequantized":
            for name, mod in list(model.named_modules()):
                if type(mod) is QuantLinear:
                    lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
                    lin.weight.data = mod.dequantize(torch.float32)
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, lin)
        model.requires_grad_(False)
        torch.manual_seed(0)
        params = add_lora(model, LoraConfig(r=4, dropout=0.0))
        randomize_lora(model, seed=10)
        positions = torch.arange(ids.shape[1])[None]
        loss = model.head(model(ids, positions)).float().logsumexp(-1).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        grads[kind] = [p.grad for p in params]
        if kind == "quantized":
            assert sum(isinstance(m, QuantLinear) for m in model.modules()) >= 27
    for a, b in zip(grads["quantized"], grads["dequantized"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_qlora_backward_through_the_cpu_kernel_path(gemma4):
    """Regression: a bf16 quantized model on its default kernels (int8 activations) used to raise
    "no autograd formula was registered" at backward; with grad enabled the input's gradient now
    goes through the dequantized weight."""
    model = unigemma.load_model(gemma4, dtype="bfloat16", quant="int4-g32")
    model.requires_grad_(False)
    params = add_lora(model, LoraConfig(r=4))
    ids, _ = build_prompt(Shape(), [("text", 9)], torch.Generator().manual_seed(11))
    model.head(model(ids, torch.arange(ids.shape[1])[None])).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in params)
    assert params[0].dtype == torch.float32  # adapters in fp32 over the bf16 base, as PEFT's autocast does


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_merge_writes_a_checkpoint_equal_to_the_unmerged_adapter(gemma4, gemma3, tmp_path, family):
    """`unigemma merge`: the merged checkpoint loads with unigemma and with transformers, and its
    logits equal the unmerged adapter's (PEFT's and ours)."""
    from unigemma.cli import main

    base = gemma4 if family == "gemma4" else gemma3
    reference = load_reference if family == "gemma4" else gemma3_reference
    theirs = peft_adapter(reference(base), tmp_path / "adapter", seed=12)
    ids = torch.randint(3, 500, (1, 19), generator=torch.Generator().manual_seed(12))
    unmerged = unigemma.load_model(base, dtype="float32")
    load_adapter(unmerged, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--lora", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = unigemma.load_model(tmp_path / "m", dtype="float32")
    assert not lora_modules(merged)
    diff = (merged.logits(ids) - unmerged.logits(ids)).abs().max().item()
    print(f"\n[lora] merged vs unmerged: {diff:.3e}")
    assert diff <= TOL
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = reference(tmp_path / "m")(input_ids=ids).logits
    assert (got - want).abs().max().item() <= TOL


def test_merge_refuses_a_quantized_base(gemma4):
    model = unigemma.load_model(gemma4, dtype="float32", quant="int8")
    add_lora(model, LoraConfig(r=2))
    from unigemma.lora import merge

    with pytest.raises(ValueError, match="cannot merge into a QuantLinear"):
        merge(model)


# adapter_config.json as Unsloth writes it for Gemma (its target regex, its extra keys)
UNSLOTH_TARGETS = (r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
                   r"(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}\."
                   r"(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:q_proj|k_proj|v_proj|o_proj|"
                   r"gate_proj|up_proj|down_proj)))")


def test_unsloth_style_adapter_loads(gemma4, tmp_path):
    ids, media = multimodal_prompt()
    theirs = peft_adapter(load_reference(gemma4), tmp_path, seed=13)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(target_modules=UNSLOTH_TARGETS, task_type="CAUSAL_LM", modules_to_save=None, lora_dropout=0,
               auto_mapping={"base_model_class": "Gemma4UnifiedForConditionalGeneration", "unsloth_fixed": True},
               base_model_name_or_path="unsloth/gemma-4-12b-it")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ours = unigemma.load_model(gemma4, dtype="float32", block_mask="all")
    load_adapter(ours, tmp_path)
    assert compare(ours, theirs, ids, **media) <= TOL
    # the same regex as our own target list picks the decoder's projections only
    fresh = unigemma.load_model(gemma4, dtype="float32")
    add_lora(fresh, LoraConfig(target_modules=UNSLOTH_TARGETS))
    assert sorted(lora_modules(fresh)) == sorted(lora_modules(ours))


def test_text_only_class_both_ways(ckpt_root, tmp_path):
    """Gemma4UnifiedForCausalLM keeps its decoder at `model.layers.` (ours: model.language_model.layers.):
    its PEFT names load here, and ours are written in its names."""
    path = write_checkpoint(Shape(text_only_class=True, vision=False, audio=False, seed=3), ckpt_root)
    ids, _ = build_prompt(Shape(), [("text", 14)], torch.Generator().manual_seed(14))
    theirs = peft_adapter(load_reference(path), tmp_path / "peft", seed=14)
    ours = unigemma.load_model(path, dtype="float32")
    load_adapter(ours, tmp_path / "peft")
    assert compare(ours, theirs, ids) <= TOL
    save_adapter(ours, tmp_path / "ours", LoraConfig.from_peft(json.loads((tmp_path / "peft" / "adapter_config.json")
                                                                           .read_text())))
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_dropout_acts_in_training_only(gemma4):
    ids, _ = build_prompt(Shape(), [("text", 10)], torch.Generator().manual_seed(15))
    model = unigemma.load_model(gemma4, dtype="float32")
    add_lora(model, LoraConfig(r=4, dropout=0.5))
    randomize_lora(model, seed=15)
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        assert torch.equal(model(ids, positions), model(ids, positions))  # eval (as loaded): no dropout
        model.train()
        assert not torch.equal(model(ids, positions), model(ids, positions))


def test_training_through_a_packed_base_is_refused_clearly(gemma4):
    from unigemma.models.packed import pack_linears

    model = unigemma.load_model(gemma4, dtype="float32")
    pack_linears(model, head=False)
    model.requires_grad_(False)
    add_lora(model, LoraConfig(r=2))
    ids, _ = build_prompt(Shape(), [("text", 6)], torch.Generator().manual_seed(16))
    with pytest.raises(RuntimeError, match="load the model unpacked to train"):
        model(ids, torch.arange(ids.shape[1])[None])


@pytest.mark.parametrize("bad", ["scalar", "rank0", "wrong-shape", "only-A"])
def test_malformed_adapter_tensors_are_refused(gemma4, tmp_path, bad):
    peft_adapter(load_reference(gemma4), tmp_path, seed=17)
    weights = tmp_path / "adapter_model.safetensors"
    t = load_file(weights)
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = {"scalar": torch.tensor(1.0), "rank0": torch.zeros(0, 64), "wrong-shape": torch.zeros(4, 65),
              "only-A": t[key]}[bad]
    if bad == "only-A":
        del t[key.replace("lora_A", "lora_B")]
    save_file(t, weights)
    ours = unigemma.load_model(gemma4, dtype="float32")
    with pytest.raises(CheckpointError, match="layers.0.self_attn.q_proj"):
        load_adapter(ours, tmp_path)
    assert not lora_modules(ours)


@pytest.mark.parametrize("change", [{"alpha_pattern": {"(": 2}}, {"target_modules": "("}, {"r": -1},
                                    {"lora_alpha": "x"}, {"rank_pattern": {"q_proj": "big"}}, {"peft_type": "IA3"}])
def test_malformed_adapter_configs_are_refused(gemma4, tmp_path, change):
    peft_adapter(load_reference(gemma4), tmp_path, seed=18)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(unigemma.load_model(gemma4, dtype="float32"), tmp_path)


@pytest.mark.parametrize("family", ["gemma4", "gemma3"])
def test_initial_weights_equal_peft_under_the_same_seed(gemma4, gemma3, family):
    """A training run seeded like a PEFT one starts from PEFT's A (kaiming-uniform, drawn in the same
    module order) and a zero B."""
    base = gemma4 if family == "gemma4" else gemma3
    reference = load_reference(base) if family == "gemma4" else gemma3_reference(base)
    torch.manual_seed(19)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    want = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    ours = unigemma.load_model(base, dtype="float32")
    torch.manual_seed(19)
    add_lora(ours, LoraConfig(r=4, alpha=8.0))
    from unigemma.lora import lora_state_dict

    got = {k.removeprefix("base_model.model."): v for k, v in lora_state_dict(ours).items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
