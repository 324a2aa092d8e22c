"""llama.cpp's GGUF names shared by the Gemma families: metadata keys → config fields, tensor names → ours.

A family's GGUF mapping (`gguf_config`, `gguf_name` in models/<family>.py) builds on these:
the keys every Gemma arch writes under `<arch>.` (sizes, eps, softcap, window, token ids) and
the per-block tensor names. This file reads a GGUF file's metadata dict and tensor table only;
it knows nothing of reading or dequantizing tensors (gguf/) or of any one family.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

BLOCK = {  # llama.cpp's per-layer tensor names → ours (under the decoder's layers.N.)
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "layer_output_scale": "layer_scalar",
}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def tensor_name(gguf_name: str, prefix: str) -> str | None:
    """llama.cpp tensor name → our parameter name, the decoder living under `prefix` (e.g.
    "model."); None: consumed by the config, not a weight. Unknown names come back unchanged
    (the loader reports them as unexpected)."""
    if gguf_name == "rope_freqs.weight":
        return None  # Gemma 4's proportional RoPE, read into the config
    top = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if gguf_name in top:
        return prefix + top[gguf_name]
    if gguf_name == "output.weight":
        return "lm_head.weight"
    m = _BLK.match(gguf_name)
    if m and m.group(2) in BLOCK:
        leaf = BLOCK[m.group(2)]
        return f"{prefix}layers.{m.group(1)}.{leaf}" + ("" if leaf == "layer_scalar" else ".weight")
    return gguf_name


def get(meta: dict, key: str, path: Path, default=None):
    v = meta.get(key, default)
    if v is None:
        raise CheckpointError(f"{path}: metadata key {key!r} is missing")
    return v


def per_layer(v, n: int) -> list[int]:
    """A scalar or per-layer metadata value → one int per layer."""
    a = np.atleast_1d(np.asarray(v)).astype(int).tolist()
    return a * n if len(a) == 1 else a


def common(meta: dict, arch: str, path: Path, tensors: dict) -> dict:
    """The text-config fields every Gemma arch stores the same way (`tensors`: name → info with .shape)."""
    a = arch + "."
    n = int(get(meta, a + "block_count", path))
    ff = per_layer(get(meta, a + "feed_forward_length", path), n)
    if len(set(ff)) != 1:
        raise CheckpointError(f"{path}: per-layer feed-forward sizes {sorted(set(ff))} are not supported")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' is missing")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return dict(vocab_size=emb.shape[0], hidden_size=int(get(meta, a + "embedding_length", path)),
                intermediate_size=ff[0], num_hidden_layers=n,
                num_attention_heads=int(per_layer(get(meta, a + "attention.head_count", path), n)[0]),
                rms_norm_eps=float(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
                final_logit_softcapping=meta.get(a + "final_logit_softcapping"),
                max_position_embeddings=int(meta.get(a + "context_length", 131072)),
                tie_word_embeddings="output.weight" not in tensors,
                sliding_window=int(get(meta, a + "attention.sliding_window", path)),
                bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
                eos_token_id=None if eos is None else int(eos),
                pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)))
