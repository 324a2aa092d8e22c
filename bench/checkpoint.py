"""Random mid-size Gemma 4 unified checkpoints for benchmarks, and their GGUF conversions.

`make_checkpoint()` writes (once, cached under runs/bench/ by a hash of the config) a random
checkpoint built and saved by transformers itself (the reference), through unigemma's one
writer (`write_random_checkpoint(..., via="transformers")`): the real 262,144-token
vocabulary and special token ids, a 12B-like layout scaled down (sliding head dim 256, full head
dim 512 with K=V and one global KV head), vision and audio embedders, every parameter randomised
with a modest std so greedy decoding does not collapse onto one token, stored in bf16.

`to_gguf()` converts its text model with llama.cpp's own converter, vendored in the
llama-cpp-python 0.3.36 sdist (fetched with `pip download`), for llama.cpp to run on the very
same weights. Workarounds, applied to a scratch copy of the config, never to the checkpoint:
  * transformers does not write the MoE / per-layer-embedding keys the real config carries
    (enable_moe_block, num_experts, hidden_size_per_layer_input, num_kv_shared_layers, ...);
    the converter reads them, so they are added with the real 12B's values;
  * processor_config.json gets an image_mean (the converter asks for it);
  * the checkpoint has no tokenizer files: a stub tokenizer.json gives the vocab size (the
    converter trims the embedding to it), and the vocabulary (tokens, scores, types, merges, special
    ids, chat template) is copied from llama.cpp's vocab-only Gemma 4 GGUF
    (shared/fixtures/gemma4-vocab/ggml-vocab-gemma-4.gguf) in place of the converter's set_vocab.

    python -m bench.checkpoint [--hidden 1536 --layers 8] [--gguf f32 bf16 q8_0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "runs" / "bench"
VOCAB_GGUF = Path(os.environ.get("UNIGEMMA_VOCAB_GGUF", "/work/shared/fixtures/gemma4-vocab/ggml-vocab-gemma-4.gguf"))
LLAMA_CPP_PYTHON = "0.3.36"

S, F = "sliding_attention", "full_attention"
REAL_IDS = dict(image_token_id=258880, video_token_id=258884, audio_token_id=258881, boi_token_id=255999,
                eoi_token_id=258882, boa_token_id=256000, eoa_token_index=258883)
# Keys of the real 12B text config that transformers' save_pretrained leaves out (peers.md).
EXTRA_TEXT_KEYS = dict(enable_moe_block=False, moe_intermediate_size=None, num_experts=None, top_k_experts=None,
                       hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144, num_kv_shared_layers=0,
                       use_double_wide_mlp=False)


def bench_config(*, hidden: int = 1536, layers: int = 8, full_every: int = 4, heads: int = 8, kv_heads: int = 4,
                 head_dim: int = 256, global_head_dim: int = 512, global_kv_heads: int = 1, intermediate: int | None = None,
                 window: int = 1024, vocab: int = 262144, posemb: int = 1120) -> dict:
    """Config dict (Gemma4UnifiedConfig kwargs) of the benchmark model: 12B layout, scaled down."""
    layer_types = [F if (i + 1) % full_every == 0 else S for i in range(layers)]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, global_head_dim=global_head_dim, num_global_key_value_heads=global_kv_heads,
                attention_k_eq_v=True, sliding_window=window, layer_types=layer_types, final_logit_softcapping=30.0,
                max_position_embeddings=262144, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                rope_parameters={F: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                                 S: {"rope_theta": 10000.0, "rope_type": "default"}})
    vision = dict(mm_embed_dim=hidden, output_proj_dims=hidden, mm_posemb_size=posemb)  # output_proj_dims is not synced
    return dict(text_config=text, vision_config=vision, audio_config=dict(), tie_word_embeddings=True, **REAL_IDS)


EMBED_STD = 0.01


def config_key(cfg: dict, seed: int) -> str:
    return hashlib.sha1(json.dumps([cfg, seed, EMBED_STD], sort_keys=True).encode()).hexdigest()[:12]


def make_checkpoint(root: str | os.PathLike | None = None, *, seed: int = 0, **shape) -> Path:
    """Write (once) the random bf16 checkpoint for `bench_config(**shape)`; return its directory."""
    cfg = bench_config(**shape)
    path = Path(root or ROOT) / f"ckpt-{config_key(cfg, seed)}"
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return path
    import torch

    from unigemma.weights.random import write_random_checkpoint

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # transformers builds and writes it; embeddings small next to the blocks' outputs (EMBED_STD)
    write_random_checkpoint({"model_type": "gemma4_unified", **cfg}, tmp, seed=seed, dtype=torch.bfloat16,
                            via="transformers", embed_std=EMBED_STD)
    (tmp / "bench_config.json").write_text(json.dumps({"config": cfg, "seed": seed}, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------- GGUF

def vendored_llama_cpp(root: str | os.PathLike | None = None) -> Path:
    """llama.cpp's converter + gguf-py from the llama-cpp-python sdist (downloaded once with pip)."""
    base = Path(root or ROOT) / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    vendor = base / "vendor" / "llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").exists() and (vendor / "conversion").is_dir():
        return vendor
    dl = base.with_name(base.name + ".dl")
    dl.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(dl), "-q"], check=True)
    sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
    want = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/conversion/")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if any(m.name.startswith(f"{top}/{w}") for w in want)]
        tmp = base.with_name(base.name + ".x")
        shutil.rmtree(tmp, ignore_errors=True)
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(base, ignore_errors=True)
    (tmp / top).rename(base)
    shutil.rmtree(tmp, ignore_errors=True)
    return vendor


