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
