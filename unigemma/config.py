"""Typed model configs read from a checkpoint's `config.json`: the parts every family shares.

`DecoderConfig` holds what every Gemma text decoder has (sizes, layer types, RoPE per type);
`TextConfig` is Gemma 4 unified's, mirroring the keys transformers writes for `gemma4_unified`
and the real 12B config, which carries extra backward-compatibility keys. `ModelConfig` is the
whole model; `ModelConfig.from_dict` hands the dict to its family's `parse_config` (the
registry in models/__init__.py), so this file knows no family's model_type. Unknown keys are
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
from typing import Any, ClassVar

from .errors import ConfigError

log = logging.getLogger(__name__)

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)
ROPE_TYPES = ("default", "proportional", "linear")


def from_keys(cls, d: dict[str, Any], where: str):
    """Build dataclass `cls` from the keys of `d` it declares; ignore the rest."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in d.items() if k in names})
    except TypeError as e:  # wrong value types surface here from __post_init__ arithmetic
        raise ConfigError(f"{where}: {e}") from e


def check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def every_sixth_full(num_layers: int) -> list[str]:
    """transformers' default layer pattern (Gemma 3 and 4): every 6th layer is full attention."""
    return [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]


@dataclass
class DecoderConfig:
    """What every Gemma text decoder shares: sizes, layer types, RoPE per type, norms, head.
    A family's text config derives from it and adds its own fields and checks; the KV cache
    and the RoPE tables read only these fields (and the per-layer lists)."""
    WHERE: ClassVar[str] = "text_config"  # prefix of this config's error messages
    ROPE_TYPES: ClassVar[tuple[str, ...]] = ROPE_TYPES

    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15360
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    layer_types: list[str] | None = None
    sliding_window: int = 1024
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262_144
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int | list[int] | None = 1

    # resolved per layer in __post_init__
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    def check_sizes(self) -> None:
        """The checks every family shares; then `layer_types` is a valid list (defaulted if None)."""
        w = self.WHERE
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, w,
                  f"{name} must be a positive integer, got {v!r}")
        check(self.hidden_activation in ("gelu_pytorch_tanh", "gelu_tanh"), w,
              f"hidden_activation {self.hidden_activation!r} is not supported (Gemma uses gelu_pytorch_tanh)")
        check(self.final_logit_softcapping is None or self.final_logit_softcapping > 0, w,
              "final_logit_softcapping must be positive or null")
        if self.layer_types is None:
            self.layer_types = every_sixth_full(self.num_hidden_layers)
        check(isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers, w,
              f"layer_types has {len(self.layer_types or [])} entries but num_hidden_layers is "
              f"{self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        check(not bad, w, f"unknown layer types {bad}; expected {list(LAYER_TYPES)}")

    def check_rope(self) -> None:
        w = self.WHERE
        for t in set(self.layer_types):
            p = self.rope_parameters.get(t) if isinstance(self.rope_parameters, dict) else None
            check(isinstance(p, dict), w, f"rope_parameters has no entry for layer type {t!r}")
            check(p.get("rope_type", "default") in self.ROPE_TYPES, w,
                  f"rope_parameters[{t!r}].rope_type={p.get('rope_type')!r} is not supported; "
                  f"expected {self.ROPE_TYPES}")
            check(isinstance(p.get("rope_theta"), (int, float)) and p["rope_theta"] > 0, w,
                  f"rope_parameters[{t!r}].rope_theta must be a positive number")
            f = p.get("partial_rotary_factor", 1.0)
            check(0 < f <= 1, w, f"rope_parameters[{t!r}].partial_rotary_factor must be in (0, 1], got {f}")

    def head_dim_of(self, layer_type: str) -> int:
        return self.layer_head_dims[self.layer_types.index(layer_type)]

    def kv_heads_of(self, layer_type: str) -> int:
        return self.layer_kv_heads[self.layer_types.index(layer_type)]


@dataclass
class TextConfig(DecoderConfig):
    """Gemma 4 unified's text decoder: per-layer head dims and KV heads (full layers differ), K=V."""
    # Full-attention overrides. transformers >= 5.2x writes them as `per_layer_config`;
    # the released 12B config.json has `global_head_dim` / `num_global_key_value_heads`.
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None
    attention_k_eq_v: bool = False
    use_bidirectional_attention: str | None = "vision"
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    hidden_size_per_layer_input: int | None = 0

    def __post_init__(self):
        w = self.WHERE
        self.check_sizes()
        check(not self.enable_moe_block, w, "enable_moe_block=true (MoE) is not part of the unified model")
        check(not self.hidden_size_per_layer_input, w,
              "hidden_size_per_layer_input > 0 (per-layer inputs) is not part of the unified model")
        check(self.num_kv_shared_layers == 0, w,
              f"num_kv_shared_layers={self.num_kv_shared_layers}: KV sharing is only used by MTP drafters")
        check(self.use_bidirectional_attention in (None, "vision"), w,
              f"use_bidirectional_attention={self.use_bidirectional_attention!r} is not supported "
              "(expected \"vision\" or null)")
        if self.layer_types[-1] != FULL:
            # The reference forces this too (with a warning); weights are shaped for it.
            log.warning("text_config: last layer must be full attention; forcing it as transformers does")
            self.layer_types = [*self.layer_types[:-1], FULL]
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        self.check_rope()
        self._resolve_per_layer()

    def _resolve_per_layer(self):
        """Head dim and KV heads per layer, the way transformers' config resolves them."""
        w = "text_config"
        overrides: dict[int, dict] = {}
        if self.per_layer_config is not None:
            check(isinstance(self.per_layer_config, dict), w, "per_layer_config must be an object")
            for k, v in self.per_layer_config.items():
                check(str(k).isdigit() and int(k) < self.num_hidden_layers, w,
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
            check(hd > 0 and hd % 2 == 0, w, f"layer {i}: head_dim {hd} must be a positive even number")
            check(kv > 0 and self.num_attention_heads % kv == 0, w,
                   f"layer {i}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                   f"its {kv} key/value heads")
        # Every layer of one type must share head dim and KV heads: the RoPE tables and the
        # KV-cache layout are per type.
        for t in set(self.layer_types):
            shapes = {(self.layer_head_dims[i], self.layer_kv_heads[i]) for i, lt in enumerate(self.layer_types) if lt == t}
            check(len(shapes) == 1, w, f"layers of type {t!r} disagree on (head_dim, kv_heads): {sorted(shapes)}")

    def uses_v_proj(self, layer_idx: int) -> bool:
        """Full layers with attention_k_eq_v take V from the raw K projection."""
        return not (self.attention_k_eq_v and self.layer_types[layer_idx] == FULL)


@dataclass
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    output_proj_dims: int = 3840
    rms_norm_eps: float = 1e-6
    model_patch_size: int | None = None  # derived; checked when present
    num_soft_tokens: int = 280  # the default image budget (soft tokens per image) the model was made for

    def __post_init__(self):
        w = "vision_config"
        for name in ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims",
                     "num_soft_tokens"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, w, f"{name} must be a positive integer, got {v!r}")
        derived = self.patch_size * self.pooling_kernel_size
        check(self.model_patch_size in (None, derived), w,
               f"model_patch_size {self.model_patch_size} != patch_size*pooling_kernel_size = {derived}")
        self.model_patch_size = derived
        # The projection consumes pos_norm's output, so the two widths must agree.
        check(self.output_proj_dims == self.mm_embed_dim, w,
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
        check(isinstance(self.audio_embed_dim, int) and self.audio_embed_dim > 0, w,
               f"audio_embed_dim must be a positive integer, got {self.audio_embed_dim!r}")
        for name in ("hidden_size", "output_proj_dims", "audio_samples_per_token"):
            v = getattr(self, name)
            check(v in (None, self.audio_embed_dim), w, f"{name} ({v}) must equal audio_embed_dim ({self.audio_embed_dim})")


def stored_dtype(d: dict[str, Any]) -> str | None:
    """The dtype a config.json records its weights in (newer and older spelling)."""
    return d.get("dtype") or d.get("torch_dtype")


@dataclass
class ModelConfig:
    text: DecoderConfig  # a family's text config (TextConfig for Gemma 4)
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
        """Any registered family's config.json (models/__init__.py FAMILIES parses its own)."""
        from .models import family_of  # models import this module: the registry is read at call time

        mt = d.get("model_type")
        q = d.get("quantization")
        check(q is None or isinstance(q, dict), "config", "quantization must be an object")
        cfg = family_of(mt).parse_config(d, mt)
        cfg.quantization = q
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
