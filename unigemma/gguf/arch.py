"""What a GGUF file's metadata and tensor names mean, per architecture (`gemma3`, `gemma4`).

`config_from_gguf(f, mm)` rebuilds a config.json-style dict from the metadata (and an optional
`gemma4uv` / `gemma4ua` mmproj's, gguf/mmproj.py); `our_name` maps every llama.cpp tensor name to
ours. The per-architecture knowledge sits behind two functions, `arch_config(arch, meta, path, f)`
and `arch_tensor_name(arch, name)`, so a model-family registry can answer for them. Norm weights
are taken as stored: llama.cpp folds Gemma 3's (1 + w) into them, which is the multiplier our
Gemma 3 norms hold; Gemma 4 has no offset. Reading and placing the tensors is
weights/gguf_source.py's and weights/placer.py's job; this module builds no model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import FULL, SLIDING
from ..errors import CheckpointError
from .dequant import dequantize
from .mmproj import mmproj_config
from .reader import GGUFFile

ARCHS = ("gemma3", "gemma4")
_BLOCK = {  # llama.cpp's per-layer tensor names → ours (under the decoder's layers.N.)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "layer_output_scale": "layer_scalar",
}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def our_name(gguf_name: str, arch: str) -> str | None:
    """llama.cpp tensor name → our parameter name (None: consumed by the config, not a weight)."""
    return arch_tensor_name(arch, gguf_name)


def arch_tensor_name(arch: str, gguf_name: str) -> str | None:
    """Architecture `arch`'s tensor `gguf_name` → our name (None: not a weight; an unknown name
    comes back as it is, for the placer to report as unexpected)."""
    prefix = "model.language_model." if arch == "gemma4" else "model."
    if gguf_name == "rope_freqs.weight":
        return None  # Gemma 4's proportional RoPE, read into the config
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if gguf_name in top:
        return prefix + top[gguf_name]
    if gguf_name == "output.weight":
        return "lm_head.weight"
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _BLOCK:
        leaf = _BLOCK[m.group(2)]
        return f"{prefix}layers.{m.group(1)}.{leaf}" + ("" if leaf == "layer_scalar" else ".weight")
    return gguf_name  # unknown: the Placer reports it as unexpected


def _get(meta: dict, key: str, path: Path, default=None):
    v = meta.get(key, default)
    if v is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return v


def _per_layer(v, n: int) -> list[int]:
    a = np.atleast_1d(np.asarray(v)).astype(int).tolist()
    return a * n if len(a) == 1 else a


def _common(meta: dict, arch: str, path: Path, f: GGUFFile) -> dict:
    a = arch + "."
    n = int(_get(meta, a + "block_count", path))
    ff = _per_layer(_get(meta, a + "feed_forward_length", path), n)
    if len(set(ff)) != 1:
        raise CheckpointError(f"{path}: per-layer feed-forward sizes {sorted(set(ff))} are not supported")
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return dict(vocab_size=emb.shape[0], hidden_size=int(_get(meta, a + "embedding_length", path)),
                intermediate_size=ff[0], num_hidden_layers=n,
                num_attention_heads=int(_per_layer(_get(meta, a + "attention.head_count", path), n)[0]),
                rms_norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
                final_logit_softcapping=meta.get(a + "final_logit_softcapping"),
                max_position_embeddings=int(meta.get(a + "context_length", 131072)),
                tie_word_embeddings="output.weight" not in f.tensors,
                sliding_window=int(_get(meta, a + "attention.sliding_window", path)),
                bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
                eos_token_id=None if eos is None else int(eos),
                pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)))


def _gemma3_text(meta: dict, path: Path, f: GGUFFile) -> dict:
    c = _common(meta, "gemma3", path, f)
    n, hd = c["num_hidden_layers"], int(_get(meta, "gemma3.attention.key_length", path))
    # what llama.cpp's gemma3 graph does: 1/sqrt(head_dim), except the 27B (62 layers): hidden/heads
    scalar = c["hidden_size"] // c["num_attention_heads"] if n == 62 else hd
    full = {"rope_type": "default", "rope_theta": float(meta.get("gemma3.rope.freq_base", 1e6))}
    if meta.get("gemma3.rope.scaling.type") == "linear":
        full = {"rope_type": "linear", "rope_theta": full["rope_theta"],
                "factor": float(meta["gemma3.rope.scaling.factor"])}
    return dict(c, model_type="gemma3_text", head_dim=hd, query_pre_attn_scalar=scalar,
                num_key_value_heads=_per_layer(_get(meta, "gemma3.attention.head_count_kv", path), n)[0],
                # llama.cpp hard-codes both for gemma3: every 6th layer global, local RoPE base 10k
                layer_types=[FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)],
                rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}, FULL: full})


def _gemma4_text(meta: dict, path: Path, f: GGUFFile) -> dict:
    c = _common(meta, "gemma4", path, f)
    n = c["num_hidden_layers"]
    swa = [bool(x) for x in np.atleast_1d(_get(meta, "gemma4.attention.sliding_window_pattern", path))]
    if len(swa) != n:
        raise CheckpointError(f"{path}: sliding_window_pattern has {len(swa)} entries for {n} layers")
    types = [SLIDING if s else FULL for s in swa]
    kv = _per_layer(_get(meta, "gemma4.attention.head_count_kv", path), n)
    hd, ghd = int(_get(meta, "gemma4.attention.key_length_swa", path)), int(_get(meta, "gemma4.attention.key_length", path))
    if int(meta.get("gemma4.attention.shared_kv_layers", 0)) or int(meta.get("gemma4.embedding_length_per_layer_input", 0)):
        raise CheckpointError(f"{path}: KV sharing / per-layer inputs (Gemma 4 E2B/E4B) are not supported")
    if any(k.startswith("gemma4.expert_") for k in meta) or any(".ffn_gate_exps." in t for t in f.tensors):
        raise CheckpointError(f"{path}: Gemma 4 mixture-of-experts files are not supported")
    if int(meta.get("gemma4.rope.dimension_count_swa", hd)) != hd:
        raise CheckpointError(f"{path}: partial RoPE on sliding layers is not supported")
    rope_full = {"rope_type": "proportional", "rope_theta": float(_get(meta, "gemma4.rope.freq_base", path)),
                 "partial_rotary_factor": _rotary_factor(f, ghd, path)}
    k_eq_v = all(f"blk.{i}.attn_v.weight" not in f.tensors for i, t in enumerate(types) if t == FULL)
    full_kv = {kv[i] for i, t in enumerate(types) if t == FULL}
    text = dict(c, head_dim=hd, global_head_dim=ghd, attention_k_eq_v=k_eq_v, layer_types=types,
                num_key_value_heads=next(kv[i] for i, t in enumerate(types) if t == SLIDING) if SLIDING in types else kv[0],
                num_global_key_value_heads=full_kv.pop() if len(full_kv) == 1 else None,
                rope_parameters={SLIDING: {"rope_type": "default",
                                           "rope_theta": float(meta.get("gemma4.rope.freq_base_swa", 10_000.0))},
                                 FULL: rope_full})
    if not k_eq_v:  # per_layer_config carries the full layers' KV heads when V is separate
        text["per_layer_config"] = {str(i): {"head_dim": ghd, "num_key_value_heads": kv[i]}
                                    for i, t in enumerate(types) if t == FULL}
    return dict(model_type="gemma4_unified", text_config=text)


def _rotary_factor(f: GGUFFile, global_head_dim: int, path: Path) -> float:
    """llama.cpp encodes proportional RoPE as freq factors: 1 for rotated pairs, 1e30 (frequency
    ~0) for the rest (its gemma4 converter's `generate_extra_tensors`)."""
    t = f.tensors.get("rope_freqs.weight")
    if t is None:
        return 1.0
    v = dequantize(f.raw(t.name), t.type, t.shape).numpy()
    rotated = int((v == 1.0).sum())
    if v.shape != (global_head_dim // 2,) or rotated + int((v >= 1e29).sum()) != v.size or (v[:rotated] != 1).any():
        raise CheckpointError(f"{path}: rope_freqs.weight is not a proportional-RoPE mask (1 … 1, 1e30 … 1e30)")
    return 2 * rotated / global_head_dim


def arch_config(arch: str, meta: dict, path: Path, f: GGUFFile) -> dict:
    """The config dict architecture `arch`'s metadata describes (the text model)."""
    return _gemma3_text(meta, path, f) if arch == "gemma3" else _gemma4_text(meta, path, f)


def config_from_gguf(f: GGUFFile, mm: GGUFFile | None = None) -> dict:
    """A config.json-style dict for the file's model (ModelConfig.from_dict reads it)."""
    arch = f.arch
    if arch not in ARCHS:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported (expected one of {ARCHS})")
    d = arch_config(arch, f.metadata, f.path, f)
    if mm is not None:
        if arch != "gemma4":
            raise CheckpointError(f"{mm.path}: an mmproj only goes with a gemma4 model, not {arch}")
        d.update(mmproj_config(mm, f.metadata, d["text_config"]["hidden_size"]))
    return d
