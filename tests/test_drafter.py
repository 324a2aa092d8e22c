"""The MTP drafter's forward equals transformers' Gemma4UnifiedAssistantForCausalLM on the same
random weights and the same target K/V.

transformers 5.23 cannot build that class as shipped (peers.md): the text config's
`kv_sharing_modes` raises when every layer is KV-shared, which the drafter config forces. The
fixture swaps in the corrected property while the reference is built (it is read only in
module constructors), as peers.md describes; nothing installed is edited.
"""

import pytest
import torch

from unigemma.config import FULL, SLIDING, TextConfig
from unigemma.errors import ConfigError
from unigemma.models.drafter import Drafter, DrafterConfig

TEXT = dict(model_type="gemma4_unified_text", vocab_size=300, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
            layer_types=[SLIDING] * 3 + [FULL])
CONFIG = dict(model_type="gemma4_unified_assistant", text_config=TEXT, backbone_hidden_size=96)
# the centroid head of the small released drafters: 10 clusters of 30 tokens, the top 3 scored
CENTROIDS = dict(CONFIG, use_ordered_embeddings=True, num_centroids=10, centroid_intermediate_top_k=3)


def reference_drafter(config: dict):
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.kv_sharing_modes

    def fixed(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    Gemma4UnifiedTextConfig.kv_sharing_modes = property(fixed)
    try:
        cfg = Gemma4UnifiedAssistantConfig(**{k: v for k, v in config.items() if k != "model_type"})
        ref = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
    finally:
        Gemma4UnifiedTextConfig.kv_sharing_modes = original
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # every weight random, norms and layer scalars included
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        for name, b in ref.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            if name.endswith("token_ordering"):  # the reference initializes it to zeros
                b.copy_(torch.randperm(b.numel(), generator=g))
    return ref


@pytest.mark.parametrize("config", [CONFIG, CENTROIDS], ids=["dense-head", "centroid-head"])
@pytest.mark.parametrize("sliding_len", [6, 12])  # 12 > window + 1: only the last 9 are seen
def test_drafter_forward_equals_transformers(sliding_len, config):
    ref = reference_drafter(config)
    ours = Drafter(DrafterConfig.from_dict(config))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and unexpected == ["lm_head.weight"]  # tied to model.embed_tokens
    ours.eval()
    g = torch.Generator().manual_seed(1)
    B, p, full_len = 2, 14, 15
    kv_ref, kv_ours = {}, {}
    for t, n, heads, dim in ((SLIDING, sliding_len, 2, 16), (FULL, full_len, 1, 32)):
        k, v = torch.randn(B, heads, n, dim, generator=g), torch.randn(B, heads, n, dim, generator=g)
        kv_ref[t] = (k, v)
        seen = torch.ones(B, 1, 1, n, dtype=torch.bool)
        if t == SLIDING:
            seen[..., : max(0, n - (TEXT["sliding_window"] + 1))] = False
        kv_ours[t] = (k, v, seen)
    emb, hid = torch.randn(B, 1, 96, generator=g), torch.randn(B, 1, 96, generator=g)
    pos = torch.full((B, 1), p)
    with torch.no_grad():
        want = ref(inputs_embeds=torch.cat([emb, hid], -1), position_ids=pos, shared_kv_states=kv_ref)
        logits, nxt = ours(emb, hid, pos, kv_ours)
    if config is CENTROIDS:  # 3 clusters of 30 tokens computed per row, the rest filled
        assert ((logits > logits.amin(-1, keepdim=True)).sum(-1) <= 90).all()
    print(f"\n[drafter] sliding K/V {sliding_len}: max abs logit diff {(logits - want.logits).abs().max():.2e}")
    torch.testing.assert_close(logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, want.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_drafter_config_errors():
    with pytest.raises(ConfigError, match="gemma4_unified_assistant"):
        DrafterConfig.from_dict({**CONFIG, "model_type": "gemma4_unified"})
    with pytest.raises(ConfigError, match="num_centroids"):
        DrafterConfig.from_dict({**CENTROIDS, "num_centroids": 7})  # 300 tokens do not split in 7
    with pytest.raises(ConfigError, match="centroid_intermediate_top_k"):
        DrafterConfig.from_dict({**CENTROIDS, "centroid_intermediate_top_k": 11})
    d = DrafterConfig.from_dict(CONFIG)
    target = TextConfig(**{**{k: v for k, v in TEXT.items() if k != "model_type"}, "hidden_size": 96})
    d.check_target(target)  # fits
    with pytest.raises(ConfigError, match="head_dim"):
        d.check_target(TextConfig(**{**{k: v for k, v in TEXT.items() if k != "model_type"},
                                     "hidden_size": 96, "head_dim": 8}))
    with pytest.raises(ConfigError, match="hidden size"):
        d.check_target(TextConfig(**{k: v for k, v in TEXT.items() if k != "model_type"}))


@pytest.mark.parametrize("config", [CONFIG, CENTROIDS], ids=["dense-head", "centroid-head"])
def test_drafter_checkpoint_round_trip_and_errors(tmp_path, config):
    from safetensors.torch import load_file, save_file

    from unigemma.errors import CheckpointError
    from unigemma.weights.drafter import load_drafter, save_drafter

    ref = reference_drafter(config)
    ref.save_pretrained(tmp_path / "hf")  # the released layout, written by transformers
    ours = load_drafter(tmp_path / "hf", dtype="float32", pack=False)  # saved again below
    g = torch.Generator().manual_seed(2)
    kv = {SLIDING: (torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)),
          FULL: (torch.randn(1, 1, 5, 32, generator=g), torch.randn(1, 1, 5, 32, generator=g))}
    emb, hid, pos = torch.randn(1, 1, 96, generator=g), torch.randn(1, 1, 96, generator=g), torch.full((1, 1), 5)
    with torch.no_grad():
        want = ref(inputs_embeds=torch.cat([emb, hid], -1), position_ids=pos, shared_kv_states=kv)
        got, _ = ours(emb, hid, pos, {t: (k, v, torch.ones(1, 1, 1, 5, dtype=torch.bool)) for t, (k, v) in kv.items()})
    torch.testing.assert_close(got, want.logits, rtol=1e-5, atol=1e-5)
    again = load_drafter(save_drafter(ours, tmp_path / "ours", config), dtype="float32", pack=False)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))
    state = load_file(str(tmp_path / "ours" / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensors"):
        load_drafter(tmp_path / "ours")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load_drafter(tmp_path / "ours")


@pytest.mark.parametrize("config", [CONFIG, CENTROIDS], ids=["dense-head", "centroid-head"])
def test_top_token_is_the_argmax_of_the_logits(config):
    torch.manual_seed(3)
    d = Drafter(DrafterConfig.from_dict(config)).eval()
    if config is CENTROIDS:
        d.masked_embedding.token_ordering.copy_(torch.randperm(300))
    y = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(d.top_token(y), d.logits(y).argmax(-1))


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_drafter_drafts_what_the_plain_one_drafts(tmp_path, tied):
    from unigemma.models.packed import PackedLinear, device_can_pack
    from unigemma.weights.drafter import load_drafter, save_drafter

    if not device_can_pack("cpu", torch.bfloat16):
        pytest.skip("needs oneDNN bf16 (AVX512-BF16)")
    torch.manual_seed(4)
    config = dict(CENTROIDS, tie_word_embeddings=tied)  # untied: the centroid head reads lm_head's rows
    save_drafter(Drafter(DrafterConfig.from_dict(config)), tmp_path, config)
    plain, packed = load_drafter(tmp_path, pack=False), load_drafter(tmp_path)
    assert isinstance(packed.pre_projection, PackedLinear) and not isinstance(plain.pre_projection, PackedLinear)
    g = torch.Generator().manual_seed(5)
    kv = {SLIDING: (torch.randn(1, 2, 7, 16, generator=g).bfloat16(), torch.randn(1, 2, 7, 16, generator=g).bfloat16(),
                    torch.ones(1, 1, 1, 7, dtype=torch.bool)),
          FULL: (torch.randn(1, 1, 7, 32, generator=g).bfloat16(), torch.randn(1, 1, 7, 32, generator=g).bfloat16(),
                 torch.ones(1, 1, 1, 7, dtype=torch.bool))}
    emb, hid, pos = (torch.randn(1, 1, 96, generator=g).bfloat16(), torch.randn(1, 1, 96, generator=g).bfloat16(),
                     torch.full((1, 1), 7))
    with torch.no_grad():
        a, b = plain(emb, hid, pos, kv)[0], packed(emb, hid, pos, kv)[0]
    torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.05)  # bf16 kernels, same math