_CONVERT = r"""
import sys
vendor, vocab_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, vendor); sys.path.insert(0, vendor + "/gguf-py")
import gguf
from conversion import gemma

def set_vocab(self):
    # the checkpoint has no tokenizer files: copy llama.cpp's own Gemma 4 vocabulary
    r = gguf.GGUFReader(vocab_path)
    f = r.fields
    def strings(k): return [bytes(f[k].parts[i]) for i in f[k].data]
    def array(k): return [f[k].parts[i][0].item() for i in f[k].data]
    def scalar(k): return f[k].parts[f[k].data[0]][0].item()
    w = self.gguf_writer
    w.add_tokenizer_model(bytes(f["tokenizer.ggml.model"].parts[-1]).decode())
    w.add_token_list(strings("tokenizer.ggml.tokens"))
    w.add_token_scores(array("tokenizer.ggml.scores"))
    w.add_token_types(array("tokenizer.ggml.token_type"))
    w.add_token_merges([s.decode() for s in strings("tokenizer.ggml.merges")])
    w.add_bos_token_id(scalar("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(scalar("tokenizer.ggml.eos_token_id"))
    w.add_unk_token_id(scalar("tokenizer.ggml.unknown_token_id"))
    w.add_pad_token_id(scalar("tokenizer.ggml.padding_token_id"))
    w.add_mask_token_id(scalar("tokenizer.ggml.mask_token_id"))
    w.add_chat_template(bytes(f["tokenizer.chat_template"].parts[-1]).decode())
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)

gemma.Gemma4Model.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
import runpy
runpy.run_path(vendor + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def to_gguf(ckpt: str | os.PathLike, outtype: str = "bf16", root: str | os.PathLike | None = None) -> Path:
    """Convert the checkpoint's text model with llama.cpp's converter (f32, bf16, f16 or q8_0); cached."""
    ckpt = Path(ckpt)
    out = ckpt / f"text-{outtype}.gguf"
    if out.exists():
        return out
    vendor = vendored_llama_cpp(root)
    src = ckpt / "gguf-src"  # scratch copy the converter reads: patched config, linked weights
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in EXTRA_TEXT_KEYS.items():
        cfg["text_config"].setdefault(k, v)
    cfg["text_config"]["vocab_size_per_layer_input"] = cfg["text_config"]["vocab_size"]
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    (src / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}, "image_mean": [0.0, 0.0, 0.0],
         "image_std": [1.0, 1.0, 1.0]}))
    # read only for its length (the embedding rows to keep): a stub with the model's vocab size
    (src / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {str(i): i for i in range(cfg["text_config"]["vocab_size"])}}, "added_tokens": []}))
    for f in ckpt.iterdir():
        if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json" or f.name == "generation_config.json":
            (src / f.name).symlink_to(f.resolve())
    tmp = out.with_suffix(".gguf.tmp")
    env = dict(os.environ, NO_LOCAL_GGUF="1", PYTHONPATH=str(vendor / "gguf-py"))
    subprocess.run([sys.executable, "-c", _CONVERT, str(vendor), str(VOCAB_GGUF), str(src), "--outtype", outtype,
                    "--outfile", str(tmp)], check=True, env=env)
    tmp.rename(out)
    shutil.rmtree(src, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gguf", nargs="*", default=[])
    args = ap.parse_args()
    path = make_checkpoint(hidden=args.hidden, layers=args.layers)
    print(json.dumps({"checkpoint": str(path), **{f"gguf_{t}": str(to_gguf(path, t)) for t in args.gguf}}))


if __name__ == "__main__":
    main()
