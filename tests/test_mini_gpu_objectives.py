"""bench/mini_gpu.py's two further objectives: per-patch reading heads and KL to the start model."""

from __future__ import annotations

import random

import pytest
import torch

from bench.mini_patch_read import COLOUR_NAMES, IGNORE, PatchReader, patch_targets
from bench.mmdata.vocab import SHAPES
from unigemma.config import ModelConfig
from unigemma.inputs import IMAGE
from unigemma.models import gemma3
from unigemma.weights.random import randomize_reference


def grid(cols: int, rows: int, padding: int = 0) -> torch.Tensor:
    """Position ids [1, cols * rows + padding, 2] in the processor's order (row by row), -1 padded."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], -1)
    return torch.cat([pos, torch.full((padding, 2), -1)])[None]


def test_patch_targets_label_each_patch_by_the_object_covering_its_middle():
    # 144 px, 8 x 8 patches of 18 px: patch (x, y)'s middle is (18x + 9, 18y + 9)
    record = {"meta": {"pairs": [["red", "star"], ["blue", "circle"]],
                       "spots": [[27.0, 27.0, 30.0], [117.0, 117.0, 20.0]]}}
    t = patch_targets(record, grid(8, 8, padding=6), 144)
    assert t.shape == (64, 2)  # padding rows left out
    at = lambda x, y: t[y * 8 + x].tolist()  # noqa: E731
    assert at(1, 1) == [SHAPES.index("star"), COLOUR_NAMES.index("red")]  # its middle: the star's centre
    assert at(6, 6) == [SHAPES.index("circle"), COLOUR_NAMES.index("blue")]
    assert at(7, 0) == [len(SHAPES), len(COLOUR_NAMES)]  # far from both: background
    assert at(2, 2) == [IGNORE, IGNORE]  # 25 px from the star's centre, 0.85 r: its edge, unlabelled
    assert at(1, 2) == [IGNORE, IGNORE]  # 18 px below it: 0.6 r, not inside
    assert int((t[:, 0] == SHAPES.index("star")).sum()) == 1 and int((t[:, 0] == IGNORE).sum()) == 12  # the eight around the star, four beside the circle


@pytest.mark.parametrize("record", [{"meta": {}}, {"meta": {"pairs": [["red", "star"]], "spots": []}}, {}])
def test_patch_targets_leave_pictures_without_objects_unlabelled(record):
    t = patch_targets(record, grid(3, 2, padding=1), 144)
    assert t.shape == (6, 2) and bool((t == IGNORE).all())


@pytest.fixture(scope="module")
def model():
    d = gemma3.tiny_config()
    m = gemma3.Gemma3ForCausalLM(ModelConfig.from_dict(d))
    randomize_reference(m, seed=2)
    return m.eval()


def test_patch_reader_scores_the_image_tokens_of_the_hooked_layer(model):
    torch.manual_seed(0)
    reader = PatchReader(model, 1)
    ids = torch.tensor([[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 13, 14]])
    types = torch.zeros_like(ids)
    types[0, 1:4], types[1, 2:5] = IMAGE, IMAGE  # two pictures of three patches
    from unigemma.finetune.loss import hidden_states
    from unigemma.inputs import ModelInputs

    hidden_states(model, ModelInputs(ids))
    caught = reader._h
    assert caught is not None and caught.shape == (2, 6, model.config.text.hidden_size)
    targets = torch.tensor([[0, 1], [IGNORE, IGNORE], [len(SHAPES), len(COLOUR_NAMES)],
                            [3, 4], [3, 4], [IGNORE, IGNORE]])
    reader.train()
    loss = reader.loss(types, targets)
    shape, colour = reader.logits(types)
    keep = targets[:, 0] != IGNORE
    f = torch.nn.functional.cross_entropy
    assert torch.allclose(loss, 0.5 * (f(shape[keep], targets[keep, 0]) + f(colour[keep], targets[keep, 1])))
    loss.backward()
    assert reader.shape.weight.grad.abs().sum() > 0 and reader.colour.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="6 image tokens in the batch, 5 patch targets"):
        reader.loss(types, targets[:5])
    assert float(reader.loss(types, torch.full((6, 2), IGNORE)).detach()) == 0.0
    reader.eval()
    s, c, n = reader.accuracy(types, targets)
    assert n == 3 and 0 <= s <= 1 and 0 <= c <= 1  # the background patch is left out
    reader.remove()
    reader._h = None
    hidden_states(model, ModelInputs(ids))
    assert reader._h is None


def test_batch_rows_cut_and_pad_the_drawn_rows():
    from bench.mini_self_distill import batch_rows

    ids, mask = batch_rows([[2, 3, 4, 5, 6], [2, 7]], 4, 3, random.Random(0))
    assert ids.shape[0] == 4 and ids.shape[1] <= 3
    for row, m in zip(ids.tolist(), mask.tolist()):
        real = row[:sum(m)]
        assert real in ([2, 3, 4], [2, 7]) and row[sum(m):] == [0] * (len(row) - sum(m))


def test_kl_loss_is_zero_against_itself_and_trains_only_the_student(model):
    from bench.mini_self_distill import frozen_copy, kl_loss

    student = frozen_copy(model)
    teacher = frozen_copy(model)
    for q in student.parameters():
        q.requires_grad_(True)
    ids = torch.tensor([[2, 40, 41, 42, 43], [2, 50, 51, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert abs(float(kl_loss(student, teacher, ids, mask).detach())) < 1e-5
    with torch.no_grad():
        student.text.layers[0].mlp.down_proj.weight.mul_(3.0)
        student.text.norm.weight.add_(4.0)  # sharper logits: the tiny random model's are near uniform
    loss = kl_loss(student, teacher, ids, mask)
    assert float(loss.detach()) > 1e-4
    loss.backward()
    assert student.text.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in teacher.parameters())
    # padding positions are left out: other ids there give the same loss
    assert torch.allclose(loss, kl_loss(student, teacher, torch.tensor([[2, 40, 41, 42, 43], [2, 50, 51, 9, 9]]), mask))


def test_sample_continues_each_prompt_and_repeats_with_its_seed(model):
    from bench.mini_self_distill import sample

    prompts = [[2, 30, 31], [2, 32, 33, 34]]
    a = sample(model, prompts, 5, seed=1)
    assert len(a) == 2 and all(r[:3] == p[:3] and 3 <= len(r) <= 8 for r, p in zip(a, prompts))
    assert a == sample(model, prompts, 5, seed=1)


def test_patch_targets_read_the_shape_alone_in_an_unnamed_fill():
    record = {"kind": "any_shape", "meta": {"shape": "heart", "fill": [12, 200, 90], "spots": [[72.0, 72.0, 40.0]]}}
    t = patch_targets(record, grid(8, 8), 144)
    inside = t[:, 0] == SHAPES.index("heart")
    assert int(inside.sum()) >= 4 and bool((t[inside, 1] == IGNORE).all())  # the fill has no name to learn
    assert bool((t[t[:, 0] == len(SHAPES), 1] == len(COLOUR_NAMES)).all())  # the background keeps its class


def test_draw_items_adds_free_fills_to_the_training_conversations(tmp_path):
    from bench.mini_gpu import draw_items

    train, held, fresh = draw_items(tmp_path, ("colour",), 2, 1, 1, 7, 1, free=3)
    kinds = sorted(r["kind"] for r in train)
    assert kinds == ["any_shape"] * 3 + ["colour"] * 2 and len(held) == 1 and len(fresh) == 1
    free = [r for r in train if r["kind"] == "any_shape"]
    assert all(r["answer"] in SHAPES and "pairs" not in r["meta"] for r in free)
    assert all((tmp_path / r["messages"][0]["content"][0]["image"]).is_file() for r in free)
