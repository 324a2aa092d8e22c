"""Command line: `unigemma demo`, `unigemma chat` and `unigemma generate`.

`demo` needs no model download: it writes a small checkpoint with random weights, the real
262,144-token vocabulary and the real on-disk layout, loads it through the loader a released
checkpoint uses, and answers a multimodal chat (a picture, a tone and a question) with it.
Random weights make the answer gibberish; every step on the way is the real one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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
    from .generate.greedy import greedy_generate
    from .weights.loader import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, progress=True)
    t1 = time.perf_counter()
    ids = _ids(args.ids)
    out = greedy_generate(model, ids, max_new_tokens=args.max_new_tokens)
    t2 = time.perf_counter()
    print(f"prompt ids: {ids[0].tolist()}")
    print(f"greedy ids: {out[0].tolist()}")
    print(f"loaded in {t1 - t0:.2f} s; generated {out.shape[1]} tokens in {t2 - t1:.2f} s", file=sys.stderr)


def _user_message(args) -> dict:
    parts = [{"type": kind, kind: src} for kind in ("image", "audio", "video") for src in getattr(args, kind, None) or []]
    return {"role": "user", "content": parts + [{"type": "text", "text": args.prompt}]}


def _show(gemma, messages, args) -> None:
    t0 = time.perf_counter()
    reply = gemma.chat(messages, enable_thinking=args.think, max_new_tokens=args.max_new_tokens,
                       image_budget=args.image_budget)
    dt = time.perf_counter() - t0
    if reply.reasoning:
        print(f"[thinking] {reply.reasoning}")
    print(reply.content)
    for call in reply.tool_calls:
        print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
    print(f"({reply.prompt_tokens} prompt tokens, {reply.completion_tokens} generated in {dt:.2f} s, "
          f"finish: {reply.finish_reason})", file=sys.stderr)


def cmd_chat(args) -> None:
    from .pipeline import load

    gemma = load(args.model, dtype=args.dtype, tokenizer=args.tokenizer, progress=True)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [_user_message(args)]
    _show(gemma, messages, args)


def _demo_media(root: Path) -> tuple[Path, Path]:
    """A 320×240 picture and a one-second 440 Hz tone, written as ordinary files."""
    import soundfile
    from PIL import Image

    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, np.full_like(x, 96)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "demo.png")
    soundfile.write(root / "demo.wav", 0.3 * np.sin(2 * np.pi * 440 * np.arange(44100) / 44100), 44100)
    return root / "demo.png", root / "demo.wav"


def cmd_demo(args) -> None:
    from .pipeline import load
    from .vocab import gemma4_vocab_gguf
    from .weights.save import random_checkpoint

    root = Path(args.dir or tempfile.mkdtemp(prefix="unigemma-demo-"))
    if not (root / "config.json").exists():
        print(f"writing a random {DEMO_CONFIG['text_config']['num_hidden_layers']}-layer checkpoint with the "
              f"real vocabulary and layout to {root}", file=sys.stderr)
        random_checkpoint(DEMO_CONFIG, root, seed=0)
    gemma = load(root, dtype=args.dtype, tokenizer=gemma4_vocab_gguf(), progress=True)
    image, audio = _demo_media(root)
    args.image, args.audio = [str(image)], [str(audio)]
    messages = [_user_message(args)]
    shown = json.dumps(messages, ensure_ascii=False)
    print(f"messages: {shown}\n(random weights: the reply below is gibberish; the path to it is real)\n",
          file=sys.stderr)
    _show(gemma, messages, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unigemma", description="Run Gemma 4 unified models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="random small checkpoint with the real vocabulary → multimodal chat (no download)")
    d.add_argument("--dir", help="where to write the demo checkpoint (default: a temporary directory)")
    d.add_argument("prompt", nargs="?", default="What do you see and hear?")
    c = sub.add_parser("chat", help="answer one message, with optional images, audio and video")
    c.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    c.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: the checkpoint's)")
    c.add_argument("--system", help="system prompt")
    for kind in ("image", "audio", "video"):
        c.add_argument(f"--{kind}", action="append", help=f"{kind} file (repeatable)")
    c.add_argument("prompt")
    for s in (d, c):
        s.add_argument("--think", action="store_true", help="enable thinking")
        s.add_argument("--image-budget", type=int, default=280, choices=[70, 140, 280, 560, 1120],
                       help="soft tokens per image")
    g = sub.add_parser("generate", help="greedy continuation of token ids")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    g.add_argument("--ids", default="2 818 5279 529 7001 563", help="prompt token ids")
    for s in (d, c, g):
        s.add_argument("--max-new-tokens", type=int, default=24)
        s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    try:
        {"generate": cmd_generate, "demo": cmd_demo, "chat": cmd_chat}[args.cmd](args)
    except UnigemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
