"""Typed model configs read from a checkpoint's `config.json`.

Mirrors the keys transformers writes for `gemma4_unified` (and `gemma4_unified_text`) and
the real 12B config, which carries extra backward-compatibility keys. Unknown keys are
ignored; keys that would change the architecture in ways we do not implement (MoE, per-layer
inputs, KV sharing) are rejected with a clear message rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional", "linear")


def _from_dict(cls, d: dict[str, Any], where: str):
    """Build dataclass `cls` from the keys of `d` it declares; ignore the rest."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as e:  # wrong value types surface here from __post_init__ arithmetic
        raise ConfigError(f"{where}: {e}") from e


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


@dataclass
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15360
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    # Full-attention overrides. transformers >= 5.2x writes them as `per_layer_config`;
    # the released 12B config.json has `global_head_dim` / `num_global_key_value_heads`.
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    attention_k_eq_v: bool = False
    layer_types: list[str] | None = None
    sliding_window: int = 1024
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    use_bidirectional_attention: str | None = "vision"
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] | None = 1
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    hidden_size_per_layer_input: int | None = 0

    # resolved per layer in __post_init__
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    def __post_init__(self):
        w = "text_config"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, w,
                   f"{name} must be a positive integer, got {v!r}")
        _check(self.hidden_activation in ("gelu_pytorch_tanh", "gelu_tanh"), w,
               f"hidden_activation {self.hidden_activation!r} is not supported (Gemma 4 uses gelu_pytorch_tanh)")
        _check(not self.enable_moe_block, w, "enable_moe_block=true (MoE) is not part of the unified model")
        _check(not self.hidden_size_per_layer_input, w,
               "hidden_size_per_layer_input > 0 (per-layer inputs) is not part of the unified model")
        _check(self.num_kv_shared_layers == 0, w,
               f"num_kv_shared_layers={self.num_kv_shared_layers}: KV sharing is only used by MTP drafters")
        _check(self.use_bidirectional_attention in (None, "vision"), w,
               f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
               "(expected \"vision\" or null)")
        _check(self.final_logit_softcapping is None or self.final_logit_softcapping > 0, w,
               "final_logit_softcapping must be positive or null")

        if self.layer_types is None:  # transformers' default: every 6th layer is full attention
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        _check(isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers, w,
               f"layer_types has {len(self.layer_types or [])} entries but num_hidden_layers is "
               f"{self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        _check(not bad, w, f"unknown layer types {bad}; expected {list(LAYER_TYPES)}")
        if self.layer_types[-1] != FULL:
            # The reference forces this too (with a warning); weights are shaped for it.
            log.warning("text_config: last layer must be full attention; forcing it as transformers does")
            self.layer_types = [*self.layer_types[:-1], FULL]

        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        for t in set(self.layer_types):
            p = self.rope_parameters.get(t) if isinstance(self.rope_parameters, dict) else None
            _check(isinstance(p, dict), w, f"rope_parameters has no entry for layer type {t!r}")
            _check(p.get("rope_type", "default") in ROPE_TYPES, w,
                   f"rope_parameters[{t!r}].rope_type={p.get('rope_type')!r} is not supported; expected {ROPE_TYPES}")
            _check(isinstance(p.get("rope_theta"), (int, float)) and p["rope_theta"] > 0, w,
                   f"rope_parameters[{t!r}].rope_theta must be a positive number")
            f = p.get("partial_rotary_factor", 1.0)
            _check(0 < f <= 1, w, f"rope_parameters[{t!r}].partial_rotary_factor must be in (0, 1], got {f}")

        self._resolve_per_layer()

    def _resolve_per_layer(self):
        """Head dim and KV heads per layer, the way transformers' config resolves them."""
        w = "text_config"
        overrides: dict[int, dict] = {}
        if self.per_layer_config is not None:
            _check(isinstance(self.per_layer_config, dict), w, "per_layer_config must be an object")
            for k, v in self.per_layer_config.items():
                _check(str(k).isdigit() and int(k) < self.num_hidden_layers, w,
                       f"per_layer_config key {k!r} is not a layer index below {self.num_hidden_layers}")
                overrides[int(k)] = dict(v)
        else:
            o = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                o["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: o for i, t in enumerate(self.layer_types) if t == FULL}
        self.layer_head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(self.num_hidden_layers)]
        self.layer_kv_heads = [overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads)
                               for i in range(self.num_hidden_layers)]
        for i in range(self.num_hidden_layers):
            hd, kv = self.layer_head_dims[i], self.layer_kv_heads[i]
            _check(hd > 0 and hd % 2 == 0, w, f"layer {i}: head_dim {hd} must be a positive even number")
            _check(kv > 0 and self.num_attention_heads % kv == 0, w,
                   f"layer {i}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                   f"its {kv} key/value heads")
        # Every layer of one type must share head dim and KV heads: the RoPE tables and the
        # KV-cache layout are per type.
        for t in set(self.layer_types):
            shapes = {(self.layer_head_dims[i], self.layer_kv_heads[i]) for i, lt in enumerate(self.layer_types) if lt == t}
            _check(len(shapes) == 1, w, f"layers of type {t!r} disagree on (head_dim, kv_heads): {sorted(shapes)}")

    def head_dim_of(self, layer_type: str) -> int:
        return self.layer_head_dims[self.layer_types.index(layer_type)]

    def kv_heads_of(self, layer_type: str) -> int:
        return self.layer_kv_heads[self.layer_types.index(layer_type)]

    def uses_v_proj(self, layer_idx: int) -> bool:
        """Full layers with attention_k_eq_v take V from the raw K projection."""
        return not (self.attention_k_eq_v and self.layer_types[layer_idx] == FULL)


@dataclass
class Gemma3TextConfig:
    """Gemma 3 text (`gemma3_text`): one head dim and KV head count on every layer, sliding
    layers every 5 of 6, attention scaled by query_pre_attn_scalar^-0.5, no logit softcap by
    default. Exposes the per-layer fields the KV cache and RoPE tables read from TextConfig."""
    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    layer_types: list[str] | None = None
    sliding_window: int = 512
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    use_bidirectional_attention: bool | None = False
    max_position_embeddings: int = 32_768
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] | None = 1

    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    def __post_init__(self):
        w = "config (gemma3_text)"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, w,
                   f"{name} must be a positive integer, got {v!r}")
        _check(self.hidden_activation in ("gelu_pytorch_tanh", "gelu_tanh"), w,
               f"hidden_activation {self.hidden_activation!r} is not supported")
        _check(self.attn_logit_softcapping is None, w, "attn_logit_softcapping is a Gemma 2 feature, not supported")
        _check(not self.use_bidirectional_attention, w, "bidirectional attention (EmbeddingGemma) is not supported")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, w,
               f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
               f"{self.num_key_value_heads}")
        if self.layer_types is None:  # transformers' default: every 6th layer is full attention
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        _check(isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers
               and all(t in LAYER_TYPES for t in self.layer_types), w,
               f"layer_types must list {self.num_hidden_layers} of {list(LAYER_TYPES)}")
        if self.rope_parameters is None:
            self.rope_parameters = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                                    FULL: {"rope_type": "default", "rope_theta": 1_000_000.0}}
        for t in set(self.layer_types):
            p = self.rope_parameters.get(t) if isinstance(self.rope_parameters, dict) else None
            _check(isinstance(p, dict) and p.get("rope_type", "default") in ("default", "linear"), w,
                   f"rope_parameters[{t!r}] must be a default or linear RoPE, got {p!r}")
        self.layer_head_dims = [self.head_dim] * self.num_hidden_layers
        self.layer_kv_heads = [self.num_key_value_heads] * self.num_hidden_layers

    def head_dim_of(self, layer_type: str) -> int:
        return self.head_dim

    def kv_heads_of(self, layer_type: str) -> int:
        return self.num_key_value_heads


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6
    model_patch_size: int | None = None  # derived; checked when present

    def __post_init__(self):
        w = "vision_config"
        for name in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, w, f"{name} must be a positive integer, got {v!r}")
        derived = self.patch_size * self.pooling_kernel_size
        _check(self.model_patch_size in (None, derived), w,
               f"model_patch_size {self.model_patch_size} != patch_size*pooling_kernel_size = {derived}")
        self.model_patch_size = derived
        # The projection consumes pos_norm's output, so the two widths must agree.
        _check(self.output_proj_dims == self.mm_embed_dim, w,
               f"output_proj_dims ({self.output_proj_dims}) must equal mm_embed_dim ({self.mm_embed_dim})")

    @property
    def patch_dim(self) -> int:
        return self.model_patch_size ** 2 * 3


