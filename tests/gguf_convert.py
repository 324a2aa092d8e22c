"""Convert a transformers-written test checkpoint to GGUF with llama.cpp's own converter.

Uses the converter vendored in the llama-cpp-python sdist (bench/checkpoint.py fetches it once
with pip). The tiny test models have a 1,024-token vocabulary, so the converter's `set_vocab`
is replaced by one writing 1,024 placeholder tokens (the media markers under their real names,
at the config's ids): the weights, the metadata and the tensor
layout are the converter's own, which is what GGUF import is tested on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.checkpoint import EXTRA_TEXT_KEYS, vendored_llama_cpp  # noqa: E402

MARKERS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>", "audio_token_id": "<|audio|>",
           "boi_token_id": "<|image>", "eoi_token_id": "<image|>", "boa_token_id": "<|audio>",
           "eoa_token_index": "<audio|>"}

_CONVERT = r"""
import json, os, sys
vendor = sys.argv[1]
sys.path.insert(0, vendor); sys.path.insert(0, vendor + "/gguf-py")
import gguf
from conversion import gemma

def set_vocab(self):
    n = self.hparams.get("vocab_size") or self.hparams["text_config"]["vocab_size"]
    w = self.gguf_writer
    w.add_tokenizer_model("gemma4" if self.model_arch == gguf.MODEL_ARCH.GEMMA4 else "llama")
    named = {int(k): v for k, v in json.loads(os.environ.get("MARKER_TOKENS", "{}")).items()}
    w.add_token_list([named.get(i, f"t{i}").encode() for i in range(n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([1] * n)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)

for cls in (gemma.Gemma4Model, gemma.Gemma3Model):
    cls.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
import runpy
runpy.run_path(vendor + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def converter_available() -> str | None:
    """None if the vendored converter can be used, else why not."""
    try:
        vendored_llama_cpp()
        return None
    except Exception as e:  # no network for the one-time pip download, say
        return f"llama.cpp's converter is not available ({e})"


def to_gguf(ckpt: Path, outtype: str, mmproj: bool = False) -> Path:
    """ckpt (a transformers save_pretrained directory) → GGUF next to it; cached."""
    out = ckpt / (f"mmproj-{outtype}.gguf" if mmproj else f"model-{outtype}.gguf")
    if out.exists():
        return out
    vendor = vendored_llama_cpp()
    src = ckpt.with_name(ckpt.name + "-gguf-src")
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    if cfg.get("model_type", "").startswith("gemma4"):
        for k, v in EXTRA_TEXT_KEYS.items():  # the keys transformers leaves out (bench/checkpoint.py)
            text.setdefault(k, v)
        text["vocab_size_per_layer_input"] = text["vocab_size"]
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    (src / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_mean": [0.0] * 3, "image_std": [1.0] * 3}, "image_mean": [0.0] * 3,
         "image_std": [1.0] * 3}))
    (src / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {str(i): i for i in range(text["vocab_size"])}}, "added_tokens": []}))
    for f in ckpt.iterdir():
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
            (src / f.name).symlink_to(f.resolve())
    tmp = out.with_suffix(".tmp")
    args = [str(src), "--outtype", outtype, "--outfile", str(tmp)] + (["--mmproj"] if mmproj else [])
    # the media marker tokens under their real names, at the ids the config gives them
    markers = {cfg[k]: v for k, v in MARKERS.items() if isinstance(cfg.get(k), int)}
    env = dict(os.environ, NO_LOCAL_GGUF="1", PYTHONPATH=str(vendor / "gguf-py"), MARKER_TOKENS=json.dumps(markers))
    subprocess.run([sys.executable, "-c", _CONVERT, str(vendor)] + args, check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp.rename(out)
    shutil.rmtree(src, ignore_errors=True)
    return out


def rewrite_gguf(src: Path, dst: Path, qtype=lambda name, shape: None, drop=(), extra: dict | None = None,
                 meta: dict | None = None) -> Path:
    """Copy a float GGUF with gguf-py's writer, changing it: `qtype(name, shape)` → a
    GGMLQuantizationType to quantize a tensor into (gguf-py's reference quantizers), tensors
    in `drop` left out, `extra` tensors (name → float32 array) added, `meta` keys replaced
    (key → (value, GGUFValueType))."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

    r = GGUFReader(src)
    arch = (meta or {}).get("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        val, vtype = (meta or {}).get(k, (f.contents(), f.types[0]))
        w.add_key_value(k, val, vtype, sub_type=f.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        qt = qtype(t.name, data.shape)
        if qt is None:
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, quants.quantize(data, qt), raw_dtype=qt)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
