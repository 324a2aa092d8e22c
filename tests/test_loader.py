"""Checkpoint loading: both key layouts, shards, and a clear error for every broken file."""

import json
import shutil

import pytest
import torch
from reference import Shape, write_checkpoint
from safetensors.torch import load_file, save_file

import unigemma
from unigemma.errors import CheckpointError, ConfigError


@pytest.fixture
def ckpt(ckpt_root, tmp_path):
    """A private copy of a transformers-written checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(write_checkpoint(Shape(), ckpt_root), dst)
    return dst


def rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_sharded_checkpoint_loads_identically(ckpt):
    whole = unigemma.load_model(ckpt, dtype="float32")
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    (ckpt / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, ckpt / fname)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    sharded = unigemma.load_model(ckpt, dtype="float32")
    ids = torch.randint(3, 900, (1, 12))
    assert torch.equal(whole.logits(ids), sharded.logits(ids))


def test_loads_in_bfloat16_without_float32_copies(ckpt):
    model = unigemma.load_model(ckpt, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.bfloat16 for b in model.buffers())
    assert not any(p.is_meta for p in model.parameters())


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.language_model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors: \['model.language_model.layers.2.mlp.up_proj.weight'\]"):
        unigemma.load_model(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.language_model.layers.3.self_attn.v_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor 'model.language_model.layers.3.self_attn.v_proj.weight'"):
        unigemma.load_model(ckpt)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda t: t.update({"model.vision_embedder.pos_embedding": torch.zeros(8, 2, 48)}))
    with pytest.raises(CheckpointError, match=r"'model.vision_embedder.pos_embedding' has shape \(8, 2, 48\), the config implies \(16, 2, 48\)"):
        unigemma.load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        unigemma.load_model(ckpt)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"garbage" * 100, (10**9).to_bytes(8, "little") + b"{}"])
def test_corrupt_file(ckpt, payload):
    (ckpt / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        unigemma.load_model(ckpt)


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: config: unknown model_type 'gemma3'"):
        unigemma.load_model(ckpt)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are never loaded"):
        unigemma.load_model(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-0001.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lists shard files that do not exist: \['model-0001.safetensors'\]"):
        unigemma.load_model(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        unigemma.load_model(tmp_path / "nope")


def test_bad_dtype(ckpt):
    with pytest.raises(ValueError, match="dtype must be one of"):
        unigemma.load_model(ckpt, dtype="int8")


def test_load_options_parse_the_quantization_once():
    from unigemma.quant.apply import QuantScheme
    from unigemma.weights.options import LoadOptions

    o = LoadOptions.parse("float32", quant="int4-g32")
    assert o.dtype == torch.float32 and o.quant == QuantScheme.parse("int4-g32") and not o.dequantize
    with pytest.warns(DeprecationWarning):
        assert LoadOptions.parse(quant="float") == LoadOptions.parse(dequantize=True)
    with pytest.raises(ValueError, match="unknown quantization"):
        LoadOptions.parse(quant="int3")
    assert not LoadOptions.parse(device="meta", pack=True).pack  # packing only where oneDNN can


def test_gguf_code_imports_nothing_from_the_loader():
    """The load pipeline's layers: gguf/ reads the format and knows llama.cpp's names; weights/
    (sources, placer, loader) uses it, never the other way round (no import circle)."""
    import ast
    from pathlib import Path

    import unigemma.gguf

    for f in Path(unigemma.gguf.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "weights" not in (node.module or ""), f"{f.name} imports {node.module}"


def test_random_checkpoint_writer_shards_what_it_writes_whole(tmp_path):
    """The one random-checkpoint writer: sharded or whole, the same tensors, and the loader reads both."""
    from reference import hf_config

    from unigemma.weights.random import write_random_checkpoint

    cfg = hf_config(Shape(vision=False, audio=False))
    whole = write_random_checkpoint(cfg, tmp_path / "whole", seed=1)
    sharded = write_random_checkpoint(cfg, tmp_path / "sharded", seed=1, shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    a, b = unigemma.load_model(whole, dtype="float32"), unigemma.load_model(sharded, dtype="float32")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="via"):
        write_random_checkpoint(cfg, tmp_path / "x", via="llama.cpp")
