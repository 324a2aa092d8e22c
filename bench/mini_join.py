"""Join unigemma-mini's staged adapters into one adapter the package can ship.

    python -m bench.mini_join --adapter unigemma/mini --adapter runs/hear/both \
        --adapter runs/route/both --out runs/joined

The probes' stages (bench/mini_audio_probe.py, bench/mini_probe.py --from-layer, each with
`--save`) each train their own LoRA on the checkpoint the stage before folded in, so the model they
leave is W + sum_i s_i B_i A_i (s_i: each adapter's scaling, alpha_i / r_i): the parts add. The joined adapter stacks them,
A = [A_1; A_2; ...] and B = [s_1 B_1 | s_2 B_2 | ...] with lora_alpha = r (a scaling of 1), which
merges to the same weights; it is checked against the sum before it is written. A part whose B is
all zero on a module (the layers a probe left untrained) is left out, and so is each rank column of
a part whose B column or A row is zero (a joined adapter's padding); each module keeps its own rank,
`r` the largest and `rank_pattern` / `alpha_pattern` (PEFT's, alpha = rank: scaling 1) naming the
modules with fewer. One --adapter alone is compacted so: the shipped r-96 adapter was padded to its
largest rank on every module, five of its 18 layers (0-4, r 32) stored as two thirds zeros.

The embedders (full_weights.safetensors) are the last --adapter's: each stage saved those it
started from, trained or not. card.json is the first --adapter's when it has one (the shipped
model: its name, recipe steps and eval losses, which bench/mini_ship.py keeps), its adapter_scale
dropped (folded into the parts) and `stages` added: each adapter's path, r, alpha and the modules
it adds to (a first adapter joined before keeps its card's `stages`, the later ones appended).

`--energy F` re-factors each module's joined B A by SVD to the fewest ranks that keep F of its
squared Frobenius norm (the best approximation at that rank, Eckart-Young: relative error
sqrt(1 - kept) <= sqrt(1 - F)); the stages, trained one after another, overlap, so the joined r-96
modules keep 99% at rank 39 on average. Lossy: the model it makes is measured again before it ships.

`--strength S1,S2,...` merges each stage at its own strength (its s_i B_i A_i times S_i; default 1 each),
as the Seventh and Eighteenth looks merged a whole run at 0.65 and 0.7: a stage added on top of a joined
adapter at S - 1 moves that stage's part to S times its trained size (README, Thirty-sixth look).

`--layers L1,L2,...` keeps each stage's decoder layers `all` or `LO-HI` only: the shipped adapter's first
five layers without its later ones (`--layers 0-4`), a model whose later layers never learned the
recipe's named-colour -> shape prior (README, Fortieth look).

`--dtype bfloat16` stores the joined factors in bfloat16 (half the bytes: a third stage joined onto
the shipped r-32 adapter is r 48, over the package's 60 MB in float32); the join is checked in
float32 first, and the rounding's own largest difference is printed beside it.
`--embedders-dtype bfloat16` does the same for the embedders (27 MB in float32, the 12B's own
checkpoint keeps them in bfloat16); the loader copies either into the float32 model. Prints one
JSON line: the rank, the size, the largest differences from the sum.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


def stage_parts(config, tensors: dict[str, torch.Tensor], strength: float = 1.0,
                layers: range | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One adapter's (LoraConfig, tensors): module → its part (strength s B, A), its zero rank columns
    (B's column or A's row all zero: padding, an untrained layer) left out, and the modules with none
    left; s is the config's own scaling for that module (alpha / r, rsLoRA's, the patterns').
    `layers`: only the decoder layers in it (None: every module)."""
    from unigemma.lora.peft import PREFIX

    out = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")]
        if layers is not None and layer_of(module) not in layers:
            continue
        a, b = tensors[key].float(), tensors[module + ".lora_B.weight"].float()
        used = b.any(0) & a.any(1)  # a rank column adds B[:, i] A[i] = 0 unless both are nonzero
        if used.any():
            s = config.scaling_for(module.removeprefix(PREFIX), r=a.shape[0])
            out[module] = (strength * s * b[:, used], a[used])
    return out


def layer_of(module: str) -> int | None:
    """The decoder layer a module's name sits in (`...layers.7.mlp.up_proj` → 7), else None."""
    found = re.search(r"\.layers\.(\d+)\.", module)
    return int(found.group(1)) if found else None


