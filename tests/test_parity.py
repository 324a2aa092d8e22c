"""unigemma's logits against transformers 5.23 on the same tiny random checkpoints.

Each case prints its max abs logit difference (run with -s to see them). Float32 cases must
agree within 1e-4; every real (non-padding) position is compared.
"""

import pytest
import torch
from reference import F, S, Shape, audio_frames, load_reference, patches, sliding_masks, write_checkpoint

import unigemma

TOL = 1e-4


def build_prompt(shape: Shape, segments, g: torch.Generator):
    """segments: ("text", n) | ("image", n) | ("audio", n) | ("frame", n) → ids, mm_token_type_ids."""
    ids, types = [2], [0]  # <bos>
    t = shape.ids
    for kind, n in segments:
        if kind == "text":
            ids += torch.randint(3, 900, (n,), generator=g).tolist()
            types += [0] * n
        elif kind in ("image", "frame"):
            tok, typ = (t["image_token_id"], 1) if kind == "image" else (t["video_token_id"], 2)
            ids += [t["boi_token_id"]] + [tok] * n + [t["eoi_token_id"]]
            types += [0] + [typ] * n + [0]
        elif kind == "audio":
            ids += [t["boa_token_id"]] + [t["audio_token_id"]] * n + [t["eoa_token_index"]]
            types += [0] + [3] * n + [0]
    return torch.tensor([ids]), torch.tensor([types])


def run_both(ckpt_root, shape, ids, types=None, mask=None, block_mask="all", **media):
    path = write_checkpoint(shape, ckpt_root)
    ref = load_reference(path)
    ours = unigemma.load(path, dtype="float32", block_mask=block_mask)
    kw = dict(media)
    hf_kw = dict(media)
    if "pixel_values_videos" in hf_kw:  # the reference takes frames flattened plus counts per video
        v = hf_kw["pixel_values_videos"]
        hf_kw["pixel_values_videos"] = v.flatten(0, 1)
        hf_kw["video_position_ids"] = hf_kw["video_position_ids"].flatten(0, 1)
        hf_kw["num_frames_per_video"] = torch.tensor([v.shape[1]] * v.shape[0])
    hf_mask = mask
    if block_mask == "sliding" and types is not None:
        hf_mask = sliding_masks(ref, ids, mask, types)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=hf_mask, mm_token_type_ids=types, **hf_kw).logits
    got = ours.logits(ids, attention_mask=mask, mm_token_type_ids=types, **kw)
    real = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    return (want - got).abs()[real].max().item(), want, got


def report(name, diff):
    print(f"\n[parity] {name}: max abs logit diff {diff:.3e}")