@dataclass
class AudioConfig:
    audio_embed_dim: int = 640
    rms_norm_eps: float = 1e-6
    # aliases of audio_embed_dim in the released config.json
    hidden_size: int | None = None
    output_proj_dims: int | None = None
    audio_samples_per_token: int | None = None

    def __post_init__(self):
        w = "audio_config"
        _check(isinstance(self.audio_embed_dim, int) and self.audio_embed_dim > 0, w,
               f"audio_embed_dim must be a positive integer, got {self.audio_embed_dim!r}")
        for name in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            v = getattr(self, name)
            _check(v in (None, self.audio_embed_dim), w, f"{name} ({v}) must equal audio_embed_dim ({self.audio_embed_dim})")


@dataclass
class ModelConfig:
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    model_type: str = "gemma4_unified"
    image_token_id: int = 258_880
    video_token_id: int = 258_884
    audio_token_id: int = 258_881
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    boa_token_id: int = 256_000
    eoa_token_index: int = 258_883
    eos_token_id: int | list[int] | None = None
    dtype: str | None = None
    quantization: dict | None = None  # how the stored weights are quantized (quant/apply.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        q = d.get("quantization")
        _check(q is None or isinstance(q, dict), "config", "quantization must be an object")
        cfg = cls._from_dict(d, mt)
        cfg.quantization = q
        return cfg

    @classmethod
    def _from_dict(cls, d: dict[str, Any], mt: str | None) -> "ModelConfig":
        if mt == "gemma3_text":  # Gemma3ForCausalLM: text only, no media token ids
            none = dict.fromkeys(("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                                  "eoi_token_id", "boa_token_id", "eoa_token_index"))
            return cls(text=_from_dict(Gemma3TextConfig, d, "config"), model_type=mt,
                       eos_token_id=d.get("eos_token_id"), dtype=d.get("dtype") or d.get("torch_dtype"), **none)
        if mt == "gemma4_unified_text":  # Gemma4UnifiedForCausalLM: the text config is the top level
            return cls(text=_from_dict(TextConfig, d, "config"), model_type=mt, eos_token_id=d.get("eos_token_id"),
                       dtype=d.get("dtype") or d.get("torch_dtype"))
        if mt != "gemma4_unified":
            raise ConfigError(f"config: unknown model_type {mt!r}; expected 'gemma4_unified', "
                              "'gemma4_unified_text' or 'gemma3_text'")
        if not isinstance(d.get("text_config"), dict):
            raise ConfigError("config: model_type gemma4_unified needs a text_config object")
        text = _from_dict(TextConfig, d["text_config"], "text_config")
        vision = _from_dict(VisionConfig, d["vision_config"], "vision_config") if d.get("vision_config") else None
        audio = _from_dict(AudioConfig, d["audio_config"], "audio_config") if d.get("audio_config") else None
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
                                 "eoi_token_id", "boa_token_id", "eoa_token_index") if d.get(k) is not None}
        for k, v in ids.items():
            _check(isinstance(v, int) and 0 <= v < text.vocab_size, "config",
                   f"{k}={v!r} is outside the vocabulary of {text.vocab_size}")
        cfg = cls(text=text, vision=vision, audio=audio, model_type=mt, eos_token_id=d.get("eos_token_id"),
                  dtype=d.get("dtype") or d.get("torch_dtype"), **ids)
        if vision is not None:
            _check(vision.output_proj_dims == vision.mm_embed_dim, "vision_config", "inconsistent widths")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.text.hidden_size)

    @property
    def stop_token_ids(self) -> list[int]:
        e = self.eos_token_id if self.eos_token_id is not None else self.text.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)
