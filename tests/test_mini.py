"""unigemma-mini (models/mini.py) against a transformers reference assembled from the same file.

The reference has no mini class: it is transformers' own `Gemma3ForCausalLM` (the decoder) plus
Gemma 4 unified's `Gemma4UnifiedVisionEmbedder` / `Gemma4UnifiedMultimodalEmbedder` (the
embedders), each loaded from the safetensors file our `save_checkpoint` wrote (names stripped of
their prefix; Gemma 3's norms stored as w, as transformers keeps them). Soft tokens are scattered
into the placeholders by hand, and the masks are transformers' Gemma 4 composition
(`create_masks_for_vision_model`: full layers causal, sliding layers AND(window, OR(causal,
block))) built over the Gemma 3 config, then handed to the decoder as its mask dict.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from reference import audio_frames, patches
from safetensors.torch import load_file

import unigemma
from bench.mmdata.vocab import FONT_PACKAGES, missing_fonts
from unigemma.config import ModelConfig
from unigemma.models import mini
from unigemma.weights.random import randomize_reference
from unigemma.weights.save import save_checkpoint

IMG, AUD = 500, 502  # tiny_config's image / audio placeholder ids (boi 503, eoi 504, boa 505, eoa 506)
GRID = (3, 4)  # 12 soft tokens: one image block longer than the window of 5, so the clip matters


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random mini model and the checkpoint it saved."""
    d = mini.tiny_config()
    model = mini.UnigemmaMini(ModelConfig.from_dict(d))
    randomize_reference(model, seed=7)  # norms in [0.5, 1.5), tables and matrices random
    path = save_checkpoint(model.eval(), d, tmp_path_factory.mktemp("mini"))
    return model, path


@pytest.fixture(scope="module")
def reference(saved):
    return reference_modules(saved[1], mini.tiny_config())


def reference_modules(path: Path, d: dict):
    """(decoder, vision embedder, audio embedder) of transformers, loaded from the checkpoint at
    `path` whose config.json is `d`."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma4UnifiedAudioConfig, Gemma4UnifiedVisionConfig
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        Gemma4UnifiedMultimodalEmbedder, Gemma4UnifiedVisionEmbedder)

    config = ModelConfig.from_dict(d)
    tensors = load_file(str(path / "model.safetensors"))

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    text = {f: getattr(config.text, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types",
            "sliding_window", "rope_parameters", "rms_norm_eps", "query_pre_attn_scalar", "final_logit_softcapping",
            "tie_word_embeddings", "pad_token_id", "max_position_embeddings")}
    decoder = Gemma3ForCausalLM(Gemma3TextConfig(**text, attn_implementation="eager"))
    decoder.model.load_state_dict(part("model.language_model."), strict=True)
    decoder.tie_weights()
    width = SimpleNamespace(hidden_size=text["hidden_size"])
    vision = Gemma4UnifiedVisionEmbedder(Gemma4UnifiedVisionConfig(**d["vision_config"]), width)
    vision.load_state_dict(part("model.embed_vision."), strict=True)
    audio = Gemma4UnifiedMultimodalEmbedder(Gemma4UnifiedAudioConfig(**d["audio_config"]), width)
    audio.load_state_dict(part("model.embed_audio."), strict=True)
    return decoder.eval(), vision.eval(), audio.eval()


def prompt(image: bool, audio: bool, frames: int = 7):
    """ids [1, S] and mm_token_type_ids: text, then an image block and / or an audio block, then text."""
    ids = [2, 17, 33, 91]
    if image:
        ids += [503] + [IMG] * (GRID[0] * GRID[1]) + [504]
    ids += [44, 45]
    if audio:
        ids += [505] + [AUD] * frames + [506]
    ids += [60, 61, 62]
    ids = torch.tensor([ids])
    types = torch.where(ids == IMG, 1, torch.where(ids == AUD, 3, 0))
    return ids, types


def media(image: bool, audio: bool, frames: int = 7) -> dict:
    g = torch.Generator().manual_seed(11)
    out = {}
    if image:
        out["pixel_values"], out["image_position_ids"] = patches([GRID], 16, g)  # 4 padding patches
    if audio:
        out["input_features"], out["input_features_mask"] = audio_frames([frames], g)
    return out


@torch.no_grad()
def reference_logits(ref, ids, types, m, block: bool = True, image_id: int = IMG, audio_id: int = AUD):
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        create_masks_for_vision_model, get_block_sequence_ids_for_mask)

    decoder, vision, audio = ref
    h = decoder.model.embed_tokens(torch.where((ids == image_id) | (ids == audio_id), 0, ids))  # × sqrt(hidden)
    if "pixel_values" in m:
        pos = m["image_position_ids"]
        feats = vision(m["pixel_values"], pos).pooler_output[(pos != -1).all(-1)]
        h = h.masked_scatter((ids == image_id)[..., None], feats)
    if "input_features" in m:
        feats = audio(m["input_features"])[m["input_features_mask"]]
        h = h.masked_scatter((ids == audio_id)[..., None], feats)
    S = ids.shape[1]
    kw = dict(config=decoder.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
              position_ids=torch.arange(S)[None])
    masks = (create_masks_for_vision_model(block_sequence_ids=get_block_sequence_ids_for_mask(types, h.device), **kw)
             if block else create_masks_for_generate(**kw))
    return decoder(inputs_embeds=h, attention_mask=masks, position_ids=torch.arange(S)[None]).logits


CASES = {"text": (False, False), "image": (True, False), "audio": (False, True), "image+audio": (True, True)}


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_the_transformers_reference(saved, reference, case):
    model, _ = saved
    image, audio = CASES[case]
    ids, types = prompt(image, audio)
    m = media(image, audio)
    ours = model.logits(ids, mm_token_type_ids=types, **m)
    want = reference_logits(reference, ids, types, m)
    diff = (ours - want).abs().max().item()
    print(f"unigemma-mini vs transformers, {case}: max abs diff {diff:.2e} (logits up to {want.abs().max():.1f})")
    assert diff < 1e-4
    if image:  # the bidirectional image block is what the reference has too: causal-only differs
        causal = reference_logits(reference, ids, types, m, block=False)
        assert (ours - causal).abs().max() > 1e-3


def test_save_load_round_trip(saved):
    model, path = saved
    loaded = unigemma.load_model(path, dtype="float32")
    assert type(loaded) is mini.UnigemmaMini
    assert loaded.config.text.use_bidirectional_attention == "vision"
    ids, types = prompt(True, True)
    m = media(True, True)
    assert torch.equal(loaded.logits(ids, mm_token_type_ids=types, **m), model.logits(ids, mm_token_type_ids=types, **m))
    ours = dict(model.state_dict())
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, ours[name]), name


def test_media_without_an_embedder_or_placeholders_are_refused(saved):
    model, _ = saved
    ids, types = prompt(True, False)
    with pytest.raises(unigemma.InputError, match="no image inputs"):
        model.logits(ids, mm_token_type_ids=types)
    with pytest.raises(unigemma.InputError, match="placeholder"):
        model.logits(prompt(False, False)[0], **media(True, False))


def test_config_checks():
    d = mini.tiny_config()
    with pytest.raises(unigemma.ConfigError, match="text_config"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "text_config"})
    with pytest.raises(unigemma.ConfigError, match="image_token_id"):
        ModelConfig.from_dict({**d, "image_token_id": 10**6})
    with pytest.raises(unigemma.ConfigError, match="must differ"):
        ModelConfig.from_dict({**d, "audio_token_id": d["image_token_id"]})
    with pytest.raises(unigemma.ConfigError, match="use_bidirectional_attention"):
        ModelConfig.from_dict({**d, "text_config": {**d["text_config"], "use_bidirectional_attention": "all"}})
    # a Gemma 3 text config carried over: its use_bidirectional_attention=false gives way to "vision"
    gemma3_text = {**d["text_config"], "model_type": "gemma3_text", "vocab_size": 262144,
                   "use_bidirectional_attention": False}
    cfg = ModelConfig.from_dict(mini.mini_config(mini.text_config_of(gemma3_text), 16))
    assert cfg.text.use_bidirectional_attention == "vision" and cfg.vision.mm_embed_dim == cfg.text.hidden_size


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(the mini tokenizer written from the installed Gemma 3 270M GGUF, that GGUF's own)."""
    from unigemma.processing.tokenizer import Tokenizer
    from unigemma.weights.mini import default_base, write_tokenizer

    base = default_base()
    return Tokenizer.from_dir(write_tokenizer(base, tmp_path_factory.mktemp("mini-tok"))), Tokenizer.from_gguf(base)


def test_tokenizer_gives_gemma4_markers_on_gemma3_text(tokenizers):
    from unigemma.weights.mini import GEMMA4_MARKERS

    tok, gemma3 = tokenizers
    assert {i: tok.token_to_id(s) for i, (s, _) in GEMMA4_MARKERS.items()} == {i: i for i in GEMMA4_MARKERS}
    c = ModelConfig.from_dict(mini.mini_config(mini.text_config_of({"vocab_size": 262144})))
    assert (tok.image_token_id, tok.audio_token_id, tok.video_token_id, tok.boi_token_id, tok.eoi_token_id,
            tok.boa_token_id, tok.eoa_token_id) == (c.image_token_id, c.audio_token_id, c.video_token_id,
                                                   c.boi_token_id, c.eoi_token_id, c.boa_token_id, c.eoa_token_index)
    for text in ("The capital of France is", "  two  spaces\n\ttab, café ½ 中文 😶"):
        assert tok.encode(text) == gemma3.encode(text)  # plain text tokenizes as Gemma 3 trained on
    text = "<|turn>user\n<|image><|image|><image|><|audio><|audio|><audio|>hi<turn|>\n<|turn>model\n"
    ids = tok.encode(text)
    user = gemma3.encode("user\n", add_special_tokens=False)
    assert ids[:2 + len(user) + 6] == [2, 105, *user, 255999, 258880, 258882, 256000, 258881, 258883]
    assert tok.decode(ids) in (text, "<bos>" + text)
    assert 106 in tok.eos_ids  # <turn|> (Gemma 3's <end_of_turn>) ends a reply


