"""`unigemma merge --model M --lora DIR --out OUT`: a checkpoint with an adapter folded into its weights.

The base loads unpacked and unquantized in the dtype it is stored in (never a float32 copy of
a bf16 model: the 12B stays at its own size); each targeted weight becomes W + scaling · B A,
the product and sum in float32, rounded once to the stored dtype (inject.py `merge`). The result
is written by weights/save.py in the released checkpoint's names with the source's config and
tokenizer files, so `unigemma.load` and transformers read it like the original.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import stored_dtype
from ..errors import CheckpointError
from ..weights.save import copy_side_files, save_checkpoint
from .inject import merge
from .peft import load_adapter


def save_merged(model_path: str | Path, adapter: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Merge adapter directory `adapter` into checkpoint `model_path`; write it to `out`."""
    from ..weights.hub import resolve
    from ..weights.loader import load_model

    src, out = Path(resolve(model_path)), Path(out)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: merge takes a checkpoint directory (config.json + safetensors), "
                              "not a GGUF file")
    config_dict = json.loads((src / "config.json").read_text())
    if config_dict.get("quantization"):
        raise CheckpointError(f"{src}: a quantized checkpoint cannot take merged weights; merge into the float one")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"--out {out} is the source checkpoint: write the merged one elsewhere")
    dtype = dtype or stored_dtype(config_dict) or "bfloat16"
    model = load_model(src, dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16", pack=False)
    load_adapter(model, adapter)
    merge(model)
    save_checkpoint(model, {**config_dict, "dtype": str(model.dtype).removeprefix("torch.")}, out)
    copy_side_files(src, out)
    return out
