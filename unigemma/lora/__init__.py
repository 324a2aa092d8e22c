"""LoRA adapters: the layer (layer.py), injection and merging (inject.py), the config and PEFT's
file format both ways (config.py, peft.py).

    params = add_lora(model, LoraConfig(r=16, alpha=32))   # wraps q/k/v/o/gate/up/down in place
    save_adapter(model, "out/", config)                     # adapter_config.json + adapter_model.safetensors
    load_adapter(model, "out/")                             # PEFT's, Unsloth's or ours
"""

from .config import DEFAULT_TARGETS, MEDIA_TARGETS, LoraConfig
from .inject import add_lora, hf_module_name, lora_modules, merge, remove_adapter, selection, set_adapter
from .layer import LoraLinear, Selection
from .peft import apply_adapter, load_adapter, lora_state_dict, read_adapter, save_adapter

__all__ = ["DEFAULT_TARGETS", "MEDIA_TARGETS", "LoraConfig", "LoraLinear", "Selection", "add_lora", "apply_adapter",
           "hf_module_name", "load_adapter", "lora_modules", "lora_state_dict", "merge", "read_adapter",
           "remove_adapter", "save_adapter", "selection", "set_adapter"]