def test_marker_ids_are_gemma4s(tokenizers):
    """GEMMA4_MARKERS against the real Gemma 4 vocabulary, where the demo has fetched it."""
    from unigemma.vocab import cache_dir
    from unigemma.weights.mini import GEMMA4_MARKERS

    path = cache_dir() / "ggml-vocab-gemma-4.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not fetched (`unigemma demo --multimodal` fetches it): nothing to compare against")
    from unigemma.gguf.reader import read_gguf_metadata

    meta = read_gguf_metadata(path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert {i: (tokens[i], int(types[i])) for i in GEMMA4_MARKERS} == GEMMA4_MARKERS


def test_lora_default_media_reaches_the_decoder_and_the_embedders():
    """What the fine-tuning trainer's `--targets default,media` adapts on a mini model."""
    from unigemma.lora import add_lora
    from unigemma.lora.config import LoraConfig, parse_targets

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    add_lora(model, LoraConfig(r=4, target_modules=parse_targets("default,media")))
    adapted = {n.rsplit(".lora", 1)[0] for n, _ in model.named_parameters() if ".lora" in n}
    assert {"model.embed_vision.patch_dense", "model.embed_vision.multimodal_embedder.embedding_projection",
            "model.embed_audio.embedding_projection"} <= adapted
    layers = model.config.text.num_hidden_layers
    assert len([n for n in adapted if n.startswith("model.language_model.layers.")]) == 7 * layers


def loadable_tiny_mini(tok, path: Path) -> dict:
    """A tiny random mini with the real vocabulary's size and the mini tokenizer, saved at `path`
    for `unigemma.load`; returns its config.json."""
    import shutil

    d = mini.mini_config({**mini.tiny_config()["text_config"], "vocab_size": 262144}, mm_posemb_size=64)
    d["vision_config"].update(mm_embed_dim=48, output_proj_dims=48)
    model = mini.UnigemmaMini(ModelConfig.from_dict(d))
    randomize_reference(model, seed=3)
    save_checkpoint(model.eval(), d, path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tok.name) / f, path / f)
    return d


def test_load_process_and_chat_end_to_end(tokenizers, tmp_path):
    """`unigemma.load` of a mini checkpoint with its tokenizer: the processor's image and audio
    inputs reach the model, and the engine's first greedy token (cached, media prefilled) is the
    argmax of the plain forward over the same inputs."""
    import io

    import numpy as np
    import soundfile as sf
    from PIL import Image

    d = loadable_tiny_mini(tokenizers[0], tmp_path)
    gemma = unigemma.load(tmp_path, dtype="float32", fast=False)
    png, wav = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(png, "PNG")
    sf.write(wav, 0.1 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440), 16000, format="WAV")
    messages = [{"role": "user", "content": [{"type": "image", "image": png.getvalue()},
                                             {"type": "audio", "audio": wav.getvalue()},
                                             {"type": "text", "text": "What do you see and hear?"}]}]
    inputs = dict(gemma.processor()(messages))  # processor-named tensors
    ids = inputs["input_ids"][0]
    n_img, n_aud = int((ids == 258880).sum()), int((ids == 258881).sum())
    assert n_img == int((inputs["image_position_ids"][0] != -1).all(-1).sum()) > 0
    assert n_aud == int(inputs["input_features_mask"].sum()) == 13  # 0.5 s: 8000 samples in 640-sample frames
    want = int(gemma.model.logits(**inputs)[0, -1].argmax())
    reply = gemma.chat(messages, max_new_tokens=2)
    assert reply.prompt_tokens == ids.numel() and reply.token_ids[0] == want
    # the image budget when none is asked is the checkpoint's vision_config num_soft_tokens (70 for
    # mini; a config without it, as transformers writes Gemma 4's, means Gemma 4's 280)
    assert gemma.image_budget == d["vision_config"]["num_soft_tokens"] == 70
    assert n_img == 60  # 60 x 90 px at budget 70: 6 x 10 patches of 48 (280 would give 13 x 20)


def test_build_from_a_gemma3_checkpoint(tmp_path):
    """build_mini_checkpoint over a (tiny) Gemma 3 base: the decoder is the base's, so text logits
    are the base's; the embedders are fresh and follow the seed."""
    from unigemma.models import gemma3
    from unigemma.weights.mini import build_mini_checkpoint

    d = {**gemma3.tiny_config(), "vocab_size": 262144}  # Gemma 3's: the media ids are Gemma 4's
    base = gemma3.Gemma3ForCausalLM(ModelConfig.from_dict(d))
    randomize_reference(base, seed=5)
    save_checkpoint(base.eval(), d, tmp_path / "base")
    a, b, c = (unigemma.load_model(build_mini_checkpoint(tmp_path / name, tmp_path / "base", seed=seed), dtype="float32")
               for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    ids = torch.tensor([[2, 17, 33, 91, 44, 45, 60]])
    assert torch.equal(a.logits(ids), base.logits(ids))
    vision = lambda m: m.model.embed_vision.patch_dense.weight  # noqa: E731
    assert torch.equal(vision(a), vision(b)) and not torch.equal(vision(a), vision(c))
    assert a.config.vision.mm_embed_dim == a.config.text.hidden_size and a.config.image_token_id == 258880


def _tiny_run(tmp_path):
    """A (tiny) Gemma 3 base under tmp_path/base and a `finetune --train-full media` output over it
    under tmp_path/run: other embedders than seed 0's and a nonzero LoRA adapter."""
    from unigemma.finetune.full import FULL_FILE, save_full_weights
    from unigemma.lora import LoraConfig, add_lora, save_adapter
    from unigemma.models import gemma3
    from unigemma.weights.mini import build_mini_model

    d = {**gemma3.tiny_config(), "vocab_size": 262144}
    base = gemma3.Gemma3ForCausalLM(ModelConfig.from_dict(d))
    randomize_reference(base, seed=5)
    save_checkpoint(base.eval(), d, tmp_path / "base")
    trained, _ = build_mini_model(tmp_path / "base", seed=3)  # other embedders than seed 0's
    config = LoraConfig(r=2, alpha=4)
    for p in add_lora(trained, config):
        torch.nn.init.normal_(p, std=0.2)  # B too: a nonzero update
    (tmp_path / "run").mkdir()
    save_adapter(trained, tmp_path / "run", config)
    save_full_weights({n: trained.get_submodule(n) for n in ("model.embed_vision", "model.embed_audio")},
                      tmp_path / "run")
    assert (tmp_path / "run" / FULL_FILE).is_file()
    return tmp_path / "base", tmp_path / "run"


def test_trained_checkpoint_folds_in_the_embedders_and_the_adapter(tmp_path):
    """weights/mini.py `trained_checkpoint`: a `finetune --train-full media` output (embedders whole
    + the decoder's adapter) over a (tiny) Gemma 3 base becomes a checkpoint whose forward on an
    image prompt equals the untrained model with those embedders loaded and the adapter unmerged."""
    from unigemma.finetune.full import load_full_weights
    from unigemma.lora import load_adapter
    from unigemma.weights.mini import build_mini_model, trained_checkpoint

    base, run = _tiny_run(tmp_path)
    out = trained_checkpoint(run, tmp_path / "out", base=base)
    got = unigemma.load_model(out, dtype="float32", pack=False)
    want, _ = build_mini_model(base)
    load_full_weights(want, run)
    load_adapter(want, run)
    ids = torch.tensor([[2, 17, 255999] + [258880] * 12 + [258882, 60, 61]])
    types = (ids == 258880).long()
    pixels, positions = patches([GRID], 16, torch.Generator().manual_seed(2))
    kw = dict(mm_token_type_ids=types, pixel_values=pixels, image_position_ids=positions)
    a, b = got.logits(ids, **kw), want.eval().logits(ids, **kw)
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    untrained, _ = build_mini_model(base)
    assert not torch.allclose(untrained.eval().logits(ids, **kw), b, atol=1e-3)


def test_an_adapter_merged_at_a_scale_lies_between_the_base_and_the_trained_decoder(tmp_path):
    """bench/mini_scale.py `scaled_adapter` (what bench/mini_ship.py --adapter-scale ships): the
    adapter's lora_alpha times s, so every merged decoder weight is W + s (W_trained - W), and the
    embedders are the trained ones whatever s."""
    from safetensors.torch import load_file

    from bench.mini_scale import scaled_adapter
    from unigemma.weights.mini import trained_checkpoint

    base, run = _tiny_run(tmp_path)
    full = load_file(trained_checkpoint(run, tmp_path / "full", base=base) / "model.safetensors")
    half = load_file(trained_checkpoint(scaled_adapter(run, 0.5, tmp_path / "half_run"), tmp_path / "half",
                                        base=base) / "model.safetensors")
    none = load_file(trained_checkpoint(scaled_adapter(run, 1e-9, tmp_path / "no_run"), tmp_path / "none",
                                        base=base) / "model.safetensors")
    moved = 0
    for name, w in full.items():
        if name.startswith(("model.embed_vision", "model.embed_audio")):
            assert torch.equal(half[name], w) and torch.equal(none[name], w)
            continue
        assert torch.allclose(half[name], (none[name] + w) / 2, atol=1e-6), name
        moved += not torch.allclose(none[name], w, atol=1e-4)
    assert moved >= 7  # q, k, v, o, gate, up, down of the layers moved


def test_reader_probe_keeps_heldout_pairs_unseen_and_trains_only_what_it_reads():
    """bench/mini_reader_probe.py: its training pictures never show a held-out colour x shape pair
    (named, or as a fill near the held-out colour), its held-out ones only those; the reader's
    logits come from the embedder and the first `layers` decoder layers, so only their adapter
    (and the embedder and head) get a gradient, and the yardstick (--scratch) skips the decoder."""
    import random

    from bench.mini_reader_probe import Reader, batch, draw
    from bench.mmdata.free_shapes import near_heldout
    from bench.mmdata.vocab import HELDOUT_PAIRS, SHAPES
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    rng = random.Random(0)
    for _ in range(40):
        _, y, colour = draw(rng, "train")
        assert (colour, SHAPES[y]) not in HELDOUT_PAIRS
        _, y, colour = draw(rng, "heldout")
        assert (colour, SHAPES[y]) in HELDOUT_PAIRS
        _, y, fill = draw(rng, "free")
        assert not near_heldout(SHAPES[y], fill)
    px, pos, ys = batch(random.Random(1), ["train", "free"])
    assert px.shape == (2, 64, 6912) and pos.shape == (2, 64, 2) and ys.shape == (2,)

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=3)
    model.config.text.sliding_window = 80  # the probe's block is 64 tokens; the tiny window is 5
    prepare(model, LoraConfig(r=2, alpha=4))
    for p in model.model.embed_vision.parameters():
        p.requires_grad_(True)
    reader = Reader(model, layers=2)
    reader(px, pos).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert all(g is not None for n, g in grads.items() if ".layers.0." in n or ".layers.1." in n)
    assert all(g is None for n, g in grads.items() if ".layers.2." in n or ".layers.6." in n)
    assert model.model.embed_vision.patch_dense.weight.grad is not None
    assert Reader(model, layers=0, scratch=1)(px, pos).shape == (2, len(SHAPES))


