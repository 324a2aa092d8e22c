"""Keep an adapter off the text: each LoRA A held outside the subspace that text's inputs fill.

A LoRA update B A x reaches every token, text's too. The reader warm-up (bench/mini_reader_probe.py)
trains its adapter on image blocks alone, and unconstrained it took the mini's prose perplexity
from 11.2 to 2,217 (README, "Ninth look"). Here the inputs each adapted module sees on plain
English are gathered once, before training (B is zero then, so they are the base model's), and
the eigenvectors of their uncentred covariance that hold all but `eps` of its energy span the
text's subspace P; A is then kept in its complement, A ← A − A P Pᵀ, after every optimizer step
(Adam's per-element step leaves any subspace, so the weights are projected, not the gradient).
Text's inputs then meet B A x ≈ 0 in these layers, and the picture tokens keep whatever part of
theirs lies outside P. It is the null-space projection of continual learning (Adam-NSCL) and of
model editing (AlphaEdit), applied per module.
"""

from __future__ import annotations

import argparse

import torch


class _Share(argparse.Action):
    """A share of text's energy: in [0, 1), checked as it is parsed (before any model loads)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if not 0 <= value < 1:
            parser.error(f"{option_string} {value}: the share of text's energy left in reach, in [0, 1)")
        setattr(namespace, self.dest, value)


def add_argument(p: argparse.ArgumentParser) -> None:
    """`--keep-text EPS` (default None: no constraint), for the probes that train an adapter."""
    p.add_argument("--keep-text", type=float, default=None, metavar="EPS", action=_Share,
                   help="keep each trained A off the subspace holding all but EPS of text's input energy "
                        "(bench/mini_keep_text.py), e.g. 0.01")


def add_anchor_arguments(p: argparse.ArgumentParser) -> None:
    """`--anchor-text W` (default 0: none) and `--anchor-rows N`, for the probes that train the
    first layers only (`TextAnchor`)."""
    p.add_argument("--anchor-text", type=float, default=0.0, metavar="W",
                   help="add W x the first layers' relative drift on English from the start model's output "
                        "(`TextAnchor`: replay paragraphs, never the prose scored) to each step's loss")
    p.add_argument("--anchor-rows", type=int, default=8, help="with --anchor-text: paragraphs a step")


BOS = 2  # Gemma's <bos>: every text starts from it, as the prose perplexity's windows do


def text_ids(tokenizer, n_tokens: int, window: int = 512) -> list[list[int]]:
    """About `n_tokens` of plain English in pieces of at most `window`: bench/mini_train.py's replay
    paragraphs (standard-library docstrings, never the modules the prose perplexity reads)."""
    from bench.mini_train import replay_paragraphs

    out, total = [], 0
    for text in replay_paragraphs():
        ids = tokenizer.encode(text, add_special_tokens=False)[:window - 1]  # <bos> once, below
        out.append([BOS] + ids)
        total += len(ids) + 1
        if total >= n_tokens:
            break
    return out


def hidden_after(model, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """The hidden states of text `ids` [B, S] after the decoder's first `layers` layers (causal
    masks, as the model's forward masks text); the head is never run. With grad where grad is on
    (`TextAnchor` trains through it)."""
    from bench.mini_reader_probe import layer_outputs

    ids = ids.to(model.device)  # (bench/mini_gpu.py runs it on a GPU)
    h = model.embed(ids)
    for h in layer_outputs(model, h, torch.zeros_like(ids), layers):
        pass
    return h


@torch.no_grad()
def first_layers(model, ids: torch.Tensor, layers: int) -> torch.Tensor:
    """`hidden_after` without grad: what the text's subspaces and the anchor's targets are taken from."""
    return hidden_after(model, ids, layers)


@torch.no_grad()
def input_covariance(modules: dict, run, unit: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """(name → Σ x xᵀ in float64 over every input x that reaches that module of `modules` while
    `run()` runs the model, the number of tokens seen by the first module). `unit` scales each x to
    length 1 first, so a few tokens of huge norm (<bos>, the attention sinks) do not outweigh the rest."""
    cov: dict[str, torch.Tensor] = {}
    seen = {}

    def gather(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            if unit:
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
            cov[name] = cov[name] + x.T @ x if name in cov else x.T @ x
            seen[name] = seen.get(name, 0) + x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(gather(n)) for n, m in modules.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return cov, next(iter(seen.values()), 0)


def text_covariance(model, modules: dict, texts: list[list[int]], layers: int,
                    unit: bool = False) -> dict[str, torch.Tensor]:
    """name → Σ x xᵀ (float64) over every text token's input to that module of `modules` (name →
    LoraLinear, all within the first `layers` layers); `unit` as in `input_covariance`."""
    def run():
        for ids in texts:
            first_layers(model, torch.tensor([ids]), layers)

    cov, _ = input_covariance(modules, run, unit)
    missing = sorted(set(modules) - set(cov))
    if missing:
        raise ValueError(f"no text reached {missing[:3]}: are they within the first {layers} layers?")
    return cov


def text_subspaces(cov: dict[str, torch.Tensor], eps: float) -> dict[str, torch.Tensor]:
    """name → [in, k] orthonormal float32 basis: the top eigenvectors of `cov`, as few as hold at
    least 1 − eps of its trace (eps 0: every direction with any energy at float64's resolution)."""
    out = {}
    for name, c in cov.items():
        w, v = torch.linalg.eigh(c)  # ascending
        w, v = w.flip(0).clamp_min(0), v.flip(1)
        share = torch.cumsum(w, 0) / w.sum()
        k = min(int((share < 1 - max(eps, 1e-12)).sum()) + 1, len(w))
        out[name] = v[:, :k].float().contiguous()
    return out


@torch.no_grad()
def project_(modules: dict, bases: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """A ← A − (A P) Pᵀ for each module's adapter `adapter`: its rows leave the text's subspace."""
    for name, P in bases.items():
        A = modules[name].lora_A[adapter].weight
        A -= (A @ P) @ P.T


def keep_off_text(model, modules: dict, tokenizer, layers: int, eps: float, n_tokens: int = 30000) -> dict:
    """The text subspaces of `modules` (gathered now, on ~`n_tokens` of English), with every A
    projected off them once; call `project_(modules, bases)` after each optimizer step."""
    bases = text_subspaces(text_covariance(model, modules, text_ids(tokenizer, n_tokens), layers), eps)
    project_(modules, bases)
    return bases


class TextAnchor:
    """Hold the first `layers` layers' output on English where the start model had it.

    The projection above keeps each A off the text's input subspace, but what is left in reach
    still moves the prose once a stage trains long (README, Fourteenth look: a hearing warm-up's
    prose 11.26 at step 600, 14.16 at 900). The layers after `layers` are not trained, so if the
    first layers' output on a text is unchanged, so is everything the model says about it: this
    asks that directly. The targets are the start model's hidden states after `layers` layers on
    replay paragraphs (`text_ids`, taken before any step: LoRA starts at zero), and the loss is
    each real token's squared distance from its target relative to the target's own (the <bos>
    and the attention sinks carry norms hundreds of times the rest: an absolute distance would
    weigh little else), averaged over the tokens of `rows` paragraphs drawn a step.

        anchor = TextAnchor(model, tokenizer, layers=5, weight=1000)
        loss = task_loss + anchor.weight * anchor.loss()
    """

    def __init__(self, model, tokenizer, layers: int, rows: int = 8, weight: float = 1.0, n_tokens: int = 60000,
                 window: int = 128, seed: int = 0):
        texts = text_ids(tokenizer, n_tokens, window)
        L = max(len(t) for t in texts)
        # right-padded: text is causal, so the pads never reach a real token
        self.ids = torch.zeros(len(texts), L, dtype=torch.long)
        self.real = torch.zeros(len(texts), L, dtype=torch.bool)
        for i, t in enumerate(texts):
            self.ids[i, :len(t)], self.real[i, :len(t)] = torch.tensor(t), True
        self.targets = torch.cat([first_layers(model, self.ids[a:a + 16], layers) for a in range(0, len(texts), 16)])
        self.model, self.layers, self.rows, self.weight = model, layers, rows, weight
        self.rng = torch.Generator().manual_seed(seed)
        self.recent: list[float] = []  # each loss() since the last `drift()`

    def loss(self) -> torch.Tensor:
        """The mean relative squared drift over `rows` paragraphs drawn at random (with grad)."""
        pick = torch.randint(len(self.ids), (self.rows,), generator=self.rng)
        ids, real, target = self.ids[pick], self.real[pick], self.targets[pick]
        keep = int(real.sum(1).max())  # the longest drawn paragraph: the rest of the padding is not run
        ids, real, target = ids[:, :keep], real[:, :keep], target[:, :keep]
        h = hidden_after(self.model, ids, self.layers)
        rel = (h - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
        out = rel[real].mean()
        self.recent.append(float(out.detach()))
        return out

    def drift(self) -> float | None:
        """The mean of `loss()` since the last call (None if none): the report's text drift."""
        out = round(sum(self.recent) / len(self.recent), 6) if self.recent else None
        self.recent.clear()
        return out
