"""Write a model as a checkpoint directory in the on-disk layout the loader reads.

Used for random checkpoints (weights/random.py writes them tensor by tensor) and for quantized
checkpoints (`save_quantized`); the names are the released checkpoint's, the inverse of
`checkpoint_name_to_module`. Quantized modules write our layouts (quant/pack.py) through
their state_dict.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..models.gemma4 import Gemma4Unified


def module_name_to_checkpoint(name: str) -> str:
    if name == "model.embed_vision.multimodal_embedder.embedding_projection.weight":
        return "model.embed_vision.embedding_projection.weight"
    if name.startswith("model.embed_vision."):
        return "model.vision_embedder." + name[len("model.embed_vision."):]
    return name


def save_checkpoint(model: Gemma4Unified, config_dict: dict, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {module_name_to_checkpoint(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    return path


# Files a checkpoint directory carries besides its weights and config.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
               "special_tokens_map.json", "processor_config.json")


def save_quantized(src: str | Path, dst: str | Path, quant: str, dtype="bfloat16") -> Path:
    """Quantize checkpoint `src` (streamed: never the whole float model) into `dst`: the bits and
    scales in safetensors, the scheme in config.json's "quantization", tokenizer files copied.
    Loading `dst` then reads the quantized tensors as they are."""
    import shutil

    from ..weights.loader import load_model

    src, dst = Path(src), Path(dst)
    model = load_model(src, dtype=dtype, quant=quant)
    if model.config.model_type not in ("gemma4_unified", "gemma4_unified_text"):
        raise ValueError(f"saving quantized {model.config.model_type} checkpoints is not supported")
    config_dict = json.loads((src / "config.json").read_text())
    config_dict["quantization"] = model.quant_scheme.to_config()
    config_dict["dtype"] = str(model.dtype).removeprefix("torch.")
    save_checkpoint(model, config_dict, dst)
    for name in _SIDE_FILES:
        if (src / name).is_file() and src != dst:
            shutil.copyfile(src / name, dst / name)
    return dst
