"""Configs: what transformers writes, the real 12B config, and clear errors for bad ones."""

import copy
import json
from pathlib import Path

import pytest
import torch
from reference import Shape, write_checkpoint

import unigemma
from unigemma.config import FULL, SLIDING, ModelConfig
from unigemma.errors import ConfigError
from unigemma.models.gemma4 import Gemma4Unified

REAL_12B = Path(__file__).resolve().parents[2] / "shared" / "configs" / "gemma-4-12B" / "config.json"
needs_12b = pytest.mark.skipif(not REAL_12B.exists(), reason="shared/configs/gemma-4-12B/config.json not found beside the repo")


@needs_12b
def test_real_12b_config_resolves_per_layer_shapes():
    cfg = ModelConfig.from_file(REAL_12B)
    t = cfg.text
    assert t.layer_types.count(FULL) == 8 and [i for i, x in enumerate(t.layer_types) if x == FULL][0] == 5
    assert t.head_dim_of(SLIDING) == 256 and t.kv_heads_of(SLIDING) == 8
    assert t.head_dim_of(FULL) == 512 and t.kv_heads_of(FULL) == 1
    assert not t.uses_v_proj(5) and t.uses_v_proj(0)
    assert t.rope_parameters[FULL]["rope_type"] == "proportional"
    assert cfg.vision.patch_dim == 6912 and cfg.audio.audio_embed_dim == 640
    assert cfg.image_token_id == 258880 and cfg.eoa_token_index == 258883


@needs_12b
def test_12b_builds_on_meta_with_the_exact_parameter_count():
    with torch.device("meta"):
        model = Gemma4Unified(ModelConfig.from_file(REAL_12B))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    lm = model.model.language_model
    assert count(model) == 11_959_730_176  # what transformers 5.23 builds (peers.md)
    assert count(lm.embed_tokens) == 1_006_632_960
    assert count(lm.layers) == 10_900_713_472
    assert count(lm.norm) == 3_840
    assert count(model.model.embed_vision) == 49_922_304
    assert count(model.model.embed_audio) == 2_457_600
    assert sum(b.numel() for b in model.buffers()) == 48  # the learned layer scalars


def test_transformers_written_config_matches_reference_fields(ckpt_root):
    path = write_checkpoint(Shape(k_eq_v=False, window=5, seed=1), ckpt_root)
    raw = json.loads((path / "config.json").read_text())
    assert "per_layer_config" in raw["text_config"]  # the newer spelling of the full-layer overrides
    t = ModelConfig.from_file(path / "config.json").text
    assert t.head_dim_of(FULL) == 32 and t.kv_heads_of(FULL) == 2  # K=V off: full layers keep kv heads
    assert t.uses_v_proj(3)


def base():
    return json.loads(REAL_12B.read_text()) if REAL_12B.exists() else None


BAD = [
    (lambda d: d.update(model_type="llama"), "unknown model_type 'llama'"),
    (lambda d: d.pop("text_config"), "needs a text_config"),
    (lambda d: d["text_config"].update(num_hidden_layers=47), "layer_types has 48 entries but num_hidden_layers is 47"),
    (lambda d: d["text_config"].update(num_attention_heads=12), "not a multiple of"),
    (lambda d: d["text_config"]["layer_types"].__setitem__(0, "chunked_attention"), "unknown layer types"),
    (lambda d: d["text_config"]["rope_parameters"]["full_attention"].update(rope_type="yarn"), "rope_type='yarn'"),
    (lambda d: d["text_config"].update(hidden_size=-1), "hidden_size must be a positive integer"),
    (lambda d: d["text_config"].update(enable_moe_block=True), "MoE"),
    (lambda d: d["text_config"].update(hidden_activation="relu"), "hidden_activation 'relu'"),
    (lambda d: d["vision_config"].update(output_proj_dims=100), "output_proj_dims (100) must equal mm_embed_dim"),
    (lambda d: d["audio_config"].update(hidden_size=320), "hidden_size (320) must equal audio_embed_dim"),
    (lambda d: d.update(image_token_id=300000), "outside the vocabulary"),
    (lambda d: d["text_config"].update(use_bidirectional_attention="all"), "use_bidirectional_attention='all'"),
]


@needs_12b
@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_invalid_config_fails_with_a_clear_message(mutate, message):
    d = copy.deepcopy(base())
    mutate(d)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        ModelConfig.from_dict(d)


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        unigemma.load_model(tmp_path)


GEMMA3 = dict(model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=5, query_pre_attn_scalar=24)
BAD_GEMMA3 = [
    (dict(num_attention_heads=3), "not a multiple of num_key_value_heads"),
    (dict(attn_logit_softcapping=50.0), "Gemma 2 feature"),
    (dict(use_bidirectional_attention=True), "EmbeddingGemma"),
    (dict(layer_types=["sliding_attention"] * 6), "layer_types has 6 entries but num_hidden_layers is 7"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "proportional", "rope_theta": 1e4},
                           "full_attention": {"rope_theta": 1e6}}), "rope_type='proportional' is not supported"),
    (dict(head_dim=0), "head_dim must be a positive integer"),
]


@pytest.mark.parametrize("change,message", BAD_GEMMA3, ids=[m for _, m in BAD_GEMMA3])
def test_invalid_gemma3_config_fails_with_a_clear_message(change, message):
    with pytest.raises(ConfigError, match="config \\(gemma3_text\\): .*" + __import__("re").escape(message)):
        ModelConfig.from_dict({**GEMMA3, **change})


def test_gemma3_keeps_its_own_layer_pattern_and_shapes():
    """Gemma 3 shares DecoderConfig's checks but not Gemma 4's rules: a sliding last layer stays
    sliding (the 1B has 26 layers), every layer has one head dim, no media token ids."""
    cfg = ModelConfig.from_dict({**GEMMA3, "num_hidden_layers": 26})
    t = cfg.text
    assert t.layer_types[-1] == SLIDING and t.layer_types.count(FULL) == 4
    assert t.head_dim_of(FULL) == t.head_dim_of(SLIDING) == 32 and t.kv_heads_of(FULL) == 2
    assert t.rope_parameters[FULL] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert cfg.image_token_id is None and cfg.audio_token_id is None