@pytest.mark.skipif(bool(missing_fonts()), reason=f"the data's fonts are missing (Debian: apt-get install -y "
                                                  f"{FONT_PACKAGES})")
def test_word_probe_draws_each_split_in_its_own_fonts_and_names_one_of_the_words():
    """bench/mini_word_probe.py: training pictures only in training fonts, held-out ones only in the
    held-out family, labelled by the drawn word's index; its reader names one of all the words."""
    import random

    from bench.mini_reader_probe import Reader
    from bench.mini_word_probe import batch, draw
    from bench.mmdata.vocab import HELDOUT_FONTS, TRAIN_FONTS, WORDS

    rng, seen = random.Random(0), set()
    for _ in range(40):
        img, y, font = draw(rng, "train")
        assert font in TRAIN_FONTS and img.size == (144, 144)
        seen.add(y)
        assert draw(rng, "heldout")[2] in HELDOUT_FONTS
    assert len(seen) > 20  # drawn across the vocabulary, not one word
    px, pos, ys = batch(random.Random(1), "heldout", 3)
    assert px.shape == (3, 64, 6912) and pos.shape == (3, 64, 2) and ys.shape == (3,)
    again = batch(random.Random(1), "heldout", 3)  # fixed evaluation sets are fixed by their seed
    assert torch.equal(again[0], px) and torch.equal(again[2], ys)

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=3)
    model.config.text.sliding_window = 80
    assert Reader(model, layers=1, classes=len(WORDS))(px, pos).shape == (3, len(WORDS))


def test_reader_probe_start_checkpoint_folds_in_its_embedder_and_adapter(saved, tmp_path):
    """bench/mini_reader_probe.py `start_checkpoint`: the probe's saved embedder and adapter,
    folded into the checkpoint it started from, give the same logits as that model with them
    loaded and the adapter unmerged."""
    from bench.mini_reader_probe import start_checkpoint
    from unigemma.finetune.full import save_full_weights
    from unigemma.lora import LoraConfig, add_lora, load_adapter, save_adapter

    _, path = saved
    trained = unigemma.load_model(path, dtype="float32", pack=False)
    torch.nn.init.normal_(trained.model.embed_vision.patch_dense.weight, std=0.05)  # another embedder
    config = LoraConfig(r=2, alpha=4)
    for p in add_lora(trained, config):
        torch.nn.init.normal_(p, std=0.2)
    save_adapter(trained, tmp_path / "probe", config)
    save_full_weights({n: trained.get_submodule(n) for n in ("model.embed_vision", "model.embed_audio")},
                      tmp_path / "probe")
    got = unigemma.load_model(start_checkpoint(path, tmp_path / "probe", tmp_path / "start"), dtype="float32")
    want = unigemma.load_model(path, dtype="float32", pack=False)
    want.model.embed_vision.load_state_dict(trained.model.embed_vision.state_dict())
    load_adapter(want, tmp_path / "probe")
    ids = torch.tensor([[2, 17, 503] + [IMG] * 12 + [504, 60, 61]])
    pixels, positions = patches([GRID], 16, torch.Generator().manual_seed(2))
    kw = dict(mm_token_type_ids=(ids == IMG).long(), pixel_values=pixels, image_position_ids=positions)
    a, b = got.logits(ids, **kw), want.eval().logits(ids, **kw)
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    plain = unigemma.load_model(path, dtype="float32").logits(ids, **kw)
    assert not torch.allclose(plain, b, atol=1e-3)


def test_quality_bench_names_a_data_directory_given_for_its_jsonl(tmp_path, capsys):
    """bench/mini_quality.py --data takes the held-out jsonl: a directory is an argument error that
    points at its heldout.jsonl, before any model loads."""
    from bench.mini_quality import main

    (tmp_path / "heldout.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert e.value.code == 2 and "give the directory's heldout.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("probe, own", [("mini_reader_probe", (["--free", "1.5"], "--free")),
                                         ("mini_audio_probe", (["--task", "shape"], "--task")),
                                         ("mini_word_probe", (["--batch-size", "0"], "--batch-size"))])
def test_reader_probes_refuse_bad_arguments_before_loading(tmp_path, capsys, probe, own):
    """bench/mini_reader_probe.py, mini_audio_probe.py and mini_word_probe.py: a count below 1, a share outside [0, 1]
    or an unknown task, a directory without a checkpoint or more layers than it has are argument
    errors naming them, before any model loads."""
    import importlib
    import json

    main = importlib.import_module(f"bench.{probe}").main
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3}}))
    for argv, says in ((["--eval-every", "0"], "--eval-every"), own, (["--keep-text", "1"], "--keep-text"),
                       (["--anchor-text", "-1"], "--anchor-text"), (["--anchor-rows", "0"], "--anchor-rows"),
                       (["--layers", "4"], "has 3 decoder layers")):
        with pytest.raises(SystemExit):
            main(["--model", str(tmp_path), *argv])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "none")])
    assert "no config.json" in capsys.readouterr().err


def test_probe_training_decays_its_rates_to_zero_only_when_asked(tmp_path, capsys):
    """bench/mini_reader_probe.py `train(..., decay=True)` (the probes' `--decay`): each group's
    rate falls linearly from its own start to 0 at the last step; without it the rates stay.
    bench/mini_probe.py takes `--decay` too (its loop steps the same `linear_decay`)."""
    from bench.mini_probe import main
    from bench.mini_reader_probe import linear_decay, train

    for decay, want in ((True, [[0.075, 0.0075], [0.05, 0.005], [0.025, 0.0025], [0.0, 0.0]]),
                        (False, [[0.1, 0.01]] * 4)):
        probe = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD([{"params": [probe.weight], "lr": 0.1}, {"params": [probe.bias], "lr": 0.01}])
        rates, reports = [], []
        train(probe, lambda: (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])), opt,
              lambda: rates.append([g["lr"] for g in opt.param_groups]), 4, 2,
              lambda step, loss: reports.append(step), decay=decay)
        assert rates == [pytest.approx(r) for r in want] and reports == [0, 2, 4]

    with pytest.raises(SystemExit):  # the flag is taken; the missing checkpoint is what is named
        main(["--model", str(tmp_path / "none"), "--data", str(tmp_path), "--category", "digit", "--decay"])
    err = capsys.readouterr().err
    assert "no config.json" in err and "unrecognized" not in err
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    linear_decay(opt, 0)  # mini_probe's `--steps 0 --decay` (evaluate only): no division by zero
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_probe_from_layer_trains_only_the_adapter_above_it(tmp_path, capsys):
    """bench/mini_probe.py `--from-layer K`: the embedders are frozen and only the adapter of
    layers K and up gets a gradient (backward stops at layer K); 0 trains the embedders and every
    layer, and with `--train-full model.embed_audio --lr 0` the audio embedder alone; a K the
    checkpoint lacks, or nothing left to train, is an argument error naming it, before any model
    loads."""
    import json

    from bench.mini_probe import main, trained_parts
    from unigemma.finetune.loss import hidden_states
    from unigemma.finetune.run import prepare
    from unigemma.inputs import ModelInputs
    from unigemma.lora import LoraConfig

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=5)
    prepare(model, LoraConfig(r=2, alpha=4))
    embedders, adapter = trained_parts(model, 3)
    assert embedders == [] and adapter
    ids, types = prompt(image=True, audio=False)
    inputs = ModelInputs.from_dict({"input_ids": ids, "mm_token_type_ids": types, **media(True, False)})
    hidden_states(model, inputs).square().sum().backward()  # the trainer's forward
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert all((g is None) == any(f".layers.{i}." in n for i in range(3)) for n, g in grads.items())
    assert all(p.grad is None for p in model.model.embed_vision.parameters())

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    prepare(model, LoraConfig(r=2, alpha=4))
    embedders, adapter = trained_parts(model, 0)
    assert embedders and len(adapter) == sum("lora_" in n for n, _ in model.named_parameters())

    # the audio embedder alone (--train-full model.embed_audio --lr 0): no adapter, no picture path
    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=5)
    prepare(model, LoraConfig(r=2, alpha=4))
    embedders, adapter = trained_parts(model, 0, "model.embed_audio", adapter=False)
    assert adapter == [] and {id(q) for q in embedders} == {id(q) for q in model.model.embed_audio.parameters()}
    ids, types = prompt(image=True, audio=True)
    inputs = ModelInputs.from_dict({"input_ids": ids, "mm_token_type_ids": types, **media(True, True)})
    hidden_states(model, inputs).square().sum().backward()
    trained = [n for n, q in model.named_parameters() if q.grad is not None]
    assert trained and all(n.startswith("model.embed_audio.") for n in trained)

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 7}}))
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--category", "shape", "--from-layer", "7"])
    assert "--from-layer 7" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--category", "shape", "--from-layer", "3",
              "--lr", "0"])
    assert "nothing would train" in capsys.readouterr().err


