"""The training loop: LoRA / QLoRA adapters on a frozen base, AdamW, warmup + decay, gradient
accumulation, eval loss, checkpoints and `--resume`.

    from unigemma.finetune import train
    result = train(model="google/gemma-4-12B-it", data="train.jsonl", out="adapter/", lora_r=16)

One optimizer step = `grad_accum` micro-batches of `batch_size` examples; the loss is the mean
cross-entropy over every label token of those micro-batches (loss.py), so accumulating 4 batches
of 1 equals one batch of 4. The model is loaded unpacked (`unigemma.load(..., fast=False)`: the
oneDNN-packed inference linears have no backward), every base weight frozen; with `quantize`
the base is int8 / int4 (quant/apply.py) and stays frozen, gradients passing through its
dequantized weight (quant/linear.py). Reproducible: one seed fixes the adapters' initial weights,
dropout and the data order; a resumed run restores the optimizer, schedule, RNG states and the
position in the data, so its losses are those of the run that was not interrupted. Under
torchrun, each rank trains its share of every batch (distributed.py): N ranks take one process's
steps, and checkpoints resume on any number of ranks.

Output (`out`): the final adapter in PEFT's format (adapter_config.json +
adapter_model.safetensors, loadable by PEFT and `unigemma serve --lora`), `log.jsonl` (one line
per step: loss, lr, tokens/s; eval lines), and `checkpoint-STEP/` directories (the adapter plus
`trainer_state.pt`: optimizer, scheduler, RNG, data position, trainable tensors).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..malloc import freed_memory_returned
from .data import Batch, Dataset, collate, batch_order
from .distributed import Dist, clip_grad_norm, full, full_optimizer_state, load_into, shard_optimizer_state
from .labels import IGNORE
from .loss import hidden_states, label_loss

QUANT_NAMES = {"int8": "int8", "int4": "int4-g32"}  # --quantize shorthands → quant/apply.py schemes


@dataclass
class TrainArgs:
    """Training knobs (the CLI's flags, one to one)."""
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (ignored with --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps to run"})
    batch_size: int = field(default=1, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup: float = field(default=0.03, metadata={"help": "warmup steps (>= 1) or fraction of the steps (< 1)"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, linear or constant after warmup; wsd: "
                                                                "constant, then a cosine decay to 0 over the "
                                                                "last --decay-steps"})
    decay_steps: int = field(default=0, metadata={"help": "wsd's decay: its last N steps (a constant-rate run "
                                                          "resumed with --schedule wsd ends annealed)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optim: str = field(default="adamw", metadata={"help": "adamw (torch) or adamw8bit (torchao's 8-bit states, "
                                                          "if torchao is installed)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: none)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute layers in backward"})
    return_memory: bool = field(default=True, metadata={"help": "map large buffers and give freed memory back to the "
                                                                "system during a step (bounds RSS on large models; "
                                                                "costs page faults: off is ~1.6x faster on a 270M)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard every decoder layer over the ranks "
                                                        "(FSDP2) instead of a whole model per rank"})
    seed: int = field(default=0, metadata={"help": "seed of initial adapters, dropout and data order"})
    eval_every: int = field(default=0, metadata={"help": "eval loss every N steps (0: at the end only)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    shuffle: bool = True

    def __post_init__(self):
        if self.optim not in ("adamw", "adamw8bit"):
            raise InputError(f"optim must be adamw or adamw8bit, got {self.optim!r}")
        if self.schedule not in ("cosine", "linear", "constant", "wsd"):
            raise InputError(f"schedule must be cosine, linear, constant or wsd, got {self.schedule!r}")
        if self.schedule == "wsd" and self.decay_steps < 1:
            raise InputError("--schedule wsd needs --decay-steps N (N >= 1: the steps of its final decay)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.lr <= 0:
            raise InputError("batch_size and grad_accum must be at least 1, lr positive")


def lr_lambda(step: int, total: int, warmup: int, schedule: str, decay: int = 0) -> float:
    """transformers' schedules: linear warmup to 1, then cosine / linear decay to 0 (or constant);
    wsd (warmup-stable-decay, transformers' get_wsd_schedule with its cosine decay): 1 until the
    last `decay` steps, then a cosine to 0. Only wsd lets a long constant-rate run, extended
    session after session, end annealed: resumed with it, the rate it had holds until the decay."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = max(warmup, total - decay)
        if step < start:
            return 1.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, total - start))))
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(args: TrainArgs, params: list) -> torch.optim.Optimizer:
    """torch's AdamW, or torchao's AdamW8bit (block-wise 8-bit moments, CPU and GPU): a quarter of
    AdamW's state memory (r=16 on the 12B: ~0.5 GiB of fp32 moments → ~0.13 GiB). params: tensors or
    param groups (dicts with their own "lr")."""
    if args.optim == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise InputError("--optim adamw8bit needs torchao (pip install torchao); or use --optim adamw") from e
        return AdamW8bit(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


MMAP_FROM = 256 << 10  # during a training step glibc maps buffers from this size and unmaps them on free


def _freed_memory_returned():
    """glibc keeps freed buffers below its dynamic mmap threshold (32 MiB once loading is done)
    in the heap, where the layer inputs that checkpointing keeps pin them: RSS grew ~60 MB per
    layer of the mid-size model at 1,024 tokens (past 13 GiB on the 12B) and the loss head's
    thousands of small block products held ~0.8 GB more. Mapping buffers from MMAP_FROM up and
    trimming the heap at that size keeps the step at what it uses (mid-size, int4, 1,024 tokens:
    peak +0.5 GiB over the weights instead of +1.6); malloc.py restores the thresholds after."""
    return freed_memory_returned(MMAP_FROM, MMAP_FROM)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])


class Trainer:
    """Trains `params` (the adapters' tensors; everything else frozen) of `model` on `data`."""

    def __init__(self, model, params: list[torch.nn.Parameter], data: Dataset, pad_id: int, args: TrainArgs,
                 eval_data: Dataset | None = None, out: str | Path | None = None, save=None,
                 progress: bool = False, dist: Dist | None = None, groups: list[dict] | None = None):
        """save(model, dir): writes the adapter (the `train` entry passes lora.save_adapter).
        dist: this rank's place under torchrun (distributed.py); None: one process. groups: the
        optimizer's param groups over `params` (each with its own lr), default one group."""
        self.model, self.params, self.data, self.eval_data = model, params, data, eval_data
        self.pad_id, self.args, self.save = pad_id, args, save
        self.dist = dist or Dist()
        self.progress = progress and self.dist.is_main
        self.out = Path(out) if out is not None else None
        per_epoch = max(1, math.ceil(len(data) / args.batch_size) // args.grad_accum)  # optimizer steps
        self.total = args.max_steps or max(1, math.ceil(args.epochs * per_epoch))
        warmup = int(args.warmup) if args.warmup >= 1 else int(round(args.warmup * self.total))
        self.opt = make_optimizer(args, groups or params)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_lambda(s, self.total, warmup, args.schedule, args.decay_steps))
        self.step, self.epoch, self.cursor = 0, 0, 0  # optimizer steps done; data position
        self.losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self._order: list[list[int]] | None = None

    # -- data ----------------------------------------------------------------------------
    def _next_batch(self):
        if self._order is None:
            lengths = [e.length for e in self.data.examples]
            self._order = batch_order(lengths, self.args.batch_size, self.args.seed, self.epoch, self.args.shuffle)
        rows = self._order[self.cursor]
        self.cursor += 1
        if self.cursor == len(self._order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return self._collate(self.data, rows)

    def _collate(self, data: Dataset, rows: list[int]) -> Batch:
        """This rank's share of global micro-batch `rows`; an empty share is one row with no labels
        (it adds nothing, but the rank still runs the collectives of the step)."""
        mine = self.dist.share(rows)
        b = collate([data.examples[i].encoded for i in (mine or rows[:1])], self.pad_id)
        return b if mine else Batch(b.inputs, torch.full_like(b.labels, IGNORE))

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches → (mean label loss, tokens seen)."""
        self.model.train()
        if not self.args.return_memory:
            return self._step()
        with _freed_memory_returned():
            return self._step()

    def _step(self) -> tuple[float, int]:
        batches = [self._next_batch() for _ in range(self.args.grad_accum)]
        # the label tokens of the whole global batch: every rank divides by the same count
        (count,) = self.dist.sum(sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches))
        total, tokens = 0.0, 0
        for b in batches:
            h = hidden_states(self.model, b.inputs, self.args.gradient_checkpointing)
            loss_sum, n = label_loss(self.model, h, b.labels)
            (loss_sum / max(1, count)).backward()
            total += float(loss_sum.detach())
            tokens += b.num_tokens if n or not self.dist.active else 0  # a rank's stand-in row is not data
        self.dist.reduce_grads(self.params)
        total, tokens = self.dist.sum(total, tokens)
        if self.args.max_grad_norm > 0:
            if self.dist.fsdp:  # sharded gradients: the norm of the whole, gathered
                clip_grad_norm(self.params, self.args.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        loss = total / max(1, count)
        self.losses.append(loss)
        return loss, int(tokens)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean label loss over the eval set (in batches of batch_size, fixed order)."""
        self.model.eval()
        total, count = 0.0, 0
        for rows in batch_order([e.length for e in self.eval_data.examples], self.args.batch_size, 0, 0, False):
            b = self._collate(self.eval_data, rows)
            s, n = label_loss(self.model, hidden_states(self.model, b.inputs), b.labels)
            total, count = total + float(s), count + n
        self.model.train()
        total, count = self.dist.sum(total, count)
        return total / max(1, count)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> list[float]:
        """Train until `total` steps (or `stop_at`); returns every step's loss so far."""
        end = min(self.total, stop_at or self.total)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total, initial=self.step, desc="fine-tuning", unit="step", dynamic_ncols=True)
        if self.out is not None and self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / "log.jsonl").open("a") if self.out is not None and self.dist.is_main else None
        t0, seen = time.perf_counter(), 0
        try:
            while self.step < end:
                loss, tokens = self.train_step()
                seen += tokens
                rate = seen / max(1e-9, time.perf_counter() - t0)
                entry = {"step": self.step, "loss": round(loss, 6), "lr": self.sched.get_last_lr()[0],
                         "tokens_per_s": round(rate, 1)}
                if self.eval_data is not None and ((self.args.eval_every and self.step % self.args.eval_every == 0)
                                                   or self.step == self.total):
                    entry["eval_loss"] = round(self.evaluate(), 6)
                    self.eval_losses.append((self.step, entry["eval_loss"]))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}",
                                    **({"eval": f"{entry['eval_loss']:.4f}"} if "eval_loss" in entry else {}))
                    bar.update(1)
                if log is not None:
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                if self.out is not None and self.args.save_every and self.step % self.args.save_every == 0:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return self.losses

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """out/checkpoint-STEP: the adapter and everything a resumed run needs. Full tensors, the
        same files for any world size; every rank calls it (sharded tensors are gathered), rank 0
        writes."""
        d = self.out / f"checkpoint-{self.step}"
        main = self.dist.is_main
        if main:
            d.mkdir(parents=True, exist_ok=True)
        with self.dist.gathered():
            if self.save is not None and main:
                self.save(self.model, d)
        params = [full(p).detach().clone() for p in self.params]
        optimizer = full_optimizer_state(self.opt.state_dict())
        if main:
            torch.save({"step": self.step, "epoch": self.epoch, "cursor": self.cursor, "losses": self.losses,
                        "eval_losses": self.eval_losses, "optimizer": optimizer,
                        "scheduler": self.sched.state_dict(), "rng": _rng_state(), "args": asdict(self.args),
                        "params": params}, d / "trainer_state.pt")
        self.dist.barrier()  # no rank reads or resumes past a checkpoint rank 0 is still writing
        return d

    def resume(self, directory: str | Path | None = None) -> Path | None:
        """Restore the latest out/checkpoint-* (or `directory`); returns it (None: nothing to resume)."""
        if directory is None:
            found = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if self.out else []
            if not found:
                return None
            directory = found[-1]
        # on the CPU: written by rank 0 of any run, maybe from a GPU this machine lacks
        state = torch.load(Path(directory) / "trainer_state.pt", weights_only=False, map_location="cpu")
        if len(state["params"]) != len(self.params) or any(a.shape != p.shape for a, p in zip(state["params"],
                                                                                                self.params)):
            raise InputError(f"{directory}: its adapter tensors do not match this run's (other --targets / --lora-r?)")
        for p, saved in zip(self.params, state["params"]):
            load_into(p, saved)
        self.opt.load_state_dict(shard_optimizer_state(state["optimizer"], self.params))
        self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.cursor = state["step"], state["epoch"], state["cursor"]
        self.losses, self.eval_losses = list(state["losses"]), list(state["eval_losses"])
        self._order = None
        _set_rng_state(state["rng"])
        return Path(directory)
