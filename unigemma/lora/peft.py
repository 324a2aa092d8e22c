"""Adapters on disk in PEFT's format, both ways: a directory with `adapter_config.json` (lora/config.py)
and `adapter_model.safetensors`, whose tensors are named as PEFT names them on transformers' model
classes:

    base_model.model.<transformers module name>.lora_A.weight   [r, in]
    base_model.model.<transformers module name>.lora_B.weight   [out, r]
    e.g. base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight   (Gemma 4)
         base_model.model.model.layers.3.mlp.down_proj.lora_B.weight                   (Gemma 3)

So adapters trained with PEFT or Unsloth load here and ours load into PEFT. Loading is strict:
an adapter whose names match no module (vLLM #41754: a prefix that differs, so the adapter
"loads" and changes nothing) is refused with the names this model expects. One rename is
known and applied: transformers' text-only class keeps the decoder at `model.layers.` and the
multimodal class at `model.language_model.layers.`, so an adapter trained on one loads onto the
other when every name matches that way. Full weights (`modules_to_save`), embedding LoRA and
pickle files (`adapter_model.bin`) are refused, naming them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .config import LoraConfig
from .inject import candidates, lora_modules, selection, wrap

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
# (adapter's prefix, ours): the text-only and the multimodal classes' decoder paths (see the docstring)
_LAYOUTS = ((None, None), ("model.layers.", "model.language_model.layers."),
            ("model.language_model.layers.", "model.layers."))


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's names (what `save_adapter` writes)."""
    hf_of = {ours: hf for hf, (ours, _) in candidates(model).items()}
    out = {}
    for ours, layer in lora_modules(model).items():
        if name in layer.lora_A:
            out[f"{PREFIX}{hf_of[ours]}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{PREFIX}{hf_of[ours]}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    if not out:
        raise KeyError(f"the model has no adapter named {name!r}")
    return out


def save_adapter(model: nn.Module, path: str | Path, config: LoraConfig, name: str = "default",
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter `name` as a PEFT adapter directory (its tensors cast to `dtype` if given); returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype or v.dtype).contiguous().cpu() for k, v in lora_state_dict(model, name).items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config.to_peft(), indent=2))
    return path


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors, checked as files (CheckpointError naming the file)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not an adapter directory" + ("" if path.exists() else " (it does not exist)"))
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (a PEFT adapter directory has {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
    if not weights.is_file():
        hint = " (adapter_model.bin is a pickle and is never loaded: convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}{hint}")
    try:
        config = LoraConfig.from_peft(json.loads(cfg_file.read_text()), str(cfg_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
    return config, tensors


def _match(model: nn.Module, modules: set[str], where: str) -> tuple[dict[str, str], dict]:
    """Adapter module names → transformers' names in this model, by the first layout that maps
    every one; otherwise a CheckpointError naming what was found and what was expected."""
    cands = candidates(model)
    for theirs, ours in _LAYOUTS:
        mapping = {m: (ours + m[len(theirs):] if theirs and m.startswith(theirs) else m) for m in modules}
        if all(v in cands for v in mapping.values()):
            return mapping, cands
    missing = sorted(m for m in modules if m not in cands)
    expected = [f"{PREFIX}{n}.lora_A.weight" for n in list(cands)[:3]]
    raise CheckpointError(f"{where}: {len(missing)} of the adapter's {len(modules)} modules match no module of this "
                          f"model, e.g. {PREFIX}{missing[0]}.lora_A.weight; this model's adapter tensors are "
                          f"named like {expected} (is the adapter for another model, or saved with another prefix?)")


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", dtype: torch.dtype = torch.float32,
                 activate: bool = True) -> LoraConfig:
    """Load a PEFT adapter directory into `model` as adapter `name` (unmerged), and with `activate`
    make it the one every row runs. Everything is checked before the model is touched."""
    config, tensors = read_adapter(path)
    apply_adapter(model, config, tensors, name, str(Path(path) / WEIGHTS_FILE), dtype, activate)
    return config


def apply_adapter(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], name: str = "default",
                  where: str = WEIGHTS_FILE, dtype: torch.dtype = torch.float32, activate: bool = True) -> None:
    """`load_adapter` after the files are read (`read_adapter`): checked, then put in place. A
    server reads files on its own threads and runs this between two decode steps."""
    if name in selection(model).names:
        raise ValueError(f"the model already has an adapter named {name!r}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        else:
            others.append(key)
    if others:
        kind = ("full weights (modules_to_save)" if not any("lora_" in k for k in others)
                else "tensors of a LoRA kind unigemma does not apply (embedding LoRA, DoRA, biases)")
        raise CheckpointError(f"{where}: {len(others)} tensors are {kind}, e.g. {others[:3]}; "
                              "unigemma loads lora_A / lora_B weights only (merge the adapter with PEFT instead)")
    if not pairs:
        raise CheckpointError(f"{where}: holds no LoRA tensors")
    mapping, cands = _match(model, set(pairs), where)
    plan = []
    for theirs, pair in sorted(pairs.items()):
        ours, module = cands[mapping[theirs]]
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{where}: {PREFIX}{theirs} has {sorted(pair)} but not both lora_A and lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        r = A.shape[0] if A.ndim == 2 else 0
        if (r < 1 or B.ndim != 2 or A.shape[1] != module.in_features
                or tuple(B.shape) != (module.out_features, r)):
            raise CheckpointError(f"{where}: {PREFIX}{theirs}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                                  f"do not fit a [{module.out_features} x {module.in_features}] module with one rank")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise CheckpointError(f"{where}: {PREFIX}{theirs}: LoRA weights must be floats, got {A.dtype} / {B.dtype}")
        plan.append((ours, r, config.scaling_for(theirs, r), A, B))
    with torch.no_grad():
        for ours, r, scaling, A, B in plan:
            layer = wrap(model, ours)
            layer.add_adapter(name, r, scaling, 0.0, dtype)  # inference: no dropout
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)
    sel = selection(model)
    sel.added(name)
    if activate:
        sel.active = name