def test_probe_pads_the_mix_apart_with_the_same_loss_and_gradient():
    """bench/mini_probe.py `batch_loss`: the category's items and the --mix lines, each padded to
    its own longest, give the label loss (sum and count) and the gradient of the plain path that
    pads all of them as one batch, within float32 rounding; a list left empty is skipped."""
    from bench.mini_probe import batch_loss
    from unigemma.finetune.labels import IGNORE, Encoded
    from unigemma.finetune.run import prepare
    from unigemma.inputs import ModelInputs
    from unigemma.lora import LoraConfig

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=6)
    prepare(model, LoraConfig(r=2, alpha=4))

    def item(image: bool, audio: bool, frames: int = 7, tail: int = 0) -> Encoded:
        ids, types = prompt(image, audio, frames)
        ids = torch.cat([ids, torch.arange(70, 70 + tail)[None]], 1)  # longer answers
        types = torch.cat([types, torch.zeros(1, tail, dtype=types.dtype)], 1)
        labels = torch.full(ids.shape[1:], IGNORE)
        labels[-3 - tail:] = ids[0, -3 - tail:]
        return Encoded(ModelInputs.from_dict({"input_ids": ids, "mm_token_type_ids": types,
                                              **media(image, audio, frames)}), labels)

    own = [item(False, True, 5), item(False, True, 9)]  # short clips
    mixed = [item(True, False, tail=30), item(False, False, tail=12)]  # a picture, a longer text
    grads, sums = [], []
    for together in (True, False):
        model.zero_grad()
        total, n = batch_loss(model, own, mixed, together)
        (total / n).backward()
        sums.append((float(total.detach()), n))
        grads.append({k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None})
    assert sums[0][1] == sums[1][1] == 2 * 3 + 33 + 15
    assert sums[0][0] == pytest.approx(sums[1][0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
    alone = batch_loss(model, own, [])
    plain = batch_loss(model, own, [], True)
    assert alone[1] == plain[1] == 6
    assert float(alone[0].detach()) == pytest.approx(float(plain[0].detach()), rel=1e-5)


def test_linear_probe_reads_the_models_own_forward_and_its_fit_can_fail(tokenizers, tmp_path):
    """bench/mini_linear_probe.py: the `answer` feature after the last layer, normed and through
    the head, is the model's own logits at the position that predicts the answer; every feature
    has one row a layer; the fitted probe scores separable data perfectly and shuffled labels
    near chance."""
    import random

    from bench.mini_linear_probe import fit_and_score, layer_features, pictures_features
    from bench.mini_reader_probe import BUDGET, draw
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.labels import IGNORE

    loadable_tiny_mini(tokenizers[0], tmp_path)
    gemma = unigemma.load(tmp_path, dtype="float32", fast=False, exact=True)
    layers, width = gemma.model.config.text.num_hidden_layers, gemma.model.config.text.hidden_size
    x, y = pictures_features(gemma, "heldout", 2, 0, tmp_path)
    assert x["image"].shape == (2, layers, 2 * width) and x["answer"].shape == x["question"].shape == (2, layers, width)
    assert y.shape == (2,)

    draw(random.Random(1), "train")[0].save(tmp_path / "one.png")
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "one.png"},
                                                        {"type": "text", "text": "What shape is this?"}]},
                           {"role": "assistant", "content": "circle"}]}
    b = collate([encode_line(gemma.processor(image_budget=BUDGET), record, tmp_path, "test")], 0)
    at = int((b.labels[0] != IGNORE).nonzero()[0]) - 1
    model = gemma.model
    got = model.output(model.text.norm(layer_features(model, b.inputs, at)["answer"][-1]))
    want = model.logits(**b.inputs)[0, at]
    assert (got - want).abs().max() < 1e-4 * want.abs().max()

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (600,), generator=g)
    points = torch.randn(600, 10, generator=g) + 6 * torch.nn.functional.one_hot(labels, 10)
    assert fit_and_score(points[:400], labels[:400], points[400:], labels[400:])[0] == 1.0
    shuffled = labels[torch.randperm(600, generator=g)]
    assert fit_and_score(points[:400], shuffled[:400], points[400:], shuffled[400:])[0] < 0.3
    many = torch.randint(0, 30, (600,), generator=g)  # more classes than the ten shapes
    points = torch.randn(600, 30, generator=g) + 6 * torch.nn.functional.one_hot(many, 30)
    assert fit_and_score(points[:400], many[:400], points[400:], many[400:], classes=30)[0] == 1.0


def test_linear_probe_hears_the_audio_block_of_spoken_words(tokenizers, tmp_path):
    """bench/mini_linear_probe.py --spoken: a spoken_word item's `image` feature is its audio
    block's mean and max (another item kind in the file is passed over), the label its index among
    the 102 words, and a file with fewer items than asked is an error naming it."""
    import json

    import numpy as np
    import soundfile as sf

    from bench.mini_linear_probe import layer_features, spoken_features
    from bench.mini_reader_probe import layer_outputs
    from bench.mmdata.vocab import WORDS
    from unigemma.finetune.data import collate, encode_line
    from unigemma.finetune.labels import IGNORE
    from unigemma.inputs import AUDIO

    loadable_tiny_mini(tokenizers[0], tmp_path)
    gemma = unigemma.load(tmp_path, dtype="float32", fast=False, exact=True)
    layers, width = gemma.model.config.text.num_hidden_layers, gemma.model.config.text.hidden_size
    rows = []
    for i, (kind, answer) in enumerate((("digit", "6"), ("spoken_word", "coffee"), ("spoken_word", "road"))):
        sf.write(tmp_path / f"{i}.wav", 0.1 * np.sin(np.arange(4000 + 2000 * i) / 16000 * 2 * np.pi * 440 * (i + 1)),
                 16000)
        rows.append({"kind": kind, "answer": answer, "meta": {}, "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"{i}.wav"},
                                         {"type": "text", "text": "Which word is spoken?"}]},
            {"role": "assistant", "content": answer}]})
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    x, y = spoken_features(gemma, path, 2)
    assert y.tolist() == [WORDS.index("coffee"), WORDS.index("road")]
    assert x["image"].shape == (2, layers, 2 * width) and x["answer"].shape == (2, layers, width)

    b = collate([encode_line(gemma.processor(), {"messages": rows[2]["messages"]}, tmp_path, "test")], 0)
    at = int((b.labels[0] != IGNORE).nonzero()[0]) - 1
    model = gemma.model
    audio = b.inputs.mm_token_type_ids[0] == AUDIO
    h = model.embed(b.inputs.input_ids, **b.inputs.media())
    first = next(iter(layer_outputs(model, h, b.inputs.mm_token_type_ids)))[0, audio]
    torch.testing.assert_close(x["image"][1, 0], torch.cat([first.mean(0), first.amax(0)]))
    torch.testing.assert_close(layer_features(model, b.inputs, at, "audio")["answer"], x["answer"][1])
    with pytest.raises(SystemExit, match="2 spoken_word items, 3 asked for"):
        spoken_features(gemma, path, 3)


def test_keep_text_holds_an_adapter_off_the_texts_inputs():
    """bench/mini_keep_text.py: with each A of the first layers projected off the subspace the
    texts' inputs fill (gathered while B is zero, as before training), a non-zero update leaves
    those texts' hidden states as the base model's, while a picture prompt's logits still move;
    unprojected, the same update moves the text too."""
    from bench.mini_keep_text import first_layers, project_, text_covariance, text_subspaces
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig
    from unigemma.lora.inject import lora_modules

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=4)
    model.eval()
    prepare(model, LoraConfig(r=4, alpha=8))
    K = 2
    kept = {n: m for n, m in lora_modules(model).items() if any(f"layers.{i}." in n for i in range(K))}
    g = torch.Generator().manual_seed(0)
    texts = [[2] + torch.randint(10, 400, (5,), generator=g).tolist() for _ in range(2)]  # fewer inputs than the width
    ids, types = prompt(image=True, audio=False)
    kw = dict(mm_token_type_ids=types, **media(True, False))
    base_text = [first_layers(model, torch.tensor([t]), K) for t in texts]
    base_image = model.logits(ids, **kw)
    bases = text_subspaces(text_covariance(model, kept, texts, K), eps=1e-9)
    width = model.config.text.hidden_size
    assert all(P.shape[1] <= len(texts) * 6 for P in bases.values()) and len(bases) == 7 * K

    def moved() -> tuple[float, float]:
        text = max(float((first_layers(model, torch.tensor([t]), K) - b).abs().max() / b.abs().max())
                   for t, b in zip(texts, base_text))
        return text, float((model.logits(ids, **kw) - base_image).abs().max() / base_image.abs().max())

    with torch.no_grad():
        for m in kept.values():
            m.lora_B["default"].weight.normal_(std=0.5, generator=g)  # a trained, non-zero update
    text_before, image_before = moved()
    project_(kept, bases)
    text_after, image_after = moved()
    assert text_before > 1e-2 and image_before > 1e-2
    assert text_after < 1e-4 * text_before
    assert image_after > 0.3 * image_before
    A = next(iter(kept.values())).lora_A["default"].weight
    assert A.shape[1] == width and float((A.detach() @ next(iter(bases.values()))).abs().max()) < 1e-5


