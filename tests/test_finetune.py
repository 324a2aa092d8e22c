"""Fine-tuning: 20 steps' losses equal a transformers + PEFT loop (text, tools, image + audio, video);
resume; QLoRA on int4 weights."""

import json
import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import unigemma
from messages import noise_clip
from reference import load_reference
from unigemma.finetune import TrainArgs, Trainer, load_jsonl, prepare
from unigemma.finetune.data import collate
from unigemma.lora import LoraConfig, lora_state_dict

STEPS = 20


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Text, tool-call, image + audio and video conversations, in the formats data.py reads."""
    d = tmp_path_factory.mktemp("ft-data")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "a.png")
    t = np.arange(6400) / 16000
    soundfile.write(d / "a.wav", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)
    noise_clip(d / "a.mkv", frames=3, seed=1)
    rows = [{"prompt": "Convert 2024-03-05 to words.", "completion": "March 5, 2024"},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                       {"type": "audio", "audio": "a.wav"},
                                                       {"type": "text", "text": "Describe both."}]},
                          {"role": "assistant", "content": "A noisy picture and a tone."}]},
            {"messages": [{"role": "system", "content": "You are terse."},
                          {"role": "user", "content": "Weather in Oslo?"},
                          {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
                              "name": "weather", "arguments": {"city": "Oslo"}}}]},
                          {"role": "tool", "tool_call_id": "1", "content": "snow"},
                          {"role": "assistant", "content": "Snow."}],
             "tools": [{"type": "function", "function": {"name": "weather", "description": "w", "parameters": {
                 "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]},
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mkv"},
                                                       {"type": "text", "text": "What moves?"}]},
                          {"role": "assistant", "content": "Only noise."}]},
            {"text": "Plain text is trained on every token."}]
    path = d / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def ours(checkpoint, data_file, quant=None, block_mask="all"):
    # composition "all": transformers' plain training forward (bidirectional image blocks on every layer)
    gemma = unigemma.load(checkpoint, dtype="float32", fast=False, quant=quant, block_mask=block_mask)
    data = load_jsonl(data_file, gemma.processor(image_budget=70))
    return gemma, data


ARGS = dict(lr=1e-3, max_steps=STEPS, batch_size=2, warmup=3, schedule="linear", max_grad_norm=1.0, seed=0)


def test_losses_equal_transformers_peft(checkpoint, data_file, monkeypatch):
    import unigemma.finetune.loss as loss_module
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    monkeypatch.setattr(loss_module, "CHUNK", 8)  # the loss head in many chunks, as long replies run
    gemma, data = ours(checkpoint, data_file)
    config = LoraConfig(r=4, alpha=8, dropout=0.0)
    params = prepare(gemma.model, config, seed=0)
    args = TrainArgs(**ARGS)
    pad = gemma.tokenizer.pad_id
    trainer = Trainer(gemma.model, params, data, pad, args)
    # the reference, starting from our initial adapter weights
    ref = get_peft_model(load_reference(checkpoint), PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=list(config.target_modules)))
    missing = set_peft_model_state_dict(ref, lora_state_dict(gemma.model))
    assert not [k for k in missing.missing_keys if "lora_" in k]
    ref.train()
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ref_params) == sum(p.numel() for p in params)
    opt = torch.optim.AdamW(ref_params, lr=args.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 3, STEPS)
    mine, theirs = [], []
    for _ in range(STEPS):
        epoch, cursor = trainer.epoch, trainer.cursor
        from unigemma.finetune.data import batch_order
        rows = batch_order([e.length for e in data.examples], 2, 0, epoch)[cursor]
        mine.append(trainer.train_step()[0])
        b = collate([data.examples[i].encoded for i in rows], pad)
        video = b.inputs.video  # the reference also takes the clips' frame counts
        extra = {"num_frames_per_video": video.num_frames} if video is not None else {}
        out = ref(**b.inputs.model_kwargs(), **extra, labels=b.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        theirs.append(float(out.loss.detach()))
    diff = max(abs(a - b) for a, b in zip(mine, theirs))
    assert diff <= 1e-4, (mine, theirs)
    assert sum(mine[-2:]) < sum(mine[:2]) - 0.5  # and it learns (two steps: one pass over the data)


def test_resume_gives_the_same_losses(checkpoint, data_file, tmp_path):
    from unigemma.lora import save_adapter

    def run(stop_at=None, resume=False):
        gemma, data = ours(checkpoint, data_file, block_mask="sliding")
        config = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must resume too
        params = prepare(gemma.model, config, seed=0)
        t = Trainer(gemma.model, params, data, gemma.tokenizer.pad_id, TrainArgs(**{**ARGS, "max_steps": 8}),
                    out=tmp_path / ("b" if stop_at is None and not resume else "a"),
                    save=lambda m, d: save_adapter(m, d, config))
        if resume:
            assert t.resume() is not None and t.step == 4
        t.run(stop_at)
        if stop_at:
            t.checkpoint()
        return t.losses

    whole = run()
    run(stop_at=4)
    resumed = run(resume=True)
    assert resumed == whole  # bit for bit
    assert (tmp_path / "a" / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_qlora_step_on_int4(checkpoint, data_file):
    gemma, data = ours(checkpoint, data_file, quant="int4-g32", block_mask="sliding")
    frozen = {k: v.clone() for k, v in gemma.model.state_dict().items() if "lora_" not in k}
    params = prepare(gemma.model, LoraConfig(r=4, alpha=8), seed=0)
    before = [p.detach().clone() for p in params]
    t = Trainer(gemma.model, params, data, gemma.tokenizer.pad_id, TrainArgs(**{**ARGS, "max_steps": 2, "warmup": 0}))
    losses = t.run()
    assert all(math.isfinite(x) for x in losses)
    # every A and B moved (B from zero after the first step), nothing else did
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    after = {k: v for k, v in gemma.model.state_dict().items() if "lora_" not in k}
    renamed = {k.replace(".base_layer", ""): v for k, v in after.items()}
    assert set(renamed) == set(frozen)
    assert all(torch.equal(frozen[k], renamed[k]) for k in frozen)
    assert any(v.dtype == torch.uint8 for v in frozen.values())  # int4 codes


def test_cli_writes_an_adapter_and_resumes(checkpoint, data_file, tmp_path):
    from unigemma.cli import main

    out = tmp_path / "run"
    common = ["finetune", "--model", str(checkpoint), "--data", str(data_file), "--eval", str(data_file),
              "--out", str(out), "--dtype", "float32", "--lora-r", "2", "--batch-size", "2", "--save-every", "1",
              "--eval-every", "1", "--image-budget", "70", "--quiet"]
    assert main(common + ["--max-steps", "1"]) == 0
    assert main(common + ["--max-steps", "2", "--resume"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2" / "trainer_state.pt").is_file()
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all("eval_loss" in e for e in log)
    # bad data is a clean error (exit 2) naming the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert main(["finetune", "--model", str(checkpoint), "--data", str(bad), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2


def test_8bit_optimizer(checkpoint, data_file):
    pytest.importorskip("torchao", reason="torchao is optional (--optim adamw8bit); not in the dev venv")
    gemma, data = ours(checkpoint, data_file, block_mask="sliding")
    params = prepare(gemma.model, LoraConfig(r=4, alpha=8), seed=0)
    t = Trainer(gemma.model, params, data, gemma.tokenizer.pad_id,
                TrainArgs(**{**ARGS, "max_steps": 3, "warmup": 0, "optim": "adamw8bit"}))
    losses = t.run()
    assert all(math.isfinite(x) for x in losses) and losses[2] < losses[0] + 1.0
    assert type(t.opt).__name__ == "AdamW8bit"


def test_accumulation_equals_one_big_batch(checkpoint, data_file):
    """2 micro-batches of 1 = 1 batch of 2: the loss is the mean over all their label tokens."""
    def one_step(batch_size, accum):
        gemma, data = ours(checkpoint, data_file, block_mask="sliding")
        params = prepare(gemma.model, LoraConfig(r=4, alpha=8), seed=0)
        t = Trainer(gemma.model, params, data, gemma.tokenizer.pad_id,
                    TrainArgs(**{**ARGS, "max_steps": 2, "warmup": 0, "batch_size": batch_size, "grad_accum": accum,
                                 "shuffle": False}))
        return t.run(), [p.detach().clone() for p in params]

    (l1, p1), (l2, p2) = one_step(2, 1), one_step(1, 2)
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(p1, p2)) < 1e-5


def test_targets_reach_the_media_embedders(checkpoint, data_file):
    """--targets 'default,media' adds the embedders' projections to the decoder's; after a step on
    image + audio data their adapters moved (gradients reach the soft tokens' projections)."""
    from unigemma.lora import DEFAULT_TARGETS, MEDIA_TARGETS, lora_modules
    from unigemma.lora.config import parse_targets

    assert parse_targets("default,media") == DEFAULT_TARGETS + MEDIA_TARGETS
    assert parse_targets("q_proj") == ("q_proj",) and parse_targets("q_proj, v_proj") == ("q_proj", "v_proj")
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"  # a regex stays one
    gemma, data = ours(checkpoint, data_file, block_mask="sliding")
    params = prepare(gemma.model, LoraConfig(r=2, alpha=4, target_modules=parse_targets("default,media")), seed=0)
    media = {n: m for n, m in lora_modules(gemma.model).items() if "embed_vision" in n or "embed_audio" in n}
    assert {n.rsplit(".", 1)[-1] for n in media} == set(MEDIA_TARGETS)
    before = {n: m.lora_B["default"].weight.detach().clone() for n, m in media.items()}
    t = Trainer(gemma.model, params, data, gemma.tokenizer.pad_id,
                TrainArgs(**{**ARGS, "max_steps": len(data), "batch_size": 1, "warmup": 0, "shuffle": False}))
    t.run()
    assert all(not torch.equal(before[n], m.lora_B["default"].weight) for n, m in media.items())


def test_bad_targets_are_a_clear_error(tmp_path):
    """--targets that are neither module names nor a regex: exit 2 naming them, before any loading."""
    from unigemma.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n')
    with pytest.raises(unigemma.errors.InputError, match=r"--targets 'q_proj\(': not a list of module names"):
        from unigemma.finetune import train
        train(tmp_path / "no-model", data, tmp_path / "out", targets="q_proj(", progress=False)
    assert main(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out",
                 str(tmp_path / "o"), "--targets", "q_proj(", "--quiet"]) == 2


