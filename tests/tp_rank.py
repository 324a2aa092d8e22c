"""One rank of the tensor-parallel tests: tests/test_tp.py starts two of these as torchrun would.

    python tests/tp_rank.py '{"checkpoints": [...], "out": "results.pt"}'     # RANK, WORLD_SIZE, MASTER_* set

Rank 0 loads its shard of each checkpoint, runs `scenario` on it (logits with image + audio,
greedy tokens, continuous batching, speculative decoding) and saves what came out; rank 1
follows. test_tp.py runs the same `scenario` on one process and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from mock_model import MockTokenizer  # noqa: E402

from unigemma.generate.engine import Engine  # noqa: E402
from unigemma.generate.sampling import SamplingParams  # noqa: E402
from unigemma.generate.scheduler import Scheduler  # noqa: E402
from unigemma.generate.speculative import DraftLength  # noqa: E402
from unigemma.models.drafter import Drafter, DrafterConfig  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def drafter_for(config) -> Drafter | None:
    """A random MTP drafter fitting the tiny Gemma 4 (None for other families)."""
    if config.model_type != "gemma4_unified":
        return None
    t = config.text
    torch.manual_seed(0)
    d = dict(model_type="gemma4_unified_assistant", backbone_hidden_size=t.hidden_size, text_config=dict(
        vocab_size=t.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, global_head_dim=t.global_head_dim,
        num_global_key_value_heads=t.num_global_key_value_heads, attention_k_eq_v=True,
        sliding_window=t.sliding_window, layer_types=["sliding_attention", "full_attention"]))
    return Drafter(DrafterConfig.from_dict(d)).float().eval()


def prompt(config) -> dict:
    """A prompt over the tiny vocabulary: text, then (Gemma 4) a 2x3-patch image and 4 audio frames."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(10, 400, (1, 9), generator=g)
    if config.model_type != "gemma4_unified":
        return {"input_ids": text}
    n_img, n_aud = 6, 4
    ids = torch.cat([text[:, :4], torch.full((1, n_img), config.image_token_id), text[:, 4:6],
                     torch.full((1, n_aud), config.audio_token_id), text[:, 6:]], 1)
    types = torch.zeros_like(ids)
    types[ids == config.image_token_id], types[ids == config.audio_token_id] = 1, 3
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(2), indexing="xy"), -1).reshape(1, n_img, 2)
    return {"input_ids": ids, "mm_token_type_ids": types,
            "pixel_values": torch.rand(1, n_img, config.vision.patch_dim, generator=g), "image_position_ids": pos,
            "input_features": torch.randn(1, n_aud, config.audio.audio_embed_dim, generator=g) * 0.3,
            "input_features_mask": torch.ones(1, n_aud, dtype=torch.bool)}


def scenario(model) -> dict:
    """What the tests compare between one process and two."""
    inputs = prompt(model.config)
    out = {"logits": model.logits(**inputs)}
    engine = Engine(model, MockTokenizer())
    out["greedy"] = engine.generate(inputs, GREEDY).token_ids
    # continuous batching: three requests through two rows (the third joins when one leaves)
    s = Scheduler(engine, max_seqs=2, max_len=64)
    g = torch.Generator().manual_seed(2)
    requests = [s.submit({"input_ids": torch.randint(10, 400, (1, n), generator=g)},
                         SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))
                for n, m in ((5, 6), (9, 10), (3, 8))]
    s.run_until_done()
    out["batched"] = [r.result().token_ids for r in requests]
    drafter = drafter_for(getattr(model, "full_config", model.config))  # (a shard: 1/N of the heads)
    if drafter is not None:
        spec = Engine(model, MockTokenizer(), drafter=drafter, draft=DraftLength(k=3, adaptive=False))
        done = spec.generate(inputs, GREEDY)
        out["speculative"], out["drafted"] = done.token_ids, done.timings.drafted
    return out


def main() -> int:
    from unigemma.tp.group import init_group
    from unigemma.tp.load import lead, load_shard, run_rank

    job = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    group = init_group(2, timeout_s=job.get("timeout_s", 30))
    results = []
    for path in job["checkpoints"]:
        if group.rank != 0:
            code = run_rank(path, group, dtype="float32")
            if code:
                return code
            continue
        model = load_shard(path, group, dtype="float32")
        leader = lead(model, group)
        results.append(scenario(model))
        leader.close()
    if group.rank == 0:
        torch.save(results, job["out"])
    return 0


if __name__ == "__main__":
    from unigemma.tp.group import exit_rank

    exit_rank(main())
