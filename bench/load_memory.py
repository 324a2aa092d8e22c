"""Peak memory of loading a checkpoint: unigemma vs transformers, same file, same run.

Writes (once) a random bf16 checkpoint of a mid-size Gemma 4 unified config with the real
vocabulary, then loads it in a fresh process per engine and reports the peak RSS above the
process's baseline (interpreter + torch imported), after touching every weight (safetensors
tensors may be memory-mapped and only become resident when read), next to the model's own
bf16 bytes.
Last stdout line: one JSON object.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIG = {
    "model_type": "gemma4_unified",
    "text_config": {"model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 1536,
                    "intermediate_size": 6144, "num_hidden_layers": 12, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256, "global_head_dim": 512,
                    "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 1024,
                    "final_logit_softcapping": 30.0,
                    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2},
    "vision_config": {"model_type": "gemma4_unified_vision", "mm_embed_dim": 1536, "output_proj_dims": 1536},
    "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640},
}

CHILD = r"""
import resource, sys, json, torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine, path = sys.argv[1], sys.argv[2]
import time; t = time.perf_counter()
if engine == "unigemma":
    import unigemma
    m = unigemma.load_model(path, dtype="bfloat16")
else:
    import transformers
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = transformers.Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
dt = time.perf_counter() - t
# touch every weight: memory-mapped tensors are only resident once read
with torch.no_grad():
    for p in m.parameters():
        p.sum()  # reads every byte without a float copy
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"peak_above_base_mib": (peak - base) / 1024, "model_mib": nbytes / 2**20, "seconds": dt}))
"""


def measure(engine: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, engine, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="runs/bench-load-ckpt")
    ap.add_argument("--peer", action="store_true", help="also measure transformers (needs the dev extra)")
    args = ap.parse_args()
    path = Path(args.dir)
    if not (path / "config.json").exists():
        import torch

        from unigemma.weights.random import write_random_checkpoint

        write_random_checkpoint(CONFIG, path, dtype=torch.bfloat16)
    result = {"bench": "load_memory", "checkpoint_mib": (path / "model.safetensors").stat().st_size / 2**20}
    ours = measure("unigemma", path)
    result.update(unigemma_peak_mib=ours["peak_above_base_mib"], model_mib=ours["model_mib"],
                  unigemma_seconds=ours["seconds"], unigemma_peak_over_model=ours["peak_above_base_mib"] / ours["model_mib"])
    if args.peer:
        ref = measure("transformers", path)
        result.update(transformers_peak_mib=ref["peak_above_base_mib"], transformers_seconds=ref["seconds"],
                      peak_ratio_vs_transformers=ours["peak_above_base_mib"] / ref["peak_above_base_mib"])
    from bench.machine import machine  # after the children: this process's torch does not matter to them

    print(json.dumps({**result, **machine(1)}))


if __name__ == "__main__":
    main()