def layer_ranges(spec: str | None, count: int) -> list[range | None]:
    """`--layers`' each adapter's decoder layers: `all`, or `LO-HI` (both kept); ValueError naming
    what is wrong."""
    if spec is None:
        return [None] * count
    out = []
    for item in spec.split(","):
        if item == "all":
            out.append(None)
            continue
        lo, sep, hi = item.partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
            raise ValueError(f"{item!r} is neither all nor LO-HI")
        out.append(range(int(lo), int(hi) + 1))
    if len(out) != count:
        raise ValueError(f"{len(out)} layer ranges for {count} adapters")
    return out


def join(stages: list[dict]) -> dict[str, torch.Tensor]:
    """The tensors of one adapter at scaling 1 equal to the sum of the `stages` (stage_parts' each),
    each module at its own rank."""
    by_module: dict[str, list] = {}
    for parts in stages:
        for module, part in parts.items():
            by_module.setdefault(module, []).append(part)
    if not by_module:
        raise SystemExit("the adapters have no nonzero part: nothing to join")
    out = {}
    for module, ps in by_module.items():
        out[module + ".lora_A.weight"] = torch.cat([a for _, a in ps], 0).contiguous()
        out[module + ".lora_B.weight"] = torch.cat([b for b, _ in ps], 1).contiguous()
    return out


def truncated(tensors: dict[str, torch.Tensor], energy: float) -> tuple[dict[str, torch.Tensor], float]:
    """(tensors, largest relative error): each module's B A (scaling 1) as the SVD's top k,
    k the fewest singular values whose squares sum to `energy` of the total. Through the factors'
    QR (B = Qb Rb, A^T = Qa Ra: B A = Qb (Rb Ra^T) Qa^T), so only an r x r matrix is decomposed."""
    out, worst = {}, 0.0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[:-len(".lora_A.weight")]
        a, b = tensors[key].double(), tensors[module + ".lora_B.weight"].double()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        kept = (s ** 2).cumsum(0) / (s ** 2).sum()
        k = min(int((kept < energy - 1e-9).sum()) + 1, len(s))  # 1e-9: F = 1 is the numerical rank
        root = s[:k].sqrt()
        out[module + ".lora_B.weight"] = (qb @ u[:, :k] * root).float().contiguous()
        out[module + ".lora_A.weight"] = (root[:, None] * vh[:k] @ qa.T).float().contiguous()
        worst = max(worst, float((1 - kept[k - 1]).clamp(min=0).sqrt()))
    return out, worst


