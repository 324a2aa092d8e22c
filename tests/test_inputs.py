"""Bad model inputs fail with an InputError that names what is wrong."""

import pytest
import torch
from reference import S, F, Shape, audio_frames, patches, write_checkpoint
from test_parity import build_prompt

import unigemma
from unigemma.errors import InputError
from unigemma.inputs import (MEDIA_KEYS, MM_TYPE, VISION_TYPES, AudioInputs, ImageInputs, ModelInputs, VideoInputs,
                             chunk_bounds)
from unigemma.models import masks
from unigemma.processing import chat


@pytest.fixture(scope="module")
def model(ckpt_root):
    return unigemma.load_model(write_checkpoint(Shape(), ckpt_root), dtype="float32")


def test_placeholder_count_mismatch(model):
    g = torch.Generator().manual_seed(40)
    pv, pos = patches([(2, 2)], 4, g)
    ids, types = build_prompt(Shape(), [("text", 3), ("image", 5)], g)
    with pytest.raises(InputError, match="5 image placeholder tokens but the inputs give 4 image soft tokens"):
        model.logits(ids, mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos)


def test_placeholders_without_media(model):
    ids, _ = build_prompt(Shape(), [("audio", 3)], torch.Generator())
    with pytest.raises(InputError, match="3 audio placeholder tokens but no audio inputs"):
        model.logits(ids)


def test_media_shapes(model):
    g = torch.Generator().manual_seed(41)
    ids, _ = build_prompt(Shape(), [("image", 4)], g)
    pv, pos = patches([(2, 2)], 4, g)
    with pytest.raises(InputError, match="without image_position_ids"):
        model.logits(ids, pixel_values=pv)
    with pytest.raises(InputError, match="expected"):
        model.logits(ids, pixel_values=pv[..., :100], image_position_ids=pos)
    feats, fmask = audio_frames([3], g)
    ids, _ = build_prompt(Shape(), [("audio", 3)], g)
    with pytest.raises(InputError, match="input_features_mask"):
        model.logits(ids, input_features=feats, input_features_mask=fmask[:, :2])


def test_ids(model):
    with pytest.raises(InputError, match="outside the vocabulary of 1024"):
        model.logits(torch.tensor([[5, 1024]]))
    with pytest.raises(InputError, match="integer token ids"):
        model.logits(torch.rand(1, 4))
    with pytest.raises(InputError, match="empty"):
        model.logits(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="attention_mask"):
        model.logits(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))


def test_media_for_a_text_only_checkpoint(ckpt_root):
    shape = Shape(vision=False, audio=False, layers=(S, F), seed=6)
    text_only = unigemma.load_model(write_checkpoint(shape, ckpt_root), dtype="float32")
    g = torch.Generator().manual_seed(42)
    pv, pos = patches([(1, 2)], 2, g)
    ids, types = build_prompt(shape, [("image", 2)], g)
    with pytest.raises(InputError, match="no vision embedder"):
        text_only.logits(ids, mm_token_type_ids=types, pixel_values=pv, image_position_ids=pos)
    # the text path works with no media inputs at all
    assert text_only.logits(ids[:, :1]).shape == (1, 1, 1024)


# --- ModelInputs: the typed processor -> model boundary -----------------------------------
def mixed_inputs(shape=Shape(), seed=43):
    """Two images, one audio clip and one two-frame video between text, as the processor lays them out."""
    g = torch.Generator().manual_seed(seed)
    pv, pos = patches([(2, 2), (1, 2)], 4, g)
    vpv, vpos = patches([(2, 2), (2, 2)], 4, g)
    feats, fmask = audio_frames([3], g)
    ids, types = build_prompt(shape, [("text", 3), ("image", 4), ("text", 2), ("audio", 3), ("text", 2),
                                      ("frame", 4), ("frame", 4), ("text", 2), ("image", 2), ("text", 1)], g)
    return ModelInputs(ids, torch.ones_like(ids), types, image=ImageInputs(pv, pos),
                       audio=AudioInputs(feats, fmask), video=VideoInputs(vpv, vpos, torch.tensor([2])))


def test_a_dict_view_with_the_processor_keys():
    x = mixed_inputs()
    assert list(x) == ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids",
                       "input_features", "input_features_mask", "pixel_values_videos", "video_position_ids",
                       "num_frames_per_video"]
    assert x["pixel_values"] is x.image.pixel_values and "num_frames_per_video" in x and len(x) == 10
    # the model takes every key but num_frames_per_video (transformers' model needs it)
    assert set(x.model_kwargs()) == set(x) - {"num_frames_per_video"}
    assert set(x.media()) == set(MEDIA_KEYS) and "input_ids" not in x.media()
    back = ModelInputs.from_dict({**dict(x), "num_soft_tokens_per_video": [8]})  # unknown keys are dropped
    assert list(back) == list(x) and back.digest() == x.digest()
    text = ModelInputs.coerce({"input_ids": x.input_ids, "attention_mask": None})
    assert list(text) == ["input_ids"] and text.get("attention_mask") is None and text.media() == {}
    assert ModelInputs.coerce(x) is x
    with pytest.raises(InputError, match="input_ids"):
        ModelInputs.from_dict({"pixel_values": x.image.pixel_values})


