"""The decode path on an accelerator: the Engine on `--device` (CUDA), eager and compiled.

A device path touches generate/runner.py (the step), models/attention.py (`attend`) and
quant/linear.py; this checks the first two end to end where a GPU is lent. It writes the random
benchmark model (bench/checkpoint.py's 12B layout scaled down) with our own writer (the GPU
machine's transformers may predate Gemma 4), loads it on the device, and decodes one greedy
conversation through the Engine (Scheduler, BatchCache, runner) three ways:

  eager           the default decode step
  compiled        `Engine(compile_step=True)`: the step under torch.compile (Inductor, Triton)
  greedy oracle   generate/greedy.py, one plain forward per token (tokens only)

plus 8 streams in the Scheduler. Prints one JSON line: tokens/s, the compile time, whether the
compiled and oracle tokens equal eager's (greedy, and a seeded sample at temperature 1, which
random weights do not collapse onto one token), the device's name and the torch version.

    python -m bench.device_step [--device cuda] [--dtype bfloat16] [--hidden 1536 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from bench.checkpoint import bench_config


class ByteTokenizer:
    """Token i is one letter: enough for the engine's text path (no vocabulary file needed)."""
    eos_ids = [1]
    pad_id = 0

    def token_bytes(self, token_id: int) -> bytes:
        return chr(ord("a") + token_id % 26).encode()

    def is_special(self, token_id: int) -> bool:
        return token_id == 1

    def decode(self, ids) -> str:
        return "".join(self.token_bytes(i).decode() for i in ids)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import unigemma
    from unigemma.generate.engine import Engine
    from unigemma.generate.greedy import greedy_generate
    from unigemma.generate.sampling import SamplingParams
    from unigemma.generate.scheduler import Scheduler
    from unigemma.weights.random import write_random_checkpoint

    dtype = getattr(torch, a.dtype)
    cfg = {"model_type": "gemma4_unified", **bench_config(hidden=a.hidden, layers=a.layers)}
    out = dict(bench="device_step", device=a.device, dtype=a.dtype, hidden=a.hidden, layers=a.layers,
               prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens, torch=torch.__version__)
    if a.device.startswith("cuda"):
        out["device_name"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_random_checkpoint(cfg, tmp, seed=0, dtype=dtype)
        out["write_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        model = unigemma.load_model(tmp, dtype=a.dtype, device=a.device)
        out["load_s"] = round(time.perf_counter() - t, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg["text_config"]["vocab_size"] - 10, (1, a.prompt_tokens), generator=g)
    params = SamplingParams(temperature=0.0, max_tokens=a.decode_tokens, ignore_eos=True)
    # random weights collapse greedy decoding onto one token; a seeded sample walks the vocabulary,
    # so "same tokens" compares 128 different positions' logits, not one
    sampled = SamplingParams(temperature=1.0, seed=1234, max_tokens=a.decode_tokens, ignore_eos=True)

    def decode_rate(engine) -> tuple[float, list[int]]:
        best, toks = 0.0, None
        for _ in range(a.repeats):
            c = engine.generate({"input_ids": ids}, params)
            sync(a.device)
            best, toks = max(best, c.timings.decode_tokens_per_s), c.token_ids
        return best, toks

    tok = ByteTokenizer()
    eager = Engine(model, tok)
    eager.generate({"input_ids": ids}, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    out["eager_decode_tok_s"], eager_toks = decode_rate(eager)
    compiled = Engine(model, tok, compile_step=True)
    t = time.perf_counter()
    compiled.generate({"input_ids": ids}, params)  # the compile
    sync(a.device)
    out["compile_s"] = round(time.perf_counter() - t, 1)
    out["compiled_decode_tok_s"], compiled_toks = decode_rate(compiled)
    out["compiled_vs_eager"] = round(out["compiled_decode_tok_s"] / out["eager_decode_tok_s"], 3)
    out["compiled_same_tokens"] = compiled_toks == eager_toks
    oracle = greedy_generate(model, ids, max_new_tokens=a.decode_tokens, stop_ids=[])  # ignore_eos, as above
    out["oracle_same_tokens"] = oracle[0].tolist() == eager_toks
    out["distinct_tokens"] = len(set(eager_toks))
    seeded = [e.generate({"input_ids": ids}, sampled).token_ids for e in (eager, compiled)]
    out["sampled_distinct_tokens"] = len(set(seeded[0]))
    out["compiled_same_sampled_tokens"] = seeded[0] == seeded[1]

    s = Scheduler(eager, max_seqs=8, max_len=a.prompt_tokens + a.decode_tokens + 1)
    for i in range(8):
        s.submit({"input_ids": torch.roll(ids, i, 1)}, params)
    while len(s.running) < 8 and s.has_work():  # one prompt joins per step
        s.step()
    out["batch8_decode_tok_s"] = None  # (the first rows ended before the last joined: too few tokens)
    if len(s.running) == 8:
        s.step()
        sync(a.device)
        made, t = s.tokens_out, time.perf_counter()
        while len(s.running) == 8:
            s.step()
        sync(a.device)
        out["batch8_decode_tok_s"] = round((s.tokens_out - made) / (time.perf_counter() - t), 1)
    s.run_until_done()
    for k in ("eager_decode_tok_s", "compiled_decode_tok_s"):
        out[k] = round(out[k], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