def test_text_anchor_is_zero_at_the_start_and_pulls_a_drifted_adapter_back():
    """bench/mini_keep_text.py `TextAnchor`: its targets are the first layers' output on the
    English it holds (taken while B is zero), so its loss is 0 there; an update that moves the
    text gives a loss, and steps on that loss alone bring the text most of the way back while
    the adapter stays non-zero (the anchor pulls text, not the whole adapter, to the start)."""
    from bench.mini_keep_text import TextAnchor, first_layers
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig
    from unigemma.lora.inject import lora_modules

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=4)
    model.eval()
    prepare(model, LoraConfig(r=4, alpha=8))
    K = 2

    class Tok:  # text_ids' only call; ids within the tiny vocabulary
        def encode(self, text, add_special_tokens=False):
            return [10 + ord(c) % 300 for c in text[:40]]

    anchor = TextAnchor(model, Tok(), K, rows=4, n_tokens=400, window=32)
    assert anchor.ids.shape[0] >= 4 and anchor.real[:, 0].all() and (anchor.ids[:, 0] == 2).all()
    one = anchor.ids[:1, :int(anchor.real[0].sum())]
    torch.testing.assert_close(anchor.targets[0, :one.shape[1]], first_layers(model, one, K)[0])
    with torch.no_grad():
        assert float(anchor.loss()) < 1e-10 and anchor.drift() < 1e-10 and anchor.drift() is None

    g = torch.Generator().manual_seed(0)
    first = {n: m for n, m in lora_modules(model).items() if any(f"layers.{i}." in n for i in range(K))}
    with torch.no_grad():
        for m in first.values():
            m.lora_B["default"].weight.normal_(std=0.2, generator=g)
    with torch.no_grad():
        drifted = float(anchor.loss())
    assert drifted > 1e-3
    params = [q for m in first.values() for q in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        anchor.loss().backward()
        opt.step()
    anchor.drift()
    with torch.no_grad():
        assert float(anchor.loss()) < 0.2 * drifted
        assert min(float(m.lora_B["default"].weight.abs().max()) for m in first.values()) > 1e-2


def test_probe_to_layer_trains_only_the_first_layers_and_anchors_their_text(tmp_path, capsys):
    """bench/mini_probe.py `--to-layer K`: only the adapter of layers below K (and the embedders
    `--train-full` names) gets a gradient, through the later layers as they are; `--anchor-text`
    needs it and an adapter, and a K the checkpoint lacks or one beside `--from-layer` is an
    argument error naming it, before any model loads."""
    import json

    from bench.mini_probe import main, trained_parts
    from unigemma.finetune.loss import hidden_states
    from unigemma.finetune.run import prepare
    from unigemma.inputs import ModelInputs
    from unigemma.lora import LoraConfig

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=5)
    prepare(model, LoraConfig(r=2, alpha=4))
    n = len(model.text.layers)
    assert n > 2
    embedders, adapter = trained_parts(model, 0, "model.embed_audio", to_layer=2)
    assert {id(q) for q in embedders} == {id(q) for q in model.model.embed_audio.parameters()}
    assert adapter and all(q.requires_grad for q in adapter)
    ids, types = prompt(image=True, audio=True)
    inputs = ModelInputs.from_dict({"input_ids": ids, "mm_token_type_ids": types, **media(True, True)})
    hidden_states(model, inputs).square().sum().backward()
    grads = {n_: q.grad for n_, q in model.named_parameters() if "lora_B" in n_}
    below = [n_ for n_ in grads if any(f".layers.{i}." in n_ for i in range(2))]
    assert below and all(grads[n_] is not None for n_ in below)
    assert all(g is None for n_, g in grads.items() if n_ not in below)
    assert all(q.grad is None for q in model.model.embed_vision.parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.model.embed_audio.parameters())

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 7}}))
    base = ["--model", str(tmp_path), "--data", str(tmp_path), "--category", "digit"]
    for argv, says in ((["--to-layer", "7"], "--to-layer 7"), (["--to-layer", "0"], "--to-layer 0"),
                       (["--to-layer", "3", "--from-layer", "2"], "without --from-layer"),
                       (["--anchor-text", "10"], "needs --to-layer K"),
                       (["--to-layer", "3", "--anchor-text", "-1"], "--anchor-text -1.0"),
                       (["--to-layer", "3", "--anchor-text", "10", "--lr", "0"],
                        "needs --to-layer K and an adapter")):
        with pytest.raises(SystemExit):
            main(base + argv)
        assert says in capsys.readouterr().err


def assert_only_first_two_layers_adapted(model):
    """After a side head's backward: layers 0 and 1's adapter got a gradient, no later layer's."""
    grads = {n_: q.grad for n_, q in model.named_parameters() if "lora_B" in n_}
    below = [n_ for n_ in grads if ".layers.0." in n_ or ".layers.1." in n_]
    assert below and all(grads[n_] is not None for n_ in below)
    assert all(g is None for n_, g in grads.items() if n_ not in below)


def test_probe_hear_adds_the_hearing_heads_loss(tmp_path, capsys, monkeypatch):
    """bench/mini_probe.py `--hear W` (`hearing`): the audio probe's head on the first
    `--head-layers` layers, its loss on fresh clips in the wide training voices (the head and
    those layers' adapter get a gradient, the later layers' none), its accuracy on fixed
    held-out-voice clips (the same each time: no training between); `--hear` beside
    `--from-layer`, `--to-layer` or `--lr 0`, a layer count the checkpoint lacks, or a negative
    weight is an argument error naming it, and `--anchor-text` is taken with it."""
    import argparse
    import json

    import numpy as np

    from bench.mini_probe import hearing as make_hearing
    from bench.mini_probe import main
    from bench.mmdata import sounds
    from bench.mmdata.vocab import HELDOUT_VOICES, WIDE_TRAIN_VOICES
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    said = []

    def speak(text, voice, wpm, pitch):  # no espeak-ng needed: a clip whose length depends on the text
        said.append(voice)
        return np.random.default_rng(len(said)).standard_normal(640 * (2 + len(text))).astype(np.float32) * 0.1

    monkeypatch.setattr(sounds, "speak", speak)
    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=4)
    prepare(model, LoraConfig(r=2, alpha=4))
    args = argparse.Namespace(head_layers=2, hear_task="word", batch_size=4, seed=0, eval_n=5)
    hearing = make_hearing(model, args)
    assert len(said) == 5 and all(v in HELDOUT_VOICES for v in said)
    said.clear()
    first = hearing.accuracy()
    assert 0 <= first <= 1 and hearing.accuracy() == first and not said
    loss = hearing.loss()
    assert len(said) == 4 and all(v in WIDE_TRAIN_VOICES for v in said) and torch.isfinite(loss)
    assert any(v not in HELDOUT_VOICES for v in said)
    loss.backward()
    assert all(q.grad is not None for q in hearing.probe.head.parameters())
    assert_only_first_two_layers_adapted(model)

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 7}}))
    base = ["--model", str(tmp_path), "--data", str(tmp_path), "--category", "spoken_word"]
    for argv, says in ((["--hear", "1", "--from-layer", "5"], "--hear 1.0"),
                       (["--hear", "1", "--to-layer", "3"], "no --from-layer / --to-layer"),
                       (["--hear", "1", "--lr", "0"], "--lr above 0"), (["--hear", "-1"], "--hear -1.0"),
                       (["--hear", "1", "--hear-layers", "7"], "--head-layers 7"),
                       (["--see", "1", "--from-layer", "5"], "--see 1.0"), (["--see", "-1"], "--see -1.0"),
                       (["--see", "1", "--hear", "1"], "one head a stage"),
                       (["--see", "1", "--head-layers", "0"], "--head-layers 0"),
                       (["--anchor-text", "10"], "needs --to-layer K and an adapter, or --hear / --see")):
        with pytest.raises(SystemExit):
            main(base + argv)
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):  # taken together: what is named is the missing data
        main(base + ["--hear", "1", "--anchor-text", "10", "--model", str(tmp_path / "none")])
    assert "no config.json" in capsys.readouterr().err


def test_probe_see_adds_the_shape_readers_loss(monkeypatch):
    """bench/mini_probe.py `--see W` (`seeing`): the reader probe's head on the first
    `--head-layers` layers, its loss on fresh one-shape pictures of training pairs and unnamed fills
    (never a held-out pair; the head and those layers' adapter get a gradient, the later layers'
    none), its accuracy on fixed pictures of held-out pairs (the same each time)."""
    import argparse

    from bench import mini_reader_probe
    from bench.mini_probe import seeing
    from bench.mmdata.vocab import SHAPES
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    drawn = []
    real_draw = mini_reader_probe.draw

    def draw(rng, split):
        drawn.append(split)
        return real_draw(rng, split)

    monkeypatch.setattr(mini_reader_probe, "draw", draw)
    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=5)
    model.config.text.sliding_window = 80  # the probe's block is 64 tokens; the tiny window is 5
    prepare(model, LoraConfig(r=2, alpha=4))
    args = argparse.Namespace(head_layers=2, batch_size=6, seed=0, eval_n=5)
    side = seeing(model, args)
    *_, held = side.held
    assert drawn == ["heldout"] * 5 and held.shape == (5,)
    drawn.clear()
    first = side.accuracy()
    assert 0 <= first <= 1 and side.accuracy() == first and not drawn
    loss = side.loss()
    assert len(drawn) == 6 and set(drawn) <= {"train", "free"} and torch.isfinite(loss)
    loss.backward()
    assert all(q.grad is not None for q in side.probe.head.parameters())
    assert_only_first_two_layers_adapted(model)
    assert side.probe(*side.held[:2]).shape == (5, len(SHAPES))


def test_probe_saves_its_stage_at_each_evaluation(tokenizers, tmp_path, monkeypatch, capsys):
    """bench/mini_probe.py `--save DIR`: the adapter and embedders are written at each evaluation
    before the last step (a long stage stopped for time keeps the state it was last measured at),
    and the whole run, DIR/checkpoint included, at the end."""
    import json

    import numpy as np
    import soundfile as sf

    import bench.mini_reader_probe as reader_probe
    from bench.mini_probe import main

    loadable_tiny_mini(tokenizers[0], tmp_path / "ck")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 4), ("heldout", 2)):
        rows = []
        for i in range(n):
            name = f"{split}-{i}.wav"
            sf.write(data / name, 0.1 * np.sin(np.arange(3200) / 16000 * 2 * np.pi * 200 * (i + 1)), 16000)
            rows.append({"kind": "digit", "answer": str(i), "meta": {}, "messages": [
                {"role": "user", "content": [{"type": "audio", "audio": name},
                                             {"type": "text", "text": "Which digit is spoken?"}]},
                {"role": "assistant", "content": str(i)}]})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved, save_stage = [], reader_probe.save_stage

    def recording(model, lora, out, dtype=None):
        saved.append((out, len(capsys.readouterr().out.splitlines())))  # the reports printed since the last
        save_stage(model, lora, out, dtype)

    monkeypatch.setattr(reader_probe, "save_stage", recording)
    out = tmp_path / "stage"
    main(["--model", str(tmp_path / "ck"), "--data", str(data), "--category", "digit", "--own-question",
          "--steps", "4", "--eval-every", "2", "--eval-n", "2", "--batch-size", "2", "--lora-r", "2",
          "--save", str(out)])
    # step 2's evaluation (after the reports of steps 0 and 2), then the end (after step 4's)
    assert saved == [(out, 2), (out, 1)]
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint" / "config.json").is_file()


