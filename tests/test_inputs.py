"""Bad model inputs fail with an InputError that names what is wrong."""

import pytest
import torch
from reference import S, F, Shape, audio_frames, patches, write_checkpoint
from test_parity import build_prompt

import unigemma
from unigemma.errors import InputError


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
