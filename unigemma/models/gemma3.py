"""Gemma 3 text (`gemma3_text`, `Gemma3ForCausalLM`, GGUF arch `gemma3`): the family module.

What differs from Gemma 4, and all this file holds (models/base.py runs the model):

    h = h + post_attention_norm(attn(input_norm(h)))
    h = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))          no layer scalar
    attn: q = rope(q_norm(q_proj x)), k = rope(k_norm(k_proj x)), v = v_proj x   (no v norm)
          softmax(q kᵀ · query_pre_attn_scalar^-0.5 + mask) v

Gemma 3's RMSNorm multiplies by (1 + w). Checkpoints store w; llama.cpp's converter stores
1 + w (`norm_shift` in its gemma3 converter). We hold the multiplier 1 + w in float32, as the
reference computes it (`1.0 + weight.float()`): `transform` adds the 1 for safetensors
checkpoints, GGUF tensors are taken as they are. No K=V, one head dim on every layer, sliding
window on 5 of 6 layers, no media (`embed` rejects them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import FULL, SLIDING, DecoderConfig, ModelConfig, check, every_sixth_full, from_keys, stored_dtype
from ..errors import InputError
from . import gguf_meta
from .attention import attend
from .base import CausalLM, Family
from .layers import MLP
from .rope import apply_rope
from .text import TextModel


@dataclass
class Gemma3TextConfig(DecoderConfig):
    """Gemma 3's text config: one head dim and KV head count on every layer, sliding layers 5 of
    every 6, attention scaled by query_pre_attn_scalar^-0.5, default or linear RoPE."""
    WHERE = "config (gemma3_text)"
    ROPE_TYPES = ("default", "linear")

    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    sliding_window: int = 512
    max_position_embeddings: int = 32_768
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False

    def __post_init__(self):
        w = self.WHERE
        self.check_sizes()
        check(self.attn_logit_softcapping is None, w, "attn_logit_softcapping is a Gemma 2 feature, not supported")
        check(not self.use_bidirectional_attention, w, "bidirectional attention (EmbeddingGemma) is not supported")
        check(self.num_attention_heads % self.num_key_value_heads == 0, w,
              f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
              f"{self.num_key_value_heads}")
        if self.rope_parameters is None:
            self.rope_parameters = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                                    FULL: {"rope_type": "default", "rope_theta": 1_000_000.0}}
        self.check_rope()
        self.layer_head_dims = [self.head_dim] * self.num_hidden_layers
        self.layer_kv_heads = [self.num_key_value_heads] * self.num_hidden_layers


class Norm(nn.Module):
    """RMSNorm whose `weight` is the whole multiplier (1 + w of the checkpoint), kept in float32."""

    keeps_float32 = True  # the loader does not cast this weight to the model dtype

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # rsqrt, as the reference
        return (y * self.weight.float()).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.scaling = config.query_pre_attn_scalar ** -0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Norm(self.head_dim, config.rms_norm_eps)
        self.k_norm = Norm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, S, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, S, -1, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, S, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(B, S, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask, self.scaling, use_decode_kernel=False)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Norm(config.hidden_size, eps)
        self.post_attention_layernorm = Norm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = Norm(config.hidden_size, eps)
        self.post_feedforward_layernorm = Norm(config.hidden_size, eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, block_mask: str = "sliding"):
        super().__init__(config, block_mask)
        self.model = TextModel(config.text, layer=DecoderLayer, norm=Norm)
        self.add_head()

    @property
    def text(self) -> TextModel:
        return self.model

    @property
    def dtype(self) -> torch.dtype:
        # the norms are float32 whatever the model dtype; a quantized table records the dtype it yields
        e = self.model.embed_tokens
        return getattr(e, "dtype", None) or e.weight.dtype

    def embed(self, input_ids: torch.Tensor, require_media: bool = True, **media) -> torch.Tensor:
        given = [k for k, v in media.items() if v is not None]
        if given:
            raise InputError(f"Gemma 3 text takes no media inputs, got {given}")
        return self.model.embed(input_ids)


def parse_config(d: dict, model_type: str) -> ModelConfig:
    """Gemma3ForCausalLM's config.json: the text config at the top level, no media token ids."""
    none = dict.fromkeys(("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                          "eoi_token_id", "boa_token_id", "eoa_token_index"))
    return ModelConfig(text=from_keys(Gemma3TextConfig, d, "config"), model_type=model_type,
                       eos_token_id=d.get("eos_token_id"), dtype=stored_dtype(d), **none)


# -- checkpoint names and values, both ways -----------------------------------------------------
def checkpoint_name_to_module(name: str, config: ModelConfig) -> str | None:
    """Our module tree mirrors Gemma3ForCausalLM's names; a tied head's copy is not stored."""
    return None if name == "lm_head.weight" and config.text.tie_word_embeddings else name


def module_name_to_checkpoint(name: str, config: ModelConfig) -> str:
    return name


def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Fold Gemma 3's (1 + w) into the norm weights once, in float32 as the reference computes it."""
    return tensor.float() + 1.0 if name.endswith("norm.weight") else tensor


def untransform(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Our multiplier 1 + w → the checkpoint's w (exact for multipliers in [0.5, 2])."""
    return tensor.float() - 1.0 if name.endswith("norm.weight") else tensor


def is_quantizable(name: str, module: nn.Module) -> bool:
    """The decoder's projections and a separate LM head."""
    return isinstance(module, nn.Linear) and (name.startswith("model.layers.") or name == "lm_head")


# -- GGUF (llama.cpp arch "gemma3") ---------------------------------------------------------------
def gguf_name(name: str) -> str | None:
    return gguf_meta.tensor_name(name, "model.")


def gguf_config(f, read=None) -> dict:
    """A GGUF file's metadata (f.metadata, f.tensors, f.path) → a config.json-style dict."""
    meta, path = f.metadata, f.path
    c = gguf_meta.common(meta, "gemma3", path, f.tensors)
    n, hd = c["num_hidden_layers"], int(gguf_meta.get(meta, "gemma3.attention.key_length", path))
    # what llama.cpp's gemma3 graph does: 1/sqrt(head_dim), except the 27B (62 layers): hidden/heads
    scalar = c["hidden_size"] // c["num_attention_heads"] if n == 62 else hd
    full = {"rope_type": "default", "rope_theta": float(meta.get("gemma3.rope.freq_base", 1e6))}
    if meta.get("gemma3.rope.scaling.type") == "linear":
        full = {"rope_type": "linear", "rope_theta": full["rope_theta"],
                "factor": float(meta["gemma3.rope.scaling.factor"])}
    return dict(c, model_type="gemma3_text", head_dim=hd, query_pre_attn_scalar=scalar,
                num_key_value_heads=gguf_meta.per_layer(gguf_meta.get(meta, "gemma3.attention.head_count_kv", path), n)[0],
                # llama.cpp hard-codes both for gemma3: every 6th layer global, local RoPE base 10k
                layer_types=every_sixth_full(n),
                rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10_000.0}, FULL: full})


def tiny_config(model_type: str = "gemma3_text") -> dict:
    """A tiny gemma3_text config.json: 7 layers (the last one sliding), window 5, scalar 24 ≠ head dim."""
    return dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                sliding_window=5, query_pre_attn_scalar=24)


FAMILY = Family(name="Gemma 3 text", model_types=("gemma3_text",), model=Gemma3ForCausalLM,
                parse_config=parse_config, to_ours=checkpoint_name_to_module, to_disk=module_name_to_checkpoint,
                is_quantizable=is_quantizable, tiny_config=tiny_config, load_transform=transform,
                save_transform=untransform, gguf_archs=("gemma3",), gguf_config=gguf_config, gguf_name=gguf_name,
                chat_template="gemma3")
