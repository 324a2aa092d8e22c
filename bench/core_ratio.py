"""This tree against an earlier commit of it: the same measurements, interleaved, as ratios.

A refactor must not cost speed. This checks out `--base` (a commit) into a temporary git
worktree, then measures our engine on the random mid-size checkpoint of bench/checkpoint.py
with bench/generate_speed.py's child (`--child-ours`: load, time to first token, decode
tokens/s, media time to first token, 1 and 8 streams in the Scheduler), alternating base and
this tree for `--rounds` rounds, each run in its own process (best of `--repeats` inside it).
Best of all runs per figure.

    python -m bench.core_ratio --base 4929b7f [--dtype float32,bfloat16] [--rounds 3]

One JSON line: `<tree>_<dtype>_<figure>` and `ratio_<figure>_<dtype>` = this tree / base for
rates (above 1: this tree is faster) and base / this tree for seconds (likewise above 1: faster),
so every ratio reads the same way; 0.97 is the noise floor the refactor is held to.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import machine

ROOT = Path(__file__).resolve().parent.parent
RATES = ("prefill_tok_s", "decode_tok_s", "batch1_decode_tok_s", "batch8_decode_tok_s")
SECONDS = ("ttft_text_s", "ttft_media_s", "load_s")


def child(tree: Path, ckpt: Path, dtype: str, P: int, D: int, threads: int, repeats: int) -> dict:
    """One measurement of the engine in `tree` (its own process: cwd first on sys.path)."""
    args = ["--child-ours", ckpt, "--dtype", dtype, "--prompt-tokens", P, "--decode-tokens", D,
            "--threads", threads, "--repeats", repeats]
    p = subprocess.run([sys.executable, "-m", "bench.generate_speed", *map(str, args)], cwd=tree,
                       capture_output=True, text=True, timeout=1800)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many inside each run")
    a = ap.parse_args()

    from bench.checkpoint import make_checkpoint

    ckpt = make_checkpoint()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(bench="core_ratio", base=a.base, head=head, checkpoint=ckpt.name, rounds=a.rounds, repeats=a.repeats,
                  prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens, **machine(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), a.base], cwd=ROOT, check=True)
        try:
            t0 = time.perf_counter()
            for dtype in a.dtype.split(","):
                runs = {"base": [], "head": []}
                for _ in range(a.rounds):  # interleaved: drift on a shared machine hits both alike
                    for name, tree in (("base", base), ("head", ROOT)):
                        runs[name].append(child(tree, ckpt, dtype, a.prompt_tokens, a.decode_tokens, a.threads,
                                                 a.repeats))
                best = {name: {f: (max if f in RATES else min)(r[f] for r in rs) for f in RATES + SECONDS}
                        for name, rs in runs.items()}
                for name, figs in best.items():
                    result.update({f"{name}_{dtype}_{f}": round(v, 4) for f, v in figs.items()})
                for f in RATES:
                    result[f"ratio_{f}_{dtype}"] = round(best["head"][f] / best["base"][f], 3)
                for f in SECONDS:
                    result[f"ratio_{f}_{dtype}"] = round(best["base"][f] / best["head"][f], 3)
                result[f"same_tokens_{dtype}"] = all(r["tokens"] == runs["base"][0]["tokens"]
                                                     for r in runs["base"] + runs["head"])
            result["wall_s"] = round(time.perf_counter() - t0, 1)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