SHAPES = {
    "kv-shared": Shape(),
    "kv-separate": Shape(k_eq_v=False, window=5, seed=1),
    "odd-window-text-only": Shape(vision=False, audio=False, window=3, layers=(S, S, F, S, S, F), seed=2),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_text_only(ckpt_root, name):
    g = torch.Generator().manual_seed(10)
    shape = SHAPES[name]
    ids, _ = build_prompt(shape, [("text", 30)], g)
    diff, *_ = run_both(ckpt_root, shape, ids)
    report(f"text {name}", diff)
    assert diff <= TOL


def test_text_only_checkpoint_layout(ckpt_root):
    """Gemma4UnifiedForCausalLM saves `model.*` keys (no language_model prefix)."""
    g = torch.Generator().manual_seed(11)
    shape = Shape(text_only_class=True, vision=False, audio=False, seed=3)
    ids, _ = build_prompt(shape, [("text", 25)], g)
    diff, *_ = run_both(ckpt_root, shape, ids)
    report("text-only class", diff)
    assert diff <= TOL


def test_sequence_three_windows_long(ckpt_root):
    g = torch.Generator().manual_seed(12)
    shape = Shape(window=9, seed=4)
    ids, _ = build_prompt(shape, [("text", 3 * 9 + 5)], g)
    diff, *_ = run_both(ckpt_root, shape, ids)
    report("3x window", diff)
    assert diff <= TOL


@pytest.mark.parametrize("block_mask", ["all", "sliding"])
def test_image(ckpt_root, block_mask):
    g = torch.Generator().manual_seed(13)
    shape = Shape()
    pv, pos = patches([(3, 4)], 16, g)  # 12 real patches, 4 padding rows; block longer than the window
    ids, types = build_prompt(shape, [("text", 5), ("image", 12), ("text", 6)], g)
    diff, *_ = run_both(ckpt_root, shape, ids, types, block_mask=block_mask, pixel_values=pv, image_position_ids=pos)
    report(f"image block_mask={block_mask}", diff)
    assert diff <= TOL


def test_block_mask_compositions_differ(ckpt_root):
    """The option changes something: full layers see the block bidirectionally only under "all"."""
    g = torch.Generator().manual_seed(13)
    shape = Shape()
    pv, pos = patches([(2, 2)], 4, g)
    ids, types = build_prompt(shape, [("text", 3), ("image", 4), ("text", 3)], g)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    a = model.logits(ids, mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos, block_mask="all")
    s = model.logits(ids, mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos, block_mask="sliding")
    assert (a - s).abs().max() > 1e-3
    assert torch.equal(a[0, :5], s[0, :5])  # before the image nothing differs


def test_audio(ckpt_root):
    g = torch.Generator().manual_seed(14)
    shape = Shape()
    feats, fmask = audio_frames([7, 4], g)  # two clips, the second padded
    ids, types = build_prompt(shape, [("text", 4), ("audio", 7), ("text", 3), ("audio", 4), ("text", 2)], g)
    diff, *_ = run_both(ckpt_root, shape, ids, types, input_features=feats, input_features_mask=fmask)
    report("audio", diff)
    assert diff <= TOL


@pytest.mark.parametrize("block_mask", ["all", "sliding"])
def test_interleaved_image_audio_text(ckpt_root, block_mask):
    g = torch.Generator().manual_seed(15)
    shape = Shape(vocab=262144, window=11, seed=5)  # real special-token ids
    pv, pos = patches([(2, 3), (3, 3)], 9, g)
    feats, fmask = audio_frames([5], g)
    ids, types = build_prompt(shape, [("text", 4), ("image", 6), ("text", 3), ("audio", 5), ("text", 2),
                                      ("image", 9), ("text", 4)], g)
    diff, *_ = run_both(ckpt_root, shape, ids, types, block_mask=block_mask, pixel_values=pv, image_position_ids=pos,
                        input_features=feats, input_features_mask=fmask)
    report(f"image+audio+text block_mask={block_mask}", diff)
    assert diff <= TOL


@pytest.mark.parametrize("block_mask", ["all", "sliding"])
def test_video_frames(ckpt_root, block_mask):
    g = torch.Generator().manual_seed(16)
    shape = Shape()
    pv, pos = patches([(2, 2), (2, 2), (1, 3)], 6, g)
    ids, types = build_prompt(shape, [("text", 3), ("frame", 4), ("text", 2), ("frame", 4), ("text", 2),
                                      ("frame", 3), ("text", 3)], g)
    diff, *_ = run_both(ckpt_root, shape, ids, types, block_mask=block_mask,
                        pixel_values_videos=pv[None], video_position_ids=pos[None])
    report(f"video block_mask={block_mask}", diff)
    assert diff <= TOL


def test_left_padded_batch(ckpt_root):
    g = torch.Generator().manual_seed(17)
    shape = Shape()
    rows = [build_prompt(shape, [("text", n)], g)[0][0] for n in (20, 9, 14)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    diff, _, got = run_both(ckpt_root, shape, ids, mask=mask)
    report("left-padded batch of 3", diff)
    assert diff <= TOL
    # and each row equals the row run alone (RoPE is relative: only rounding differs)
    model = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    for i, r in enumerate(rows):
        alone = model.logits(r[None])[0]
        assert (alone - got[i, L - len(r):]).abs().max() < TOL


def test_bfloat16(ckpt_root):
    """bf16 against the reference run in bf16, and against our float32.

    Tolerance. Against the bf16 reference: both run the same ops in the same order in the same
    dtype, so we allow only accumulation-order noise: max diff ≤ 0.25 (about one bf16 step,
    2^-8 relative, at logits of magnitude ~20 through 4 layers) and the same argmax at ≥ 95%
    of positions. Against float32: bf16 rounding compounds through the layers; we bound the
    mean abs diff by 0.25 (≈ 6% of the logit std of ~4 here) and the KL divergence of the
    next-token distributions by 0.05 nats.
    """
    g = torch.Generator().manual_seed(18)
    shape = Shape()
    pv, pos = patches([(3, 3)], 9, g)
    ids, types = build_prompt(shape, [("text", 6), ("image", 9), ("text", 8)], g)
    path = write_checkpoint(shape, ckpt_root)
    ref = load_reference(path, dtype=torch.bfloat16)
    ours = unigemma.load(path, dtype="bfloat16", block_mask="all")
    media = dict(mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos)
    with torch.no_grad():
        want = ref(input_ids=ids, **media).logits
    got = ours.logits(ids, **media)
    assert got.dtype == torch.bfloat16
    diff = (want.float() - got.float()).abs().max().item()
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    f32 = unigemma.load(path, dtype="float32", block_mask="all").logits(ids, **media)
    mean32 = (f32 - got.float()).abs().mean().item()
    p32 = torch.log_softmax(f32, -1)
    kl = (p32.exp() * (p32 - torch.log_softmax(got.float(), -1))).sum(-1).mean().item()
    report(f"bf16 vs bf16 reference (argmax agreement {agree:.3f}); vs our fp32: mean {mean32:.3f}, KL {kl:.4f}", diff)
    assert diff <= 0.25 and agree >= 0.95
    assert mean32 <= 0.25 and kl <= 0.05