def test_train_full_trains_saves_and_resumes_the_embedders(checkpoint, data_file, tmp_path):
    """--train-full media: every weight of the image and audio embedders trains (at --full-lr)
    beside the decoder's adapters; full_weights.safetensors holds them under our module names and
    loads back into a fresh model, giving the trained model's logits; a resumed run restores them."""
    from safetensors.torch import load_file

    from unigemma.cli import main
    from unigemma.finetune.full import FULL_FILE, load_full_weights
    from unigemma.lora import load_adapter

    def run(out, *extra):
        return main(["finetune", "--model", str(checkpoint), "--data", str(data_file), "--out", str(out),
                     "--dtype", "float32", "--lora-r", "2", "--batch-size", "2", "--save-every", "1",
                     "--image-budget", "70", "--train-full", "media", "--full-lr", "1e-2", "--quiet",
                     "--schedule", "constant", "--warmup", "0", *extra])  # the same lr whatever --max-steps

    out, straight = tmp_path / "run", tmp_path / "straight"
    assert run(straight, "--max-steps", "3") == 0  # 3 batches of 2: every example, media ones included
    assert run(out, "--max-steps", "1") == 0
    assert run(out, "--max-steps", "3", "--resume") == 0
    saved = load_file(str(out / FULL_FILE))
    base = unigemma.load(checkpoint, dtype="float32", fast=False)
    state = base.model.state_dict()
    embedders = {k for k in state if k.startswith(("model.embed_vision.", "model.embed_audio."))}
    assert set(saved) == embedders
    assert all(not torch.equal(saved[k], state[k]) for k in saved if k.endswith("patch_dense.weight"))
    want = load_file(str(straight / FULL_FILE))
    assert all(torch.equal(saved[k], want[k]) for k in want)  # resumed = uninterrupted, bit for bit
    assert json.loads((out / "training_args.json").read_text())["train_full"] == "media"

    # --init: a finished run's adapter and embedders start a new run (fresh optimizer, step 0);
    # at a rate of ~0 they come out as they went in (a fresh adapter's B is 0, its A random)
    again = tmp_path / "again"
    assert run(again, "--max-steps", "1", "--init", str(out), "--lr", "1e-12", "--full-lr", "1e-12") == 0
    assert json.loads((again / "log.jsonl").read_text().splitlines()[0])["step"] == 1
    for name in (FULL_FILE, "adapter_model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(again / name))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    assert run(tmp_path / "r4", "--max-steps", "1", "--init", str(out), "--lora-r", "4") == 2  # r=2 adapter
    assert run(tmp_path / "none", "--max-steps", "1", "--init", str(tmp_path / "nowhere")) == 2

    load_full_weights(base.model, out)
    load_adapter(base.model, out)
    rng = np.random.default_rng(3)
    messages = [{"role": "user", "content": [{"type": "image", "image": rng.integers(0, 256, (48, 96, 3), np.uint8)},
                                             {"type": "text", "text": "What is it?"}]}]
    inputs = dict(base.processor(image_budget=70)(messages))
    fresh = unigemma.load(checkpoint, dtype="float32", fast=False)
    assert not torch.allclose(fresh.model.logits(**inputs), base.model.logits(**inputs))
    with pytest.raises(unigemma.errors.CheckpointError, match="not a tensor of this model"):
        load_full_weights(fresh.model, {"model.embed_vision.nope": torch.zeros(1)})
    from unigemma.finetune.full import resolve

    with pytest.raises(unigemma.errors.InputError, match="'model.nowhere': the model has no such module"):
        resolve(fresh.model, "model.nowhere")
    assert main(["finetune", "--model", str(checkpoint), "--data", str(data_file), "--out", str(tmp_path / "x"),
                 "--train-full", "model.nowhere", "--quiet"]) == 2
    assert main(["finetune", "--model", str(checkpoint), "--data", str(data_file), "--out", str(tmp_path / "y"),
                 "--train-full", "media", "--full-lr", "0", "--quiet"]) == 2


def test_train_full_on_a_bf16_base_trains_float32_embedders(checkpoint, data_file, tmp_path):
    """--train-full under --dtype bfloat16: the embedders train as float32 weights (as the adapters
    do) inside the bf16 model, so a norm's weight near 1 moves by AdamW's first step (~lr = 1e-3),
    which bf16 (steps of 2^-7 there) rounds away; the saved weights are float32."""
    from safetensors.torch import load_file

    from unigemma.cli import main
    from unigemma.finetune.full import FULL_FILE

    out = tmp_path / "bf16"
    assert main(["finetune", "--model", str(checkpoint), "--data", str(data_file), "--out", str(out),
                 "--dtype", "bfloat16", "--lora-r", "2", "--batch-size", "4", "--max-steps", "1",
                 "--image-budget", "70", "--train-full", "media", "--full-lr", "1e-3", "--quiet",
                 "--schedule", "constant", "--warmup", "0"]) == 0
    saved = load_file(str(out / FULL_FILE))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    start = unigemma.load(checkpoint, dtype="bfloat16", fast=False).model.state_dict()
    for name in ("model.embed_vision.patch_ln1.weight", "model.embed_audio.embedding_projection.weight"):
        moved = (saved[name] - start[name].float()).abs()
        near_one = start[name].float().sub(1).abs() < 0.1
        assert 5e-4 < float(moved.max()) < 2e-3, name  # Adam's first step is ~lr, not a rounding of it
        if bool(near_one.any()):
            assert float(moved[near_one].max()) > 5e-4, name  # bf16 would have kept these at their start


def test_media_examples_are_re_encoded_not_kept(checkpoint, data_file):
    """Examples with media keep no tensors between batches (memory holds the jsonl, not every
    decoded picture) and re-encode to the same tensors; text-only ones keep their encoding."""
    gemma, data = ours(checkpoint, data_file)
    with_media = [e for e in data.examples if e._encoded is None]
    assert len(with_media) == 2 and all(e._encoded is not None for e in data.examples if e not in with_media)
    for e in with_media:
        a, b = e.encoded, e.encoded
        assert a is not b and a.length == e.length and torch.equal(a.labels, b.labels)
        ma, mb = a.inputs.media(), b.inputs.media()
        assert ma and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_schedules_equal_transformers():
    """Every --schedule's rate factor, step by step, equals transformers' schedule of that name."""
    from transformers import optimization as hf

    from unigemma.finetune.train import lr_lambda

    total, warmup, decay = 40, 5, 12
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = {"cosine": hf.get_cosine_schedule_with_warmup(opt, warmup, total),
              "linear": hf.get_linear_schedule_with_warmup(opt, warmup, total),
              "constant": hf.get_constant_schedule_with_warmup(opt, warmup),
              "wsd": hf.get_wsd_schedule(opt, warmup, decay, num_training_steps=total)}
    for name, sched in theirs.items():
        for step in range(total + 1):
            assert lr_lambda(step, total, warmup, name, decay) == pytest.approx(sched.lr_lambdas[0](step), abs=1e-12), \
                (name, step)
    # wsd holds the peak rate until its decay: a constant run resumed with it goes on unchanged
    assert [lr_lambda(s, total, warmup, "wsd", decay) for s in (warmup, total - decay)] == [1.0, 1.0]
    with pytest.raises(unigemma.InputError, match="decay-steps"):
        TrainArgs(schedule="wsd")
