"""Take a trained stage's adapter off the text after the fact, keeping what it does to pictures
and sounds: each LoRA A re-fitted, B kept.

    python -m bench.mini_off_text --model runs/shipped-ck --adapter runs/gpu18/stage \
        --media runs/mini7/data/train.jsonl --text-weight 1,10 --out runs/off
    python -m bench.mini_off_text --model runs/shipped-ck --adapter runs/gpu18/stage \
        --keep-text 0.01 --out runs/off/e01

A stage trained without bench/mini_keep_text.py's constraint (bench/mini_gpu.py's: the text
distilled towards the start model instead) still moves the prose a little, and that little
decides how strongly it can ship: the Eighteenth look's stage raised the prose perplexity by 2.2%
and was merged at 0.7 to keep the decoder inside the issue's bound, which cost most of the count
it had learned. Two ways to take it off the text once it is trained:

- `--keep-text EPS`: bench/mini_keep_text.py's projection applied once, A ← A − A P Pᵀ, P the
  directions holding all but EPS of text's input energy to that module. Blunt: text fills nearly
  every direction (at 0.01, 627 of a module's 640 on average), and the media's inputs with it.
- `--media FILE --text-weight W`: per module, the A' nearest A on the inputs of multimodal
  conversations (`--media-items` lines of FILE holding a picture or a sound: their image, audio and
  question tokens) while small on English prose's,
      A' = argmin ‖(A' − A) X_m‖² + W ‖A' X_t‖² = A C_m (C_m + W C_t)⁻¹,
  C_m, C_t the per-token uncentred covariances (the same A' for any fixed B: B's Gram matrix
  factors out of the normal equations). W = 0 keeps A; W → ∞ takes every direction text uses
  away. A comma-separated list writes one adapter each, under `--out`/weight-W.

The inputs are the base decoder's (`--model`, the checkpoint the stage was trained on: the adapter
is loaded but not active), as the re-fitted model's text will see them, with the stage's own
embedders (its full_weights.safetensors, when it saved them) making the pictures' and sounds'
tokens. Lossy for the media too: the model it makes is measured again. Writes the adapter (PEFT format, the stage's config) and the
stage's embedders (full_weights.safetensors, copied: they never see text). Prints one JSON line
per adapter written: `text_left`, the share of the update's energy on prose inputs (Σ ‖B A' X_t‖²
over Σ ‖B A X_t‖², every module) and `media_error`, the relative error on the media conversations'
(Σ ‖B (A' − A) X_m‖² over Σ ‖B A X_m‖²).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch


def refit(a: torch.Tensor, c_media: torch.Tensor, c_text: torch.Tensor, weight: float) -> torch.Tensor:
    """A C_m (C_m + W C_t)⁻¹ in float64 (a 1e-9-of-the-trace ridge keeps it solvable when neither
    covariance fills a direction); returned in A's dtype."""
    m = c_media + weight * c_text
    m = m + 1e-9 * torch.trace(m) / m.shape[0] * torch.eye(m.shape[0], dtype=m.dtype)
    return torch.linalg.solve(m, c_media @ a.double().T).T.to(a.dtype)  # m symmetric: A' m = A C_m


def energy(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> float:
    """Σ over tokens of ‖B A x‖² = tr(B A C Aᵀ Bᵀ), C = Σ x xᵀ."""
    ba = b.double() @ a.double()
    return float(torch.einsum("oi,ij,oj->", ba, c, ba))


def media_lines(path: Path, n: int, seed: int) -> list[dict]:
    """`n` lines of a trainer jsonl that hold a picture or a sound, drawn with `seed`."""
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]

    def has_media(message) -> bool:
        content = message.get("content") if isinstance(message, dict) else None
        return isinstance(content, list) and any(isinstance(c, dict) and c.get("type") in ("image", "audio")
                                                 for c in content)

    lines = [r for r in lines if isinstance(r, dict) and any(has_media(m) for m in r.get("messages", []))]
    if not lines:
        raise SystemExit(f"{path}: no line holds a picture or a sound")
    random.Random(seed).shuffle(lines)
    return lines[:n]


def weights(text: str) -> list[float]:
    out = [float(x) for x in text.split(",")]
    if any(not w >= 0 for w in out):
        raise argparse.ArgumentTypeError(f"{text}: weights are numbers >= 0")
    return out


