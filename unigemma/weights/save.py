"""Write a model as a checkpoint directory in the on-disk layout the loader reads.

Used for random checkpoints (weights/random.py writes them tensor by tensor) and for quantized
checkpoints (`save_quantized`); the names are the released checkpoint's, the inverse of
the loader's renames, both from the model's family (models/<family>.py `to_disk`,
`save_transform`). Quantized modules write our layouts (quant/pack.py) through
their state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..models import family_of, gemma4


def module_name_to_checkpoint(name: str, config: ModelConfig | None = None) -> str:
    """Our parameter name → the on-disk name, by the config's family (Gemma 4 unified without one)."""
    if config is None:  # bench/full_12b.py writes a Gemma 4 unified checkpoint without one
        return gemma4.module_name_to_checkpoint(name, ModelConfig(text=None))
    return family_of(config.model_type).to_disk(name, config)


def save_checkpoint(model: nn.Module, config_dict: dict, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    family = family_of(model.config.model_type)
    tensors = {family.to_disk(k, model.config): family.save_transform(k, v.detach()).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    return path


# Files a checkpoint directory carries besides its weights and config.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
               "special_tokens_map.json", "processor_config.json")


def save_quantized(src: str | Path, dst: str | Path, quant: str, dtype="bfloat16") -> Path:
    """Quantize checkpoint `src` (streamed: never the whole float model) into `dst`: the bits and
    scales in safetensors, the scheme in config.json's "quantization", tokenizer files copied.
    Loading `dst` then reads the quantized tensors as they are."""
    from ..weights.loader import load_model

    src, dst = Path(src), Path(dst)
    model = load_model(src, dtype=dtype, quant=quant)
    config_dict = json.loads((src / "config.json").read_text())
    config_dict["quantization"] = model.quant_scheme.to_config()
    config_dict["dtype"] = str(model.dtype).removeprefix("torch.")
    save_checkpoint(model, config_dict, dst)
    copy_side_files(src, dst)
    return dst


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy the `SIDE_FILES` checkpoint `src` has into `dst` (nothing when they are one directory)."""
    import shutil

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