def ranks_of(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each module's rank: its lora_A's rows."""
    return {k[:-len(".lora_A.weight")]: t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")}


def rank_patterns(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r, pattern): r the largest rank, pattern each other module's (transformers' name, escaped:
    PEFT's key rule matches it as a suffix) at its own rank, for rank_pattern and alpha_pattern."""
    from unigemma.lora.peft import PREFIX

    r = max(ranks.values())
    return r, {re.escape(m.removeprefix(PREFIX)): k for m, k in sorted(ranks.items()) if k != r}


def largest_difference(stages: list[dict], joined: dict[str, torch.Tensor]) -> float:
    """max |sum_i s_i B_i A_i - B A| over the joined adapter's modules."""
    worst = 0.0
    for module in {m for parts in stages for m in parts}:
        want = sum(parts[module][0] @ parts[module][1] for parts in stages if module in parts)
        got = joined[module + ".lora_B.weight"].float() @ joined[module + ".lora_A.weight"].float()
        worst = max(worst, float((want - got).abs().max()))
    return worst


def stored(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """`tensors` as they are written: floating ones in `dtype` (float32 leaves them as they are)."""
    to = getattr(torch, dtype)
    return {k: v.to(to).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> None:
    from collections import Counter
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from unigemma.finetune.full import FULL_FILE
    from unigemma.lora.peft import CONFIG_FILE, WEIGHTS_FILE, read_adapter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", type=Path, action="append", required=True,
                   help="an adapter directory (PEFT files), in the order the stages trained (once: compact it)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--energy", type=float, default=None, metavar="F",
                   help="re-factor each module by SVD to the fewest ranks keeping F (0 < F <= 1) of its squared norm")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the stored factors' (the package's size limit; the join is checked in float32)")
    p.add_argument("--embedders-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the stored embedders' (full_weights.safetensors, copied from the last --adapter)")
    p.add_argument("--strength", default=None, metavar="S1,S2,...",
                   help="each --adapter's merge strength, in their order (default: 1 each)")
    p.add_argument("--layers", default=None, metavar="L1,L2,...",
                   help="each --adapter's decoder layers kept, in their order: all, or LO-HI (both kept)")
    args = p.parse_args(argv)
    try:
        layers = layer_ranges(args.layers, len(args.adapter))
    except ValueError as e:
        p.error(f"--layers {args.layers}: {e}")
    try:
        strengths = [float(x) for x in args.strength.split(",")] if args.strength else [1.0] * len(args.adapter)
    except ValueError:
        p.error(f"--strength {args.strength}: numbers, comma-separated")
    if len(strengths) != len(args.adapter):
        p.error(f"--strength {args.strength}: {len(strengths)} strengths for {len(args.adapter)} adapters")
    if not (args.adapter[-1] / FULL_FILE).is_file():
        p.error(f"{args.adapter[-1]}: no {FULL_FILE} (the last stage's embedders are shipped)")
    if args.out.resolve() in {a.resolve() for a in args.adapter}:
        p.error(f"--out {args.out} is one of the adapters")
    if args.energy is not None and not 0 < args.energy <= 1:
        p.error(f"--energy {args.energy}: a share of the squared norm, 0 < F <= 1")
    loaded = [read_adapter(a) for a in args.adapter]  # checked as files (CheckpointError naming one)
    targets = [c.target_modules for c, _ in loaded]
    if any(t != targets[0] for t in targets):
        raise SystemExit(f"the adapters target different modules: {targets}")
    stages = [stage_parts(c, t, k, span) for (c, t), k, span in zip(loaded, strengths, layers)]
    tensors = join(stages)
    worst = largest_difference(stages, tensors)
    if worst > 1e-4:
        raise SystemExit(f"the joined adapter is {worst:.2e} off the sum of the parts")
    truncation = None
    if args.energy is not None:
        tensors, truncation = truncated(tensors, args.energy)
    ranks = ranks_of(tensors)
    rank, pattern = rank_patterns(ranks)
    tensors = stored(tensors, args.dtype)
    changed = args.dtype != "float32" or args.energy is not None
    rounding = largest_difference(stages, tensors) if changed else worst

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = replace(loaded[0][0], r=rank, alpha=float(rank), use_rslora=False, rank_pattern=pattern,
                     alpha_pattern={k: float(v) for k, v in pattern.items()})
    (args.out / CONFIG_FILE).write_text(json.dumps(config.to_peft(), indent=2) + "\n")
    embedders = load_file(str(args.adapter[-1] / FULL_FILE))
    save_file(stored(embedders, args.embedders_dtype), str(args.out / FULL_FILE), metadata={"format": "pt"})
    described = [{"adapter": str(a), "r": c.r, "lora_alpha": c.alpha, "modules": len(parts),
                  **({"strength": k} if k != 1 else {}),
                  **({"layers": f"{span.start}-{span.stop - 1}"} if span is not None else {})}
                 for a, (c, _), parts, k, span in zip(args.adapter, loaded, stages, strengths, layers)]
    first_card = args.adapter[0] / "card.json"
    if first_card.is_file():
        card = {k: v for k, v in json.loads(first_card.read_text()).items() if k != "adapter_scale"}
        # a first adapter joined before (the shipped one) keeps its own stages' history
        history = card.get("stages", described[:1]) + described[1:]
        (args.out / "card.json").write_text(json.dumps({**card, "stages": history}, indent=1) + "\n")
    size = sum((args.out / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE, FULL_FILE))
    print(json.dumps({"out": str(args.out), "r": rank, "ranks": dict(sorted(Counter(ranks.values()).items())),
                      "dtype": args.dtype, "embedders_dtype": args.embedders_dtype, "stages": described,
                      "weights_mb": round(size / 1e6, 1), "largest_difference": worst, "stored_difference": rounding,
                      "energy": args.energy, "largest_relative_error": truncation}))


if __name__ == "__main__":
    main()
