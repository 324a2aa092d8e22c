"""unigemma-mini's checkpoint packed small enough to travel to a GPU machine, and unpacked there.

    python -m bench.mini_bundle pack --checkpoint runs/ck --out runs/bundle --ids-from a.jsonl ...
    python -m bench.mini_bundle unpack runs/bundle /tmp/ck

The machine a training stage may borrow takes 64 MiB a call, and the mini's float32 checkpoint is
1.1 GB: 100 M decoder-layer weights and a 262,144-row embedding table (168 M) that the head shares.
`pack` writes
  * each decoder layer's matrices in int8, one float16 scale for every 64 weights of a row
    (symmetric, round to nearest: the largest relative error of a group is 1/254, the RMS about a
    third of a percent of the weights', far under the GGUF base's own Q4_K rounding), split into
    `--parts` files of whole layers so each fits one call;
  * the embedding table's rows of the token ids the stage will ever see (`--ids-from`: every
    trainer-format line it may train or score on, encoded here by the checkpoint's own processor;
    `--text-ids`: token lists such as bench/mini_keep_text.py's), int8 the same way;
  * everything else (norms, the embedders) in bfloat16 where that is exact, else as stored, and
    the tokenizer xz-compressed (33 MB → 3.5).
`unpack` writes a checkpoint `unigemma.load` takes: float32, every row of the table not packed set to
zero. A zero row's logit is 0 whatever the hidden state: the stage's loss then spreads over the kept
tokens and a constant for the rest, an approximation of the softmax it names (`kept.json` lists the
ids, so the stage can refuse any example that reaches outside them). That constant is not the
head the model ships with: `--all-rows N` packs the other 256,000 rows too, int4 (one float16
scale per 32 weights; 94 MB in N files, so N more calls), so that every logit the loss sees is
the shipped head's up to that rounding.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GROUP = 64  # weights per int8 scale
GROUP4 = 32  # weights per int4 scale (the embedding rows the stage never meets, with --all-rows)
EMBED = "model.language_model.embed_tokens.weight"
SPECIAL = range(0, 4)  # pad, eos, bos, unk: the collator and the masks use them whatever the data


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float `w` → (int8 [rows, cols], float16 scales [rows, cols / GROUP])."""
    rows, cols = w.shape
    if cols % GROUP:
        raise ValueError(f"{cols} columns: not a multiple of {GROUP}")
    g = w.float().reshape(rows, cols // GROUP, GROUP)
    scale = (g.abs().amax(-1) / 127).clamp_min(1e-12).half()
    q = torch.round(g / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    return (q.float().reshape(rows, -1, GROUP) * scale.float()[..., None]).reshape(rows, cols)


def quantize4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of float `w` → (uint8 [rows, cols / 2]: two 4-bit weights a byte, symmetric in -7..7,
    stored + 8; float16 scales [rows, cols / GROUP4])."""
    rows, cols = w.shape
    if cols % GROUP4:
        raise ValueError(f"{cols} columns: not a multiple of {GROUP4}")
    g = w.float().reshape(rows, cols // GROUP4, GROUP4)
    scale = (g.abs().amax(-1) / 7).clamp_min(1e-12).half()
    q = (torch.round(g / scale.float()[..., None]).clamp(-7, 7) + 8).to(torch.uint8).reshape(rows, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def dequantize4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(rows, -1).float() - 8
    return (q.reshape(rows, -1, GROUP4) * scale.float()[..., None]).reshape(rows, -1)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def kept_ids(checkpoint: Path, sources: list[Path], text_ids: list[Path]) -> list[int]:
    """Every token id the lines of `sources` encode to (with the checkpoint's processor, media read
    from each file's folder), every id of the `text_ids` files, and the special ids."""
    import unigemma
    from unigemma.finetune.data import encode_line

    gemma = unigemma.load(checkpoint, dtype="float32", fast=False)
    processor, ids = gemma.processor(), set(SPECIAL)
    for src in sources:
        for n, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                ids.update(encode_line(processor, json.loads(line), src.parent, f"{src}:{n + 1}").inputs.input_ids[0].tolist())
    for path in text_ids:
        ids.update(i for piece in json.loads(path.read_text()) for i in piece)
    return sorted(ids)


@torch.no_grad()
def pack(checkpoint: Path, out: Path, ids: list[int], parts: int, other_rows: int = 0) -> dict:
    """Write the bundle; returns its manifest (also out/bundle.json). other_rows: the embedding
    rows not in `ids` too, int4, in this many files (0: left out, zero when unpacked)."""
    out.mkdir(parents=True, exist_ok=True)
    n_layers = json.loads((checkpoint / "config.json").read_text())["text_config"]["num_hidden_layers"]
    per_part = -(-n_layers // parts)
    files: dict[str, dict[str, torch.Tensor]] = {f"layers{p}": {} for p in range(parts)}
    files["rest"] = {}
    worst = 0.0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        for name in f.keys():
            w, layer = f.get_tensor(name), layer_of(name)
            if name == EMBED:
                others = torch.ones(len(w), dtype=torch.bool)
                others[torch.tensor(ids)] = False
                for p, rows in enumerate(torch.nonzero(others).flatten().chunk(other_rows) if other_rows else []):
                    q, scale = quantize4(w[rows])
                    files[f"embed{p}"] = {name + ".rows": rows.int(), name + ".q4": q, name + ".scale4": scale}
                w = w[torch.tensor(ids)]
            if w.dim() == 2 and (layer is not None or name == EMBED):
                q, s = quantize(w)
                worst = max(worst, float(((dequantize(q, s) - w).abs().amax(1) / w.abs().amax(1).clamp_min(1e-12)).max()))
                to = files["rest" if layer is None else f"layers{layer // per_part}"]
                to[name + ".q8"], to[name + ".scale"] = q, s
            else:  # bfloat16 where that loses nothing (the shipped embedders are bfloat16)
                lossless = torch.equal(w.to(torch.bfloat16).float(), w.float())
                files["rest"][name] = (w.to(torch.bfloat16) if lossless else w).contiguous()
    for stem, tensors in files.items():
        save_file(tensors, str(out / f"{stem}.safetensors"))
    (out / "kept.json").write_text(json.dumps(ids))
    shutil.copyfile(checkpoint / "config.json", out / "config.json")
    for side in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (checkpoint / side).is_file():
            shutil.copyfile(checkpoint / side, out / side)
    (out / "tokenizer.json.xz").write_bytes(lzma.compress((checkpoint / "tokenizer.json").read_bytes(), preset=9))
    manifest = {"files": {s: (out / f"{s}.safetensors").stat().st_size for s in files},
                "kept_ids": len(ids), "group": GROUP, "largest_group_relative_error": round(worst, 5),
                "layers_per_part": per_part, "other_rows": other_rows}
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@torch.no_grad()
def unpack(bundle: Path, out: Path, parts: list[Path] | None = None, layers: int | None = None) -> Path:
    """The float32 checkpoint the bundle holds, written to `out`. parts: the folders its files lie in
    (each call of the borrowed machine brings some), default `bundle` alone. layers: only the first
    this many decoder layers (a smaller model of the same weights: a smoke test before the rest
    has arrived)."""
    where = {p.name: p for folder in (parts or []) + [bundle] for p in folder.glob("*.safetensors")}
    config = json.loads((bundle / "config.json").read_text())
    manifest = json.loads((bundle / "bundle.json").read_text())
    wanted = [s for s in manifest["files"] if layers is None or not s.startswith("embed")]
    missing = [s for s in wanted if f"{s}.safetensors" not in where and not s.startswith("layers")]
    if missing:  # (a missing layers part is named by its layers, below)
        raise SystemExit(f"{bundle}: {', '.join(s + '.safetensors' for s in missing)} missing (another part's folder?)")
    if layers is not None:
        text = config["text_config"]
        text["num_hidden_layers"], text["layer_types"] = layers, text["layer_types"][:layers]
    vocab, ids = config["text_config"]["vocab_size"], torch.tensor(json.loads((bundle / "kept.json").read_text()))
    tensors: dict[str, torch.Tensor] = {}
    other: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row ids, rows) of the int4 files
    have = set()  # layers whose matrices arrived (every layer's norms are in rest.safetensors)
    for path in sorted(where.values()):
        stored = load_file(str(path))
        for key, value in stored.items():
            if layers is not None and (layer_of(key) or 0) >= layers:
                continue
            if key.endswith(".q8"):
                name = key[:-3]
                have.add(layer_of(name))
                w = dequantize(value, stored[name + ".scale"])
                if name == EMBED:
                    full = torch.zeros(vocab, w.shape[1])
                    full[ids] = w
                    w = full
                tensors[name] = w
            elif key.endswith(".q4"):
                name = key[:-3]
                other.append((stored[name + ".rows"].long(), dequantize4(value, stored[name + ".scale4"])))
            elif not key.endswith((".scale", ".scale4", ".rows")):
                tensors[key] = value.float()
    for rows, w in other:
        tensors[EMBED][rows] = w
    n = config["text_config"]["num_hidden_layers"]
    if not set(range(n)) <= have:
        raise SystemExit(f"{bundle}: decoder layers {sorted(set(range(n)) - have)} missing (another part's folder?)")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (bundle / side).is_file():
            shutil.copyfile(bundle / side, out / side)
    (out / "tokenizer.json").write_bytes(lzma.decompress((bundle / "tokenizer.json.xz").read_bytes()))
    shutil.copyfile(bundle / "kept.json", out / "kept.json")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--checkpoint", type=Path, required=True, help="a mini checkpoint (config.json, model.safetensors)")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--ids-from", type=Path, action="append", default=[], help="trainer-format jsonl (repeatable)")
    a.add_argument("--text-ids", type=Path, action="append", default=[], help="JSON list of token-id lists")
    a.add_argument("--parts", type=int, default=2, help="files the decoder layers are split into")
    a.add_argument("--all-rows", type=int, default=2, metavar="N",
                   help="the embedding rows not kept, int4 in N files (0: left out, zero rows; the prose "
                        "perplexity of the unpacked model is then 17,679 against 11.7 with them)")
    b = sub.add_parser("unpack")
    b.add_argument("bundle", type=Path)
    b.add_argument("out", type=Path)
    b.add_argument("--part", type=Path, action="append", default=[], help="another folder holding bundle files")
    b.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    args = p.parse_args(argv)
    if args.verb == "pack":
        if not (args.checkpoint / "model.safetensors").is_file():
            p.error(f"--checkpoint {args.checkpoint}: no model.safetensors")
        missing = [str(x) for x in args.ids_from + args.text_ids if not x.is_file()]
        if missing:
            p.error(f"not files: {', '.join(missing)}")
        if args.parts < 1 or args.all_rows < 0:
            p.error("--parts must be >= 1 and --all-rows >= 0")
        ids = kept_ids(args.checkpoint, args.ids_from, args.text_ids)
        print(json.dumps(pack(args.checkpoint, args.out, ids, args.parts, args.all_rows)))
    else:
        if not (args.bundle / "kept.json").is_file():
            p.error(f"{args.bundle}: not a bundle (no kept.json)")
        print(unpack(args.bundle, args.out, args.part, args.layers))


if __name__ == "__main__":
    main()
