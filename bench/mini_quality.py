"""unigemma-mini's quality: held-out accuracy per kind as float32 / int8 / int4, top-1 agreement
of the quantized forwards with float32 on held-out conversations, and the decoder's prose
perplexity against the Gemma 3 270M it was built on. One JSON line.

    python -m bench.mini_quality --data data/mm/heldout.jsonl --model runs/mini/model [--per-kind 200]
        [--quant-per-kind 50] [--agree-per-kind 10] [--prose-tokens 2048] [--kinds colour,digit]

- accuracy: bench/mmdata/predict.py (greedy, exact match after score.py's normalisation), with
  a confusion table per kind on stderr;
- agreement: each conversation with its gold answer, teacher-forced; the share of positions whose
  argmax equals float32's (every position: question, media block, answer);
- perplexity: English prose from Python's standard-library docstrings (bench/quant_quality.py
  `prose`, text the training never saw), the base GGUF dequantized to float32 vs the mini's
  decoder (its merged adapter); the issue's bound: at most +10%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from bench.machine import machine
from bench.mmdata.predict import predict, select
from bench.mmdata.score import confusion_table, read_jsonl, score, summary


@torch.no_grad()
def perplexity(model, ids: list[int], window: int = 512) -> float:
    """exp(mean next-token NLL) over `ids`, in windows of `window` tokens (each from its own BOS)."""
    nll, n = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        chunk = torch.tensor([[2] + ids[a:a + window]])
        logits = model.logits(chunk)[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:].to(logits.device), reduction="sum"))
        n += chunk.shape[1] - 1
    return math.exp(nll / n)


@torch.no_grad()
def agreement(reference, other, processor, records: list[dict], data: Path) -> dict:
    """Share of teacher-forced positions whose argmax matches the reference's, and the answer's
    first position alone (the token greedy decoding emits first). Each conversation is the item's
    question with its gold answer, rendered as training renders it (the reply after the
    generation prompt inference gives, finetune/labels.py)."""
    from bench.mmdata.score import prompts
    from unigemma.finetune.labels import IGNORE, encode_conversation

    asked = prompts(data)
    same = total = first = 0
    for r in records:
        enc = encode_conversation(processor, asked[r["id"]] + [{"role": "assistant", "content": r["answer"]}])
        inputs = enc.inputs.model_kwargs()
        a = reference.logits(**inputs)[0].argmax(-1)
        b = other.logits(**inputs)[0].argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
        start = int((enc.labels != IGNORE).nonzero()[0]) - 1  # the position that predicts the answer's first token
        first += int(a[start] == b[start])
    return {"positions": total, "top1_agreement": round(same / total, 4),
            "answer_first_token_agreement": round(first / len(records), 4)}


def main(argv: list[str] | None = None) -> None:
    import unigemma
    from bench.quant_quality import prose
    from unigemma.weights.mini import default_base

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="a trained mini checkpoint (python -m unigemma.weights.mini OUT --trained RUN_DIR)")
    p.add_argument("--data", type=Path, required=True, help="a held-out jsonl (bench/mmdata's heldout.jsonl)")
    p.add_argument("--per-kind", type=int, default=200, help="float32 accuracy: items per kind")
    p.add_argument("--quant-per-kind", type=int, default=50, help="int8 / int4 accuracy: items per kind")
    p.add_argument("--agree-per-kind", type=int, default=10, help="top-1 agreement: conversations per kind")
    p.add_argument("--prose-tokens", type=int, default=2048)
    p.add_argument("--schemes", default="int8,int4-g32")
    p.add_argument("--kinds", help="comma-separated kinds (default: all twelve)")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"--data {args.data}: not a file" + (" (give the directory's heldout.jsonl)"
                                                     if (args.data / "heldout.jsonl").is_file() else ""))
    out = {"bench": "mini_quality", **machine(torch.get_num_threads())}
    records = select(read_jsonl(args.data), None, args.kinds.split(",") if args.kinds else None)
    t0 = time.perf_counter()
    ref = unigemma.load(args.model, dtype="float32")
    full = select(records, max(args.per_kind, args.quant_per_kind), None)
    preds = predict(ref, full, args.data, progress=True)
    scores = score(select(full, args.per_kind, None), preds)
    for kind, s in sorted(scores.items()):
        print(f"## {kind}: {s.correct}/{s.n} = {s.accuracy:.1%}\n{confusion_table(s)}\n", file=sys.stderr)
    out["float32"] = summary(scores)
    print(json.dumps({"float32": out["float32"]}), file=sys.stderr, flush=True)
    quick = select(records, args.quant_per_kind, None)
    agree_on = select(records, args.agree_per_kind, None)
    processor = ref.processor()
    out["float32_on_quant_items"] = summary(score(quick, preds))  # the same items as the quantized runs
    for scheme in filter(None, args.schemes.split(",")):  # --schemes "": float32 only
        q = unigemma.load(args.model, dtype="float32", quant=scheme)
        out[scheme] = {"heldout": summary(score(quick, predict(q, quick, args.data, progress=True))),
                       **agreement(ref.model, q.model, processor, agree_on, args.data)}
        print(json.dumps({scheme: out[scheme]}), file=sys.stderr, flush=True)
        del q
    base = unigemma.load(default_base(), dtype="float32", dequantize=True)
    ids = prose(args.prose_tokens, base.tokenizer)
    ppl_base, ppl_mini = perplexity(base.model, ids), perplexity(ref.model, ids)
    out["prose"] = {"tokens": len(ids), "perplexity_gemma3_270m": round(ppl_base, 3),
                    "perplexity_mini": round(ppl_mini, 3), "rise": round(ppl_mini / ppl_base - 1, 4),
                    "target_rise": 0.10, "met": ppl_mini / ppl_base - 1 <= 0.10}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
