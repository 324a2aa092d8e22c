"""What the int8-activation kernels cost in quality, on real trained weights: Gemma 3 270M (the
demo's Q4_K_M GGUF) on 1,000+ positions of English prose, each load path against the file's
weights dequantized to float32 (the reference).

Teacher-forced: the text goes through the model in steps of `--step` tokens (default 16, within
the int8-activation kernel's row limit, so every matmul takes the path decoding takes; larger
steps take the float GEMM of prefill). Per path: top-1 agreement of the next-token argmax with the
reference, mean and 99th-percentile KL(reference || path). The paths:
  bf16            --dequantize, bfloat16 (weights rounded to bf16, float activations)
  int8-exact      --quant int8 --exact: per-channel int8 weights, float activations
  int8            --quant int8: the same weights, int8 activations (quant/kernels.py)
  int4-g32(-exact) likewise for int4 with groups of 32 (the file's 4-6-bit tensors requantized)
  auto            the GGUF as stored (its Q8_0 tensors in int8 with int8 activations, the rest float)
One JSON line (with the machine's ISA: the activations round the same way on every CPU).

    python -m bench.act_quality [--positions 1000] [--paths bf16,int8,int8-exact,int4-g32]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.demo_speed import demo_gguf
from bench.machine import machine
from bench.quant_quality import logits_of, prose

PATHS = {
    "bf16": dict(dtype="bfloat16", dequantize=True),
    "int8-exact": dict(quant="int8", exact=True),
    "int8": dict(quant="int8"),
    "int8-g32": dict(quant="int8-g32"),
    "int4-g32-exact": dict(quant="int4-g32", exact=True),
    "int4-g32": dict(quant="int4-g32"),
    "auto": {},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=1000)
    ap.add_argument("--paths", default="bf16,int8-exact,int8,int8-g32,int4-g32-exact,int4-g32,auto")
    ap.add_argument("--step", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import unigemma
    from unigemma.quant.kernels import describe

    gguf = demo_gguf()
    ref_model = unigemma.load(gguf, dtype="float32", dequantize=True)
    ids = prose(a.positions, ref_model.tokenizer)[:-1]
    ref = logits_of(ref_model.model, ids, a.step)
    del ref_model
    ref_lp = ref.log_softmax(-1)
    result = dict(bench="act_quality", model="gemma-3-270m Q4_K_M", reference="float32 (dequantized)",
                  positions=len(ids), step=a.step, **machine(a.threads))
    for name in [p for p in a.paths.split(",") if p]:
        model = unigemma.load_model(gguf, **PATHS[name])
        got = logits_of(model, ids, a.step)
        kl = (ref_lp.exp() * (ref_lp - got.log_softmax(-1))).sum(-1)
        result[f"{name}_top1_agreement"] = round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4)
        result[f"{name}_kl_mean"] = float(kl.mean())
        result[f"{name}_kl_p99"] = float(kl.quantile(0.99))
        result[f"{name}_kernels"] = describe(model)
        del model
    top2 = ref.topk(2, -1).values
    result["reference_median_top1_margin"] = float((top2[:, 0] - top2[:, 1]).median())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