def test_media_type_codes_are_defined_once():
    assert masks.VISION_TYPES is VISION_TYPES and VISION_TYPES == (MM_TYPE["image"], MM_TYPE["video"])
    assert chat.MM_TYPE is MM_TYPE


def test_digests_see_every_item():
    x = mixed_inputs()
    items = x.item_digests()
    assert [len(items[k]) for k in ("image", "video", "audio")] == [2, 2, 1]
    assert len({d for ds in items.values() for d in ds}) == 5
    assert x.digest() == mixed_inputs().digest() and x.digest() != mixed_inputs(seed=44).digest()
    moved = ModelInputs.from_dict({**dict(x), "video_position_ids": x.video.position_ids.flip(-1)})
    assert moved.digest() != x.digest() and moved.item_digests() == items  # positions are not items


def test_token_keys_tell_same_sized_images_apart():
    I, A = 7, 8  # placeholder ids
    ids = torch.tensor([[2, 5, I, I, 6, I, I, 6, A, 9]])
    pv = torch.rand(2, 3, 4)
    x = ModelInputs(ids, image=ImageInputs(pv, None), audio=AudioInputs(torch.rand(1, 1, 640), None))
    d = x.item_digests()
    assert x.token_keys({"image": I, "audio": A, "video": 99}) == [
        2, 5, (I, d["image"][0]), (I, d["image"][0]), 6, (I, d["image"][1]), (I, d["image"][1]), 6,
        (A, d["audio"][0]), 9]
    same = ModelInputs(ids, image=ImageInputs(pv[[1, 1]], None))
    keys = same.token_keys({"image": I})
    assert keys[2] == keys[5] != x.token_keys({"image": I})[2]
    assert ModelInputs(ids).token_keys({"image": I})[2] == (I, None)  # no media: placeholders key on None


def test_chunks_never_cut_a_vision_block():
    x = mixed_inputs()
    S = x.input_ids.shape[1]
    for chunk in (1, 3, 5, 64):
        bounds = x.chunks(2, chunk)
        assert bounds == chunk_bounds(x.mm_token_type_ids, 2, S, chunk)
        for a, b in bounds:
            x.slice(a, b)  # raises if a block were cut


def test_slice_embeds_as_the_whole(model):
    """Every token range that keeps vision blocks whole embeds exactly as that range of the
    whole prompt's embedding: the slice carries the right media items, audio cut frame by frame."""
    x = mixed_inputs()
    whole = model.embed(x.input_ids, **x.media())
    types = x.mm_token_type_ids[0].tolist()
    S = len(types)
    sliced = 0
    for a in range(S):
        for b in sorted({*range(a + 1, min(a + 13, S + 1)), S}):  # every range up to 12 tokens, every suffix
            cuts = any(types[i - 1] == types[i] and types[i] in VISION_TYPES for i in (a, b) if 0 < i < S)
            if cuts:
                with pytest.raises(InputError, match="cuts"):
                    x.slice(a, b)
                continue
            part = x.slice(a, b)
            assert torch.equal(part.input_ids, x.input_ids[:, a:b]) and part.mm_token_type_ids.shape == (1, b - a)
            assert torch.equal(model.embed(part.input_ids, **part.media()), whole[:, a:b]), (a, b)
            sliced += 1
    assert sliced > 200
    assert x.slice(0, S).digest() == x.digest()
    video = x.slice(*next((a, a + 4) for a in range(S) if types[a] == 2)).video  # the first frame only
    assert video.pixel_values.shape[0] == 1 and video.num_frames.tolist() == [1]
    audio = x.slice(0, types.index(3) + 2).audio  # the clip's first two frames
    assert audio.mask.tolist() == [[True, True, False]]
    with pytest.raises(InputError, match="not inside"):
        x.slice(3, 3)


def test_model_kwargs_run_the_model(model):
    x = mixed_inputs()
    want = model.logits(x.input_ids, x.attention_mask, x.mm_token_type_ids, x.image.pixel_values,
                        x.image.position_ids, x.audio.features, x.audio.mask, x.video.pixel_values,
                        x.video.position_ids)
    assert torch.equal(model.logits(**x.model_kwargs()), want)
    with pytest.raises(TypeError, match="num_frames_per_video"):  # what callers used to pop by hand
        model.logits(**x)