def main(argv: list[str] | None = None) -> None:
    import unigemma
    from bench.mini_keep_text import _Share, input_covariance, project_, text_covariance, text_ids, text_subspaces
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.full import FULL_FILE, load_full_weights
    from unigemma.finetune.loss import hidden_states
    from unigemma.lora import load_adapter
    from unigemma.lora.inject import lora_modules
    from unigemma.lora.peft import save_adapter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the checkpoint the stage was trained on")
    p.add_argument("--adapter", type=Path, required=True, help="the stage's --save / --out directory")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-text", type=float, metavar="EPS", action=_Share,
                     help="project A off the directions holding all but EPS of text's input energy")
    how.add_argument("--text-weight", type=weights, metavar="W[,W...]",
                     help="re-fit A on --media's inputs against W times the prose's (one adapter per W)")
    p.add_argument("--media", type=Path, help="trainer jsonl whose picture and sound lines A is re-fitted on")
    p.add_argument("--media-items", type=int, default=240)
    p.add_argument("--tokens", type=int, default=30000, help="English tokens the text's inputs are gathered on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for path, what in ((args.model / "config.json", "--model"), (args.adapter / "adapter_config.json", "--adapter")):
        if not path.is_file():
            p.error(f"{what}: no {path}")
    if args.text_weight is not None and (args.media is None or not args.media.is_file()):
        p.error("--text-weight needs --media, a trainer jsonl file")
    if args.tokens < 1 or args.media_items < 1:
        p.error("--tokens and --media-items: at least 1")
    if args.out.resolve() == args.adapter.resolve():
        p.error("--out must differ from --adapter (the stage is kept as it was)")

    gemma = unigemma.load(args.model, dtype="float32", fast=False, exact=True)
    model, tok = gemma.model, gemma.tokenizer
    full = args.adapter / FULL_FILE
    if full.is_file():  # the stage's embedders: the media inputs as its model makes them
        load_full_weights(model, full)
    config = load_adapter(model, args.adapter, activate=False)  # the base decoder runs: every input as it sees it
    modules = lora_modules(model)
    A = {n: m.lora_A["default"].weight.detach().clone() for n, m in modules.items()}
    B = {n: m.lora_B["default"].weight.detach() for n, m in modules.items()}
    texts, layers = text_ids(tok, args.tokens), len(model.text.layers)

    if args.keep_text is not None:
        c_text = text_covariance(model, modules, texts, layers)
        project_(modules, text_subspaces(c_text, args.keep_text))
        outs = [(args.out, {n: m.lora_A["default"].weight.detach().clone() for n, m in modules.items()},
                 {"keep_text": args.keep_text})]
        c_media = None
    else:
        processor = gemma.processor()
        lines = media_lines(args.media, args.media_items, args.seed)

        @torch.no_grad()
        def run():
            for r in lines:
                hidden_states(model, collate([encode_line(processor, r, args.media.parent, "media")], 0).inputs)

        # each input at length 1: <bos> and the attention sinks' inputs are hundreds of times
        # longer than the rest and would otherwise be most of both covariances
        c_media, n_media = input_covariance(modules, run, unit=True)
        n_text = sum(len(ids) for ids in texts)
        c_media = {n: c / n_media for n, c in c_media.items()}
        c_text = {n: c / n_text for n, c in text_covariance(model, modules, texts, layers, unit=True).items()}
        outs = [(args.out / f"weight-{w:g}", {n: refit(A[n], c_media[n], c_text[n], w) for n in modules},
                 {"text_weight": w, "media_tokens": n_media}) for w in args.text_weight]

    for out, refitted, how in outs:
        with torch.no_grad():
            for n, m in modules.items():
                m.lora_A["default"].weight.copy_(refitted[n])
        save_adapter(model, out, config)
        if full.is_file():
            shutil.copyfile(full, out / FULL_FILE)
        line = {"bench": "mini_off_text", "adapter": str(args.adapter), **how,
                "text_left": round(sum(energy(B[n], refitted[n], c_text[n]) for n in modules)
                                   / sum(energy(B[n], A[n], c_text[n]) for n in modules), 4)}
        if c_media is not None:
            line["media_error"] = round(sum(energy(B[n], refitted[n] - A[n], c_media[n]) for n in modules)
                                        / sum(energy(B[n], A[n], c_media[n]) for n in modules), 4)
        print(json.dumps({**line, "out": str(out)}), flush=True)


if __name__ == "__main__":
    main()