def test_probe_mix_arguments_are_checked_before_loading(tmp_path, capsys):
    """bench/mini_probe.py: a `--mix` file that is not there, a `--mix-share` outside (0, 1), a
    bad `--mix-drop` or a `--keep-text` outside [0, 1) is an argument error naming it, before any
    model loads."""
    import json

    from bench.mini_probe import main

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3}}))
    (tmp_path / "mix.jsonl").write_text('{"text": "plain English"}\n')
    base = ["--model", str(tmp_path), "--data", str(tmp_path), "--category", "shape"]
    for argv, says in ((["--mix", str(tmp_path / "none.jsonl")], "none.jsonl: not a file"),
                       (["--mix", str(tmp_path / "mix.jsonl"), "--mix-share", "1"], "--mix-share 1.0"),
                       (["--mix-drop", "shape is the (\\w+ one"], "--mix-drop: not a regular expression"),
                       (["--keep-text", "1"], "--keep-text 1.0")):
        with pytest.raises(SystemExit):
            main(base + argv)
        assert says in capsys.readouterr().err


def test_probe_free_shapes_replace_only_the_shape_items(tmp_path, capsys):
    """bench/mini_probe.py `--free-shapes N` beside other categories: the shape items become N
    colour-free pictures made under --data (no named colour in any question), every other
    category's items stay as they were; `--free-start I` takes the generator's pictures from index I;
    without shape among the categories, or --free-start without --free-shapes, it is an argument error."""
    import json

    from bench.mini_probe import main, with_free_shapes

    (tmp_path / "manifest.json").write_text(json.dumps({"image_size": 96}))
    train = [{"category": "colour", "answer": "red", "id": "c0"}, {"category": "count", "answer": "2", "id": "n0"},
             {"category": "shape", "answer": "star", "id": "s0", "meta": {"pairs": [["red", "star"]]}}]
    got = with_free_shapes(train, tmp_path, 5)
    assert got[:2] == train[:2]
    shapes = got[2:]
    assert len(shapes) == 5 and all(r["category"] == "shape" and r["kind"] == "any_shape" for r in shapes)
    for r in shapes:
        asked = r["messages"][0]["content"]
        assert (tmp_path / asked[0]["image"]).is_file()
        assert "pairs" not in r["meta"] and r["answer"] == r["meta"]["shape"]
    later = with_free_shapes(train, tmp_path, 3, start=2)[2:]  # --free-start: the generator's pictures 2, 3, 4
    assert [r["messages"][0]["content"][0]["image"] for r in later] == [
        r["messages"][0]["content"][0]["image"] for r in shapes[2:]]
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3}}))
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--category", "colour,count", "--free-shapes", "4"])
    assert "--category must name shape" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--category", "shape", "--free-start", "4"])
    assert "goes with --free-shapes" in capsys.readouterr().err


def test_probe_mix_drop_takes_out_the_matching_questions_and_keeps_the_media():
    """bench/mini_probe.py `drop_questions`: a matching question goes with its answer; a dropped
    first question hands its picture to the next kept one; a line with none kept is dropped; text
    lines pass as they are."""
    import re

    from bench.mini_probe import drop_questions

    pic = {"type": "image", "image": "media/a.png"}
    line = {"answer": "cross", "messages": [
        {"role": "user", "content": [pic, {"type": "text", "text": "What shape is the gray one?"}]},
        {"role": "assistant", "content": "cross"},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "What shape is the red one?"},
        {"role": "assistant", "content": "star"}]}
    drop = re.compile(r"shape is the \w+ one")
    got = drop_questions(line, drop)
    assert got["messages"] == [
        {"role": "user", "content": [pic, {"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": "1"}]
    assert line["messages"][2]["content"] == "How many shapes are there?"  # the input is left as it was
    assert drop_questions(line, re.compile("shape")) is None
    assert drop_questions(line, re.compile("circle")) == line
    assert drop_questions({"text": "What shape is the gray one?"}, drop) == {"text": "What shape is the gray one?"}


def test_probe_asks_spoken_items_their_own_question_and_takes_several_categories(tmp_path, capsys):
    """bench/mini_probe.py: a spoken digit or word (conversations.py asks nothing of them) is asked
    its own first question, picture kinds their `questions`; --category takes a comma-separated
    list, and a name outside CATEGORIES is an argument error naming it."""
    import argparse
    import json

    from bench.mini_probe import categories, main, one_question

    clip = {"type": "audio", "audio": "media/train/digit/00000.wav"}
    rows = [{"kind": "digit", "meta": {}, "messages": [
                {"role": "user", "content": [clip, {"type": "text", "text": "Which digit is spoken?"}]},
                {"role": "assistant", "content": "6"}]},
            {"kind": "colour", "meta": {"pairs": [["red", "star"]]}, "messages": [
                {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                             {"type": "text", "text": "What colour is it?"}]},
                {"role": "assistant", "content": "red"}]}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    digit = one_question(path, "digit", single=False)
    assert digit == [{"answer": "6", "category": "digit", "messages": [
        {"role": "user", "content": [clip, {"type": "text", "text": "Which digit is spoken?"}]},
        {"role": "assistant", "content": "6"}]}]
    assert [r["answer"] for r in one_question(path, "colour", single=False)] == ["red"]
    assert one_question(path, "spoken_word", single=False) == []
    assert categories("digit, spoken_word") == ("digit", "spoken_word")
    for bad in ("digits", "", "colour,,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            categories(bad)
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path), "--category", "digit,word"])
    assert "'digit,word': each must be one of" in capsys.readouterr().err


