"""Load a GGUF model (arch `gemma3` or `gemma4`, plus an optional `gemma4uv`/`gemma4ua` mmproj).

The config is rebuilt from the file's metadata (`config_from_gguf`), every llama.cpp tensor
name is mapped to ours (`our_name`), and tensors stream from the mapping into a meta-built
model through the safetensors loader's `Placer`:
  * Q8_0 / Q4_0 Linear weights (and a Q8_0 token table) stay quantized, repacked exactly
    into our int8 / int4 group-32 layouts;
  * every other type is dequantized (bit-exact to ggml) to the model dtype, or, with `quant`,
    quantized into that scheme (a Q8_0 / Q4_0 tensor whose layout the scheme shares is kept).
Norm weights are taken as stored: llama.cpp folds Gemma 3's (1 + w) into them, which is
the multiplier our Gemma 3 norms hold; Gemma 4 has no offset. The tokenizer and chat
template come from the same file (pipeline.load).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import FULL, SLIDING, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..quant.apply import QuantScheme, is_embedding, is_quantizable
from ..weights.loader import Placer, build_model
from .dequant import dequantize, repack
from .mmproj import mmproj_config, mmproj_path_check, mmproj_tensor
from .reader import GGUFFile
from .types import Q4_0, Q8_0

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


def config_from_gguf(f: GGUFFile, mm: GGUFFile | None = None) -> dict:
    """A config.json-style dict for the file's model (ModelConfig.from_dict reads it)."""
    arch = f.arch
    if arch not in ARCHS:
        raise CheckpointError(f"{f.path}: GGUF architecture {arch!r} is not supported (expected one of {ARCHS})")
    d = _gemma3_text(f.metadata, f.path, f) if arch == "gemma3" else _gemma4_text(f.metadata, f.path, f)
    if mm is not None:
        if arch != "gemma4":
            raise CheckpointError(f"{mm.path}: an mmproj only goes with a gemma4 model, not {arch}")
        d.update(mmproj_config(mm, f.metadata, d["text_config"]["hidden_size"]))
    return d


def _plan(model, f: GGUFFile, arch: str, scheme: QuantScheme | None) -> dict:
    """Module name → (bits, group) for the quantized modules this load builds."""
    types = {our_name(n, arch): t.type for n, t in f.tensors.items()}
    plan = {}
    for name, mod in model.named_modules():
        if not (is_quantizable(name, mod) or is_embedding(name, mod)):
            continue
        t = types.get(name + ".weight")
        native = {Q8_0: (8, 32), Q4_0: (4, 32)}.get(t)
        if scheme is None:
            if native is not None:
                plan[name] = native
        elif is_embedding(name, mod):
            plan[name] = native if native == (8, 32) and scheme.embed_group_size == 32 else (8, scheme.embed_group_size)
        else:
            plan[name] = (scheme.bits, scheme.group_size)
    return plan


def load_gguf(path: str | Path, dtype=torch.bfloat16, device="cpu", quant=None, mmproj=None,
              block_mask: str = "sliding"):
    """The model of a GGUF file (and its mmproj); see `weights.loader.load_model`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    f = GGUFFile(path)
    mm = GGUFFile(mmproj_path_check(mmproj)) if mmproj is not None else None
    try:
        try:
            config = ModelConfig.from_dict(config_from_gguf(f, mm))
        except ConfigError as e:
            raise CheckpointError(f"{path}: the metadata describes an unsupported model ({e})") from e
        scheme = None if quant in (None, "float") else QuantScheme.parse(quant)
        probe = build_model(config, block_mask)  # on the meta device: only its module names are read
        plan = {} if quant == "float" else _plan(probe, f, f.arch, scheme)  # "float": every tensor dequantized
        model = build_model(config, block_mask, dtype=dtype, plan=plan)
        model.quant_scheme = scheme
        placer = Placer(model, dtype, device, f"{path.name}'s metadata")
        _stream(placer, f, lambda n: (our_name(n, f.arch), None))
        if mm is not None:
            _stream(placer, mm, mmproj_tensor)
        return placer.finish()
    finally:
        f.close()
        if mm is not None:
            mm.close()


def _repack_blocks(f: GGUFFile, key: str, raw: torch.Tensor, rows: int = 4096):
    """repack() a block of rows at a time, releasing the file pages behind each block: the
    bytes of a large token table never sit in memory twice."""
    info = f.tensors[key]
    N, K = info.shape
    row = info.nbytes // N
    q = s = None
    for a in range(0, N, rows):
        b = min(N, a + rows)
        _, qb, sb = repack(raw[a * row:b * row], info.type, (b - a, K))
        if q is None:
            q, s = torch.empty((N, *qb.shape[1:]), dtype=qb.dtype), torch.empty((N, *sb.shape[1:]), dtype=sb.dtype)
        q[a:b], s[a:b] = qb, sb
        f.release(key, a * row, (b - a) * row)
    return q, s


def _stream(placer: Placer, f: GGUFFile, rename) -> None:
    """rename: GGUF name → (our name or None to skip, value transform or None)."""
    for key, info in f.tensors.items():
        name, transform = rename(key)
        if name is None:
            continue
        shape = info.shape if transform is None else tuple(transform(torch.empty(info.shape, device="meta")).shape)
        # is_float: dequantized tensors are float; a repack is checked against the float shape too
        placer.check(name, key, shape, True, str(f.path))
        q = placer.quantized_owner(name)
        raw = f.raw(key)
        if q is not None and info.type in (Q8_0, Q4_0) and (q.bits, q.group_size) == {Q8_0: (8, 32), Q4_0: (4, 32)}[info.type]:
            placer.place_quantized(name, *_repack_blocks(f, key, raw), f.path.name)
        elif q is not None:  # dequantize and requantize a block of rows at a time
            N, K = info.shape
            row = info.nbytes // N

            def read_rows(a, b, key=key, info=info, raw=raw, row=row, K=K):
                w = dequantize(raw[a * row:b * row], info.type, (b - a, K)).clone()
                f.release(key, a * row, (b - a) * row)  # those file pages are done with
                return w

            placer.place_rows(name, read_rows, f.path.name)
        else:
            t = dequantize(raw, info.type, info.shape)
            if transform is not None:
                t = transform(t)
            # an F32 tensor is a view of the read-only mapping: copy it into memory of its own
            placer.place(name, t.clone() if t.data_ptr() == raw.data_ptr() else t, f.path.name)
        del raw
        f.release(key)
