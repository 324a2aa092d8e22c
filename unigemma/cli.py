"""Command line: `unigemma demo` and `unigemma generate`.

Until the tokenizer/processor and engine land, generation works on token ids: `demo`
writes a small random checkpoint with the real layout, loads it through the same loader a
real checkpoint uses, and prints a greedy continuation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from .errors import UnigemmaError

DEMO_CONFIG = {
    "model_type": "gemma4_unified",
    "text_config": {
        "model_type": "gemma4_unified_text", "vocab_size": 262144, "hidden_size": 256, "intermediate_size": 1024,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "global_head_dim": 128, "num_global_key_value_heads": 1, "attention_k_eq_v": True, "sliding_window": 64,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    },
    "vision_config": {"model_type": "gemma4_unified_vision", "mm_embed_dim": 256, "output_proj_dims": 256,
                      "mm_posemb_size": 1120},
    "audio_config": {"model_type": "gemma4_unified_audio", "audio_embed_dim": 640},
}


def _ids(text: str) -> torch.Tensor:
    try:
        return torch.tensor([[int(x) for x in text.replace(",", " ").split()]])
    except ValueError:
        raise UnigemmaError(f"--ids must be whitespace- or comma-separated integers, got {text!r}") from None


def cmd_generate(args) -> None:
    from . import load
    from .generate.greedy import greedy_generate

    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype, progress=True)
    t1 = time.perf_counter()
    ids = _ids(args.ids)
    out = greedy_generate(model, ids, max_new_tokens=args.max_new_tokens)
    t2 = time.perf_counter()
    print(f"prompt ids: {ids[0].tolist()}")
    print(f"greedy ids: {out[0].tolist()}")
    print(f"loaded in {t1 - t0:.2f} s; generated {out.shape[1]} tokens in {t2 - t1:.2f} s", file=sys.stderr)


def cmd_demo(args) -> None:
    from .weights.save import random_checkpoint

    root = Path(args.dir or tempfile.mkdtemp(prefix="unigemma-demo-"))
    if not (root / "config.json").exists():
        print(f"writing a random {DEMO_CONFIG['text_config']['num_hidden_layers']}-layer checkpoint with the "
              f"real vocabulary and layout to {root}", file=sys.stderr)
        random_checkpoint(DEMO_CONFIG, root, seed=0)
    args.model = str(root)
    cmd_generate(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unigemma", description="Run Gemma 4 unified models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="greedy continuation of token ids")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    d = sub.add_parser("demo", help="random small checkpoint → load → greedy continuation (no download)")
    d.add_argument("--dir", help="where to write the demo checkpoint (default: a temporary directory)")
    for s in (g, d):
        s.add_argument("--ids", default="2 818 5279 529 7001 563", help="prompt token ids")
        s.add_argument("--max-new-tokens", type=int, default=16)
        s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    try:
        {"generate": cmd_generate, "demo": cmd_demo}[args.cmd](args)
    except UnigemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
