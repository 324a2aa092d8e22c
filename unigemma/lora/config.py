"""`LoraConfig`: what a LoRA adapter is (rank, alpha, dropout, rsLoRA, its target modules), and
its `adapter_config.json` in PEFT's format, both ways.

Target matching follows PEFT's rules exactly (`peft.tuners.tuners_utils.check_target_module_exists`),
applied to transformers' module names (lora/names.py), so a target list or regex written for PEFT,
Unsloth or Axolotl selects the same modules here:
    a string    a regex that must match the whole module name (re.fullmatch)
    a list      leaf names: a module matches when its name is one of them or ends in ".<name>"
Per-module overrides (`rank_pattern`, `alpha_pattern`) use PEFT's key rule: the first key K with
re.match(rf"(.*\\.)?({K})$", name) wins. This module knows no model and no file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import CheckpointError

# the text decoder's projections: what Unsloth, Oumi, Axolotl and mlx train by default (Gemma 4's
# K=V full layers have no v_proj: those layers simply get none)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the media embedders' projections, for target_modules=DEFAULT_TARGETS + MEDIA_TARGETS
MEDIA_TARGETS = ("patch_dense", "embedding_projection")

# adapter_config.json keys whose non-default values change the math in ways we do not implement
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "use_qalora": False, "fan_in_fan_out": False,
                "layers_to_transform": None, "layer_replication": None, "use_bdlora": None,
                "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None}


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha / sqrt(r) (rsLoRA) instead of alpha / r
    target_modules: str | tuple[str, ...] = DEFAULT_TARGETS  # regex (fullmatch) or leaf names
    exclude_modules: str | tuple[str, ...] | None = None  # PEFT's exclude_modules, same rules
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model: str | None = None  # base_model_name_or_path, informational

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = tuple(self.exclude_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        # bad regexes and values fail here, not at injection (an adapter file is untrusted input)
        for targets in (self.target_modules, self.exclude_modules):
            if isinstance(targets, str):
                re.compile(targets)
            elif targets is not None and not all(isinstance(t, str) for t in targets):
                raise ValueError(f"target / exclude modules must be a regex or a list of names, got {targets!r}")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                re.compile(rf"(.*\.)?({key})$")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"{name}[{key!r}] must be a positive number, got {value!r}")

    @property
    def scaling(self) -> float:
        return self.scaling_for()

    def rank_for(self, name: str | None = None) -> int:
        return int(_pattern_get(self.rank_pattern, name, self.r))

    def scaling_for(self, name: str | None = None, r: int | None = None) -> float:
        """alpha / r (or alpha / sqrt(r) with rsLoRA) for module `name` (transformers' name);
        r: the module's rank when known (an adapter file's tensors say it)."""
        r, alpha = r or self.rank_for(name), float(_pattern_get(self.alpha_pattern, name, self.alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, name: str) -> bool:
        """Whether module `name` (transformers' module name) gets an adapter, by PEFT's rules."""
        return _matches(self.target_modules, name) and not (self.exclude_modules and
                                                            _matches(self.exclude_modules, name))

    def to_peft(self) -> dict:
        """adapter_config.json as PEFT writes it (the keys its LoraConfig reads)."""
        t = self.target_modules
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                "target_modules": t if isinstance(t, str) else list(t),
                "exclude_modules": (self.exclude_modules if isinstance(self.exclude_modules, (str, type(None)))
                                    else list(self.exclude_modules)),
                "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern),
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
                "use_dora": False, "inference_mode": True, "base_model_name_or_path": self.base_model}

    @classmethod
    def from_peft(cls, d: dict, where: str = "adapter_config.json") -> "LoraConfig":
        """An adapter_config.json dict (PEFT's or Unsloth's; keys we have no use for are ignored,
        those that would change the math and are not supported are refused)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: expected a JSON object")
        if d.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        for key, default in _UNSUPPORTED.items():
            if d.get(key, default) not in (default, [], {}, False, None):
                raise CheckpointError(f"{where}: {key}={d[key]!r} is not supported by unigemma's LoRA")
        if d.get("bias", "none") != "none":
            raise CheckpointError(f"{where}: bias={d['bias']!r} is not supported (only 'none')")
        try:
            targets = d.get("target_modules") or DEFAULT_TARGETS
            return cls(r=int(d.get("r", 8)), alpha=float(d.get("lora_alpha", 8)),
                       dropout=float(d.get("lora_dropout", 0.0) or 0.0), use_rslora=bool(d.get("use_rslora", False)),
                       target_modules=targets if isinstance(targets, str) else tuple(targets),
                       exclude_modules=d.get("exclude_modules") or None,
                       rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}),
                       base_model=d.get("base_model_name_or_path"))
        except (TypeError, ValueError, re.error) as e:
            raise CheckpointError(f"{where}: {e}") from e


TARGET_GROUPS = {"default": DEFAULT_TARGETS, "media": MEDIA_TARGETS}


def parse_targets(text: str) -> str | tuple[str, ...]:
    """The command line's --targets: comma-separated leaf names, where `default` stands for the
    decoder's projections and `media` for the embedders' ("default,media" adapts both), or one
    regex over transformers' module names (anything that is not a plain list of names)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in items):
        re.compile(text)  # a bad regex is the user's error, named here
        return text
    out: list[str] = []
    for t in items:
        out += [x for x in TARGET_GROUPS.get(t, (t,)) if x not in out]
    return tuple(out)


def _matches(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_get(pattern: dict, name: str | None, default):
    if name is None or not pattern:
        return default
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), None)
    return pattern[key] if key is not None else default