def test_probe_own_question_asks_each_item_of_the_kind_its_first_question(tmp_path):
    """bench/mini_probe.py `--own-question`: a beep clip is asked its own phrasing, not `questions`'
    one "How many beeps are there?", and a pitch clip (which `questions` also asks to count) is
    not asked at all; without it both clips are asked the one phrasing."""
    import json

    from bench.mini_probe import one_question

    def clip(kind, question, answer, count):
        return {"kind": kind, "meta": {"count": count, "hz": 440.0}, "messages": [
            {"role": "user", "content": [{"type": "audio", "audio": f"{kind}.wav"},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]}

    rows = [clip("beeps", "Count the beeps. Answer with a number.", "4", 4),
            clip("pitch", "Is the tone high or low?", "low", 2)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    own = one_question(path, "beeps", single=False, own=True)
    assert [(r["messages"][0]["content"][-1]["text"], r["answer"]) for r in own] == [
        ("Count the beeps. Answer with a number.", "4")]
    assert own[0]["messages"][0]["content"][0] == {"type": "audio", "audio": "beeps.wav"}
    plain = one_question(path, "beeps", single=False)
    assert [(r["messages"][0]["content"][-1]["text"], r["answer"]) for r in plain] == [
        ("How many beeps are there?", "4"), ("How many beeps are there?", "2")]
    assert [r["answer"] for r in one_question(path, "pitch", single=False, own=True)] == ["low"]


def test_probe_unnamed_question_keeps_the_picture_and_the_answer():
    """bench/mini_probe.py `unnamed_question`: the same held-out picture and answer, asked without
    the colour the original question named."""
    from bench.mini_probe import unnamed_question

    pic = {"type": "image", "image": "media/heldout/shape/00001.png"}
    r = {"answer": "diamond", "messages": [
        {"role": "user", "content": [pic, {"type": "text", "text": "What shape is the pink one?"}]},
        {"role": "assistant", "content": "diamond"}]}
    got = unnamed_question(r)
    assert got["messages"] == [{"role": "user", "content": [pic, {"type": "text", "text": "What shape is this?"}]},
                               {"role": "assistant", "content": "diamond"}]
    assert r["messages"][0]["content"][1]["text"] == "What shape is the pink one?"


def test_recipe_init_repeats_the_adapter_it_starts_from(tmp_path):
    """bench/mini_train.py --init DIR gives the trainer DIR's adapter rank and alpha, which `--init`
    must repeat: the shipped adapter is not the recipe's r 16 at alpha 32 (it shipped merged at a
    scale, Seventh and Twelfth looks; now joined from staged adapters at scaling 1: bench/mini_join.py,
    Fourteenth look, its largest rank any number since the joins re-factor by SVD, Eighteenth look)."""
    import json

    from bench.mini_train import RECIPE, adapter_shape
    from unigemma.mini import card

    shipped = Path(unigemma.__file__).parent / "mini"
    shape = adapter_shape(shipped)
    assert len(card()["stages"]) >= 2 and shape["lora_alpha"] == shape["lora_r"]  # joined: scaling 1
    assert shape["lora_r"] > RECIPE["lora_r"]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    assert adapter_shape(tmp_path) == {"lora_r": 4, "lora_alpha": 8}


def test_loss_curve_reads_a_resumed_runs_log_once_a_step(tmp_path):
    """A run stopped after step 3 and resumed from its step-2 checkpoint logs step 3 twice: the
    curve (bench/loss_curve.py `read_log`) keeps the later line, the one the run went on from."""
    import json

    from bench.loss_curve import read_log

    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.4}, {"step": 3, "loss": 9.0},
            {"step": 3, "loss": 1.2}, {"step": 4, "loss": 1.1, "eval_loss": 1.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_log(tmp_path / "log.jsonl") == ([2.0, 1.5, 1.2, 1.1], [(2, 1.4), (4, 1.0)])


def test_recipe_init_without_an_adapter_is_refused_before_any_work(tmp_path, capsys):
    """bench/mini_train.py --init DIR without an adapter_config.json: a usage error naming DIR,
    before the data are made (the work directory stays empty)."""
    from bench.mini_train import main

    with pytest.raises(SystemExit) as e:
        main(["--work", str(tmp_path / "work"), "--init", str(tmp_path / "nowhere"), "--steps", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--init {tmp_path / 'nowhere'}: no adapter_config.json" in err
    assert not (tmp_path / "work").exists()


def test_recipe_init_alpha_goes_on_from_the_same_function(tmp_path, capsys):
    """bench/mini_train.py --init-alpha A (`rescaled`): the run's adapter at lora_alpha A with every
    lora_B scaled by old alpha / A merges to the same decoder, embedders and a shipped card copied; without --init,
    or A <= 0, a usage error before any work."""
    import json

    from safetensors.torch import load_file

    from bench.mini_train import main, rescaled
    from unigemma.weights.mini import trained_checkpoint

    base, run = _tiny_run(tmp_path)
    (run / "card.json").write_text('{"trained_steps": 7}')  # as a shipped start has
    alpha = json.loads((run / "adapter_config.json").read_text())["lora_alpha"]
    moved = rescaled(run, 4 * alpha, tmp_path / "rescaled")
    assert (moved / "card.json").read_text() == '{"trained_steps": 7}'
    assert json.loads((moved / "adapter_config.json").read_text())["lora_alpha"] == 4 * alpha
    a, b = load_file(run / "adapter_model.safetensors"), load_file(moved / "adapter_model.safetensors")
    assert any(".lora_B." in k and a[k].abs().max() > 0 and torch.allclose(b[k], a[k] / 4) for k in a)
    want = load_file(trained_checkpoint(run, tmp_path / "want", base=base) / "model.safetensors")
    got = load_file(trained_checkpoint(moved, tmp_path / "got", base=base) / "model.safetensors")
    assert want.keys() == got.keys()
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-6), name
    for bad in (["--init-alpha", "32"], ["--init", str(run), "--init-alpha", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--work", str(tmp_path / "work"), *bad, "--steps", "1"])
        assert e.value.code == 2 and "--init-alpha" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_join_stacks_staged_adapters_into_one_that_merges_the_same(tmp_path, capsys):
    """bench/mini_join.py: a shipped-like adapter and a later stage's (another alpha, zero on some
    modules, as a probe's untrained layers) joined into one adapter at scaling 1 assemble to the
    checkpoint the stages make merged one after the other; the zero parts add no rank (those modules
    keep the first's, named in rank_pattern / alpha_pattern), the card keeps the first's steps and
    lists the stages (a joined adapter joined again keeps its list); one --adapter padded with zero
    rank columns (as the r-96 adapter shipped before) is compacted to the same merged weights."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from bench.mini_join import main
    from unigemma.finetune.full import load_full_weights, save_full_weights
    from unigemma.lora import load_adapter
    from unigemma.lora.inject import merge
    from unigemma.weights.mini import build_mini_model, trained_checkpoint

    base, run = _tiny_run(tmp_path)
    (run / "card.json").write_text('{"trained_steps": 7, "adapter_scale": 0.6}')
    later = tmp_path / "later"
    later.mkdir()
    tensors = {k: v.clone() for k, v in load_file(run / "adapter_model.safetensors").items()}
    zeroed = [k for k in tensors if ".lora_B." in k and ".layers.0." in k]
    g = torch.Generator().manual_seed(1)
    for k in tensors:
        tensors[k] = torch.zeros_like(tensors[k]) if k in zeroed else torch.randn(tensors[k].shape, generator=g)
    assert zeroed and len(zeroed) < len([k for k in tensors if ".lora_B." in k])
    save_file(tensors, str(later / "adapter_model.safetensors"))
    cfg = json.loads((run / "adapter_config.json").read_text())
    (later / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 3.0}))
    other, _ = build_mini_model(base, seed=9)  # the later stage's embedders
    save_full_weights({n: other.get_submodule(n) for n in ("model.embed_vision", "model.embed_audio")}, later)

    main(["--adapter", str(run), "--adapter", str(later), "--out", str(tmp_path / "joined")])
    line = json.loads(capsys.readouterr().out)
    joined = tmp_path / "joined"
    jcfg = json.loads((joined / "adapter_config.json").read_text())
    assert line["r"] == jcfg["r"] == jcfg["lora_alpha"] == 2 * cfg["r"] and line["largest_difference"] < 1e-5
    card = json.loads((joined / "card.json").read_text())
    assert card["trained_steps"] == 7 and "adapter_scale" not in card and len(card["stages"]) == 2
    assert card["stages"][1]["modules"] < card["stages"][0]["modules"]
    j = load_file(joined / "adapter_model.safetensors")
    assert all(j[k].shape[1] == cfg["r"] for k in zeroed)  # the first stage's part only, no padding
    pattern = {k.removeprefix("base_model.model.").removesuffix(".lora_B.weight").replace(".", "\\."): cfg["r"]
               for k in zeroed}
    assert jcfg["rank_pattern"] == pattern and jcfg["alpha_pattern"] == {k: float(v) for k, v in pattern.items()}
    assert line["ranks"] == {str(cfg["r"]): len(zeroed), str(2 * cfg["r"]): len(j) // 2 - len(zeroed)}

    staged, cfg_dict = build_mini_model(base)  # the stages merged one after the other
    for stage in (run, later):
        load_adapter(staged, stage)
        merge(staged)
    load_full_weights(staged, later)
    want = load_file(save_checkpoint(staged.eval(), cfg_dict, tmp_path / "want") / "model.safetensors")
    got = load_file(trained_checkpoint(joined, tmp_path / "got", base=base) / "model.safetensors")
    assert want.keys() == got.keys()
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-5), name
    main(["--adapter", str(run), "--adapter", str(later), "--out", str(tmp_path / "half"), "--dtype", "bfloat16",
          "--embedders-dtype", "bfloat16"])
    line = json.loads(capsys.readouterr().out)
    half = load_file(tmp_path / "half" / "adapter_model.safetensors")
    assert half.keys() == j.keys() and all(torch.equal(half[k], j[k].bfloat16()) for k in j)  # the same, rounded
    assert line["largest_difference"] < 1e-5 < line["stored_difference"] < 1e-1
    full, half_full = (load_file(d / "full_weights.safetensors") for d in (joined, tmp_path / "half"))
    assert full.keys() == half_full.keys() and all(torch.equal(half_full[k], full[k].bfloat16()) for k in full)
    loaded, _ = build_mini_model(base)
    load_full_weights(loaded, tmp_path / "half")  # copied into the float32 model
    assert all(torch.equal(loaded.state_dict()[k], full[k].bfloat16().float()) for k in full)
    main(["--adapter", str(joined), "--adapter", str(later), "--out", str(tmp_path / "again")])
    capsys.readouterr()  # a joined adapter joined again keeps its stages and appends the new one
    again = json.loads((tmp_path / "again" / "card.json").read_text())["stages"]
    assert again[:2] == card["stages"] and again[2]["adapter"] == str(later) and len(again) == 3

    padded = tmp_path / "padded"  # the old join's layout: every module at the largest rank, zeros after
    padded.mkdir()
    r2 = 2 * cfg["r"]
    save_file({k: (torch.cat([v, v.new_zeros(r2 - v.shape[0], v.shape[1])]) if ".lora_A." in k else
                   torch.cat([v, v.new_zeros(v.shape[0], r2 - v.shape[1])], 1)) for k, v in j.items()},
              str(padded / "adapter_model.safetensors"))
    (padded / "adapter_config.json").write_text(json.dumps({**jcfg, "rank_pattern": {}, "alpha_pattern": {}}))
    for f in ("full_weights.safetensors", "card.json"):
        (padded / f).write_bytes((joined / f).read_bytes())
    main(["--adapter", str(padded), "--out", str(tmp_path / "compact")])
    line = json.loads(capsys.readouterr().out)
    compact = tmp_path / "compact"
    assert line["r"] == r2 and line["largest_difference"] < 1e-5 and line["stages"][0]["r"] == r2
    assert json.loads((compact / "adapter_config.json").read_text())["rank_pattern"] == pattern
    assert json.loads((compact / "card.json").read_text())["stages"] == card["stages"]
    assert (compact / "adapter_model.safetensors").stat().st_size < (padded / "adapter_model.safetensors").stat().st_size
    got = load_file(trained_checkpoint(compact, tmp_path / "got-compact", base=base) / "model.safetensors")
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-5), name
    from bench.mini_train import adapter_shape, padded  # the recipe's --init takes one rank again

    halved = tmp_path / "halved"  # the modules with fewer ranks at twice the scaling, their B halved
    shutil.copytree(compact, halved)
    ccfg = json.loads((compact / "adapter_config.json").read_text())
    (halved / "adapter_config.json").write_text(json.dumps({**ccfg, "alpha_pattern": {k: 2.0 * v for k, v in pattern.items()}}))
    c = load_file(compact / "adapter_model.safetensors")
    save_file({k: v / 2 if k in zeroed else v for k, v in c.items()}, str(halved / "adapter_model.safetensors"))
    repadded = padded(halved, tmp_path / "repadded")
    assert adapter_shape(repadded) == {"lora_r": r2, "lora_alpha": r2}
    assert all(t.shape[0 if ".lora_A." in k else 1] == r2 for k, t in load_file(repadded / "adapter_model.safetensors").items())
    got = load_file(trained_checkpoint(repadded, tmp_path / "got-repadded", base=base) / "model.safetensors")
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-5), name


def _join_twice(tmp_path, capsys, option: str, value: str, bad: tuple[str, ...]):
    """bench/mini_join.py on a tiny stage and its copy with `option value`: (the stage's scaling, its
    tensors, the joined tensors, the joined card's stages), after checking each of `bad` is a usage
    error naming `option` that writes nothing."""
    import json
    import shutil

    from safetensors.torch import load_file

    from bench.mini_join import main

    _, run = _tiny_run(tmp_path)
    (run / "card.json").write_text('{"trained_steps": 7}')
    shutil.copytree(run, tmp_path / "twin")
    adapters = ["--adapter", str(run), "--adapter", str(tmp_path / "twin")]
    main([*adapters, option, value, "--out", str(tmp_path / "joined")])
    capsys.readouterr()
    for wrong in bad:
        with pytest.raises(SystemExit) as e:
            main([*adapters, option, wrong, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    cfg = json.loads((run / "adapter_config.json").read_text())
    one, joined = (load_file(d / "adapter_model.safetensors") for d in (run, tmp_path / "joined"))
    stages = json.loads((tmp_path / "joined" / "card.json").read_text())["stages"]
    return cfg["lora_alpha"] / cfg["r"], one, joined, stages


def test_join_layers_keeps_each_stages_span(tmp_path, capsys):
    """bench/mini_join.py --layers: a stage joined twice, its first layer kept from one copy and the
    rest from the other, merges as that stage once (module by module in float32, no layer twice or
    missing); each span is kept in the card's stages; a count that is not one per --adapter, or a
    span that is neither all nor LO-HI, is a usage error naming --layers."""
    from bench.mini_join import layer_of

    s, one, joined, stages = _join_twice(tmp_path, capsys, "--layers", "0-0,1-99", ("0-0", "0-0,x", "0-0,3-1"))
    assert {layer_of(k) for k in one} == set(range(7))  # the tiny model's: 0 from one copy, 1-6 the other
    for key in (k for k in one if k.endswith(".lora_A.weight")):
        b_key = key.replace(".lora_A.", ".lora_B.")
        assert torch.allclose(joined[b_key] @ joined[key], s * one[b_key] @ one[key], atol=1e-6), key
    assert [st["layers"] for st in stages] == ["0-0", "1-99"]


def test_join_strength_scales_each_stage(tmp_path, capsys):
    """bench/mini_join.py --strength: a stage joined twice, at 1 and 0.5, merges as that stage's
    B A times 1.5 (checked module by module in float32); the strengths are kept in the card's
    stages; a count that is not one per --adapter, or not numbers, is a usage error naming it."""
    s, one, joined, stages = _join_twice(tmp_path, capsys, "--strength", "1,0.5", ("1", "1,x"))
    for key in (k for k in one if k.endswith(".lora_A.weight")):
        b_key = key.replace(".lora_A.", ".lora_B.")
        want = 1.5 * s * one[b_key] @ one[key]
        assert torch.allclose(joined[b_key] @ joined[key], want, atol=1e-6), key
    assert "strength" not in stages[0] and stages[1]["strength"] == 0.5


def test_join_energy_refactors_each_module_by_svd(tmp_path, capsys):
    """bench/mini_join.py --energy F: two stages that are the same adapter join to r 4 of true rank
    2, which F = 1 finds (r 2, merging to the stacked join's weights); F = 0.5 keeps fewer ranks, each
    module's relative error the Eckart-Young sqrt(1 - kept) <= sqrt(0.5), the largest one printed;
    F outside (0, 1] is a usage error."""
    import json
    import shutil

    from safetensors.torch import load_file

    from bench.mini_join import main
    from unigemma.weights.mini import trained_checkpoint

    base, run = _tiny_run(tmp_path)
    shutil.copytree(run, tmp_path / "twin")
    outs = {}
    for name, extra in (("stacked", []), ("svd", ["--energy", "1"]), ("low", ["--energy", "0.5"])):
        main(["--adapter", str(run), "--adapter", str(tmp_path / "twin"), "--out", str(tmp_path / name), *extra])
        outs[name] = json.loads(capsys.readouterr().out)
    modules = len(load_file(run / "adapter_model.safetensors")) // 2
    assert outs["stacked"]["ranks"] == {"4": modules} and outs["svd"]["ranks"] == {"2": modules}
    assert outs["svd"]["largest_relative_error"] < 1e-6
    want = load_file(trained_checkpoint(tmp_path / "stacked", tmp_path / "want", base=base) / "model.safetensors")
    got = load_file(trained_checkpoint(tmp_path / "svd", tmp_path / "got", base=base) / "model.safetensors")
    for name, w in want.items():
        assert torch.allclose(got[name], w, atol=1e-5), name

    stacked, low = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("stacked", "low"))
    errors = []
    for key in (k for k in low if k.endswith(".lora_A.weight")):
        b_key = key.replace(".lora_A.", ".lora_B.")
        full, approx = stacked[b_key] @ stacked[key], low[b_key] @ low[key]
        assert low[key].shape[0] <= 2
        errors.append(float((full - approx).norm() / full.norm()))
    assert outs["low"]["r"] <= 2 and sum(outs["low"]["ranks"].values()) == modules
    assert max(errors) == pytest.approx(outs["low"]["largest_relative_error"], abs=1e-5) and max(errors) <= 0.5 ** 0.5
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit) as e:
            main(["--adapter", str(run), "--out", str(tmp_path / "bad"), "--energy", bad])
        assert e.value.code == 2 and "--energy" in capsys.readouterr().err


def test_audio_probe_hears_training_voices_only_and_padding_changes_nothing(monkeypatch):
    """bench/mini_audio_probe.py: its training clips are said in training voices only, its
    held-out ones in held-out voices only; a clip's logits are the same alone and padded in a
    batch with a longer one (audio is causal and the pooling skips the padding); a beeps clip's
    label is its count, at its split's pitches; only the first `layers` layers' adapter and the
    audio embedder get a gradient."""
    import random

    import numpy as np

    from bench.mini_audio_probe import Hearer, TASKS, batch
    from bench.mmdata import sounds
    from bench.mmdata.items import Voicing
    from bench.mmdata.vocab import HELDOUT_VOICES, HIGH_HZ, LOW_HZ, TRAIN_VOICES, WIDE_TRAIN_VOICES, tone_grid
    from unigemma.finetune.run import prepare
    from unigemma.lora import LoraConfig

    said = []

    def speak(text, voice, wpm, pitch):  # no espeak-ng needed: a clip whose length depends on the text
        said.append((text, voice))
        return np.random.default_rng(len(said)).standard_normal(640 * (2 + len(text))).astype(np.float32) * 0.1

    monkeypatch.setattr(sounds, "speak", speak)
    frames, real, ys = batch(random.Random(0), np.random.default_rng(0), "digit", "train", 6)
    assert frames.shape[0] == 6 and frames.shape[-1] == 640 and real.shape == frames.shape[:2]
    assert all(TASKS["digit"][y] == text for y, (text, _) in zip(ys.tolist(), said))
    assert all(v in TRAIN_VOICES for _, v in said) and real.sum(1).min() < real.sum(1).max()
    said.clear()
    batch(random.Random(1), np.random.default_rng(1), "word", "heldout", 6)
    assert all(v in HELDOUT_VOICES for _, v in said) and len(said) == 6
    said.clear()
    sped, real_speed = [], sounds.change_speed  # --wide-voices --speed-perturb: the pool and the speeds reach the clips
    monkeypatch.setattr(sounds, "change_speed", lambda wave, speed: sped.append(speed) or real_speed(wave, speed))
    batch(random.Random(4), np.random.default_rng(4), "word", "train", 8, Voicing(wide=True, speed=(0.9, 1.1)))
    assert all(v in WIDE_TRAIN_VOICES for _, v in said) and len(sped) == 8 and all(0.9 <= x <= 1.1 for x in sped)
    said.clear()
    _, _, ys = batch(random.Random(2), np.random.default_rng(2), "both", "train", 40)
    assert [TASKS["both"][y] for y in ys.tolist()] == [text for text, _ in said]
    assert 10 <= int((ys < len(TASKS["digit"])).sum()) <= 30  # about half digits, not 10 in 112
    beeped, real_beeps = [], sounds.beeps
    monkeypatch.setattr(sounds, "beeps", lambda n, hz, rng: beeped.append((n, hz)) or real_beeps(n, hz, rng))
    for split in ("train", "heldout"):  # the label is how many beeps sound; the split's pitches only
        beeped.clear()
        _, _, ys = batch(random.Random(3), np.random.default_rng(3), "beeps", split, 12)
        assert [int(TASKS["beeps"][y]) for y in ys.tolist()] == [n for n, _ in beeped] and len(set(ys.tolist())) > 2
        assert all(hz in tone_grid(split, HIGH_HZ) + tone_grid(split, LOW_HZ) for _, hz in beeped)

    model = mini.UnigemmaMini(ModelConfig.from_dict(mini.tiny_config()))
    randomize_reference(model, seed=3)
    prepare(model, LoraConfig(r=2, alpha=4))
    for p in model.model.embed_audio.parameters():
        p.requires_grad_(True)
    hearer = Hearer(model, layers=2, classes=10).eval()  # eval: the head's running statistics, per clip
    both = hearer(frames, real)
    short = int(real.sum(1).argmin())
    alone = hearer(frames[short:short + 1, :int(real[short].sum())], real[short:short + 1, :int(real[short].sum())])
    assert torch.allclose(both[short], alone[0], atol=1e-5)
    hearer.train()
    hearer(frames, real).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert all(g is not None for n, g in grads.items() if ".layers.0." in n or ".layers.1." in n)
    assert all(g is None for n, g in grads.items() if ".layers.2." in n)
    assert model.model.embed_audio.embedding_projection.weight.grad is not None


def test_probe_training_loop_steps_projects_and_reports():
    """bench/mini_reader_probe.py `train` (both probes' loop): every step is followed by the
    keep-text hook, the mean loss is reported at step 0 (None) and every `every` steps, and a
    learnable batch's loss falls."""
    from bench.mini_reader_probe import train

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    probe = torch.nn.Linear(4, 2)
    hooks, reports = [], []
    train(probe, lambda: (x, y), torch.optim.SGD(probe.parameters(), lr=0.5), lambda: hooks.append(1), 30, 10,
          lambda step, loss: reports.append((step, loss)))
    assert len(hooks) == 30 and [s for s, _ in reports] == [0, 10, 20, 30] and reports[0][1] is None
    assert reports[-1][1] < reports[1][1] < 0.7
