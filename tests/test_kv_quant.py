"""The int8 KV cache (cache/quant.py, --kv-cache-dtype int8): logits close to a float cache's over
prompts many windows long, rollback exact, the in-place read path equal to dequantize-then-attend,
rows copied in and out whole, batched greedy decoding equal to decoding alone, bad names refused."""

import pytest
import torch
from messages import user
from test_families import CASES, IDS, text_ids, tiny_model

import unigemma
from unigemma.cache.batch import BatchCache, bytes_per_row
from unigemma.cache.kv import KVCache, layer_dtypes
from unigemma.cache.quant import Int8KV, quantize
from unigemma.config import FULL, SLIDING
from unigemma.generate.engine import Engine
from unigemma.generate.runner import decode_step
from unigemma.generate.sampling import SamplingParams
from unigemma.models import attention
from unigemma.quant import qdot

PROMPT, DECODE = 70, 50  # the tiny families' window is 5: the prompt and the decode wrap the rings many times


def logits_through_cache(model, ids, kv_dtype="auto", quant_layers="all", prompt=PROMPT):
    """Logits of every position: a `prompt`-token prefill, then one-token steps (the decode path)."""
    cache = model.make_cache(1, ids.shape[1] + 8, kv_dtype=kv_dtype, quant_layers=quant_layers)
    with torch.inference_mode():
        out = [model.head(model(ids[:, :prompt], torch.arange(prompt)[None], cache=cache))]
        for j in range(prompt, ids.shape[1]):
            out.append(model.head(model(ids[:, j:j + 1], torch.tensor([[j]]), cache=cache)))
    return torch.cat(out, 1)[0].float()


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_int8_logits_stay_close_to_the_float_cache(family, model_type):
    """fp32 model, 120 tokens (24 windows), int8 on the full, the sliding or all layers: the
    logits differ from the fp32 cache's by at most 0.3 (logits' std ~0.43 on these random
    models; measured 0.26 at most) and on average by at most 4.5x what storing every layer's
    K/V in bf16 costs (measured 3.4-3.6x with int8 on all layers: int8 keeps 7 bits of its
    group's largest value, bf16 8 of each value's own; head dim 16 here: one group a vector)."""
    _, model = tiny_model(family, model_type)
    ids = text_ids(model, PROMPT + DECODE, seed=3)
    ref = logits_through_cache(model, ids)
    bf16 = (logits_through_cache(model, ids, "bf16") - ref).abs()
    for quant_layers in ("all", "full", "sliding"):
        int8 = logits_through_cache(model, ids, "int8", quant_layers)
        err = (int8 - ref).abs()
        assert 0 < err.max() < 0.3, quant_layers
        assert err.mean() < 4.5 * bf16.mean(), quant_layers
        assert (int8.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9, quant_layers


def test_quantize_round_trip_is_within_half_a_step():
    """Codes and fp16 scales per 32 channels: each value back within half its group's step."""
    x = torch.randn(2, 3, 50, 64) * torch.logspace(-3, 3, 50)[:, None]  # tokens of very different sizes
    x[0, 0, 0, :32] = 0  # an all-zero group: scale 0, codes 0, no NaN
    codes, scale = quantize(x)
    assert codes.dtype == torch.int8 and scale.shape == (2, 3, 50, 2) and codes.abs().max() <= 127
    back = Int8KV(codes, scale).dequantize(torch.float32)
    step = scale.float().repeat_interleave(32, -1)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-3) + 1e-30).all()
    assert torch.equal(back[0, 0, 0, :32], torch.zeros(32))
    # a head dim 32 does not divide: one scale for the vector
    assert quantize(torch.randn(1, 1, 4, 48))[1].shape == (1, 1, 4, 1)


ATTENTION_CASES = [(4, 2, 1, 128, 1.0), (8, 1, 3, 200, 0.0625), (4, 4, 16, 64, 1.0), (2, 1, 5, 1000, 0.3)]


def attention_case(heads, kv_heads, S, K, dtype, seed, D=64):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(2, heads, S, D, generator=g) / 4).to(dtype)  # scores of a few units, as normed q/k give
    k, v = (Int8KV(*quantize(torch.randn(2, kv_heads, K, D, generator=g))) for _ in range(2))
    mask = torch.rand(2, 1, S, K, generator=g) > 0.2
    mask[1, :, :, K // 2:] = False  # a shorter row
    return q, k, v, mask


@pytest.mark.parametrize("heads,kv_heads,S,K,scale", ATTENTION_CASES)
def test_torch_read_path_equals_dequantize_then_attend(heads, kv_heads, S, K, scale, monkeypatch):
    """The torch fallback of the int8 read path (`_int8_blocks`: scales folded in, codes
    converted a chunk at a time; the chunk made smaller than the keys so the chunked sums run)
    against the plain path (`attend` with INT8_FAST off: dequantize, then attend as floats)."""
    monkeypatch.setattr(attention, "INT8_KEY_CHUNK", 48)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v, mask = attention_case(heads, kv_heads, S, K, dtype, seed=K)
        fast = attention._int8_blocks(q, k, v, mask, scale)
        monkeypatch.setattr(attention, "INT8_FAST", False)
        plain = attention.attend(q, k, v, mask, scale)
        monkeypatch.setattr(attention, "INT8_FAST", True)
        assert fast.dtype == dtype and (fast.float() - plain.float()).abs().max() < tol


needs_qdot = pytest.mark.skipif(not qdot.available(), reason="quant/qdot.c is not built (no C compiler at install)")


@needs_qdot
@pytest.mark.parametrize("heads,kv_heads,S,K,scale", ATTENTION_CASES)
def test_kernel_read_path_equals_its_oracle(heads, kv_heads, S, K, scale, monkeypatch):
    """qdot.c's int8 read (`decode_attention_int8`, what `attend` runs for decode steps) equals
    dequantize-then-attend with the queries rounded as the kernel rounds them (per 32 channels,
    to int8: qdot.rounded_activations), to fp32 rounding; and so does every code level (plain C,
    AVX2, AVX-512: the score kernels sum a row's blocks in different orders)."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, mask = attention_case(heads, kv_heads, S, K, dtype, seed=K)
        fast = attention.attend(q, k, v, mask, scale)
        monkeypatch.setattr(attention, "INT8_FAST", False)
        oracle = attention.attend(qdot.rounded_activations(q.float()).float(), k, v, mask, scale)
        monkeypatch.setattr(attention, "INT8_FAST", True)
        assert fast.dtype == dtype
        assert (fast.float() - oracle.to(dtype).float()).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2)
        levels = []
        for level in qdot.LEVELS:
            qdot.set_level(level)
            levels.append(attention.attend(q, k, v, mask, scale))
        qdot.set_level(None)
        assert all((x.float() - fast.float()).abs().max() < (1e-5 if dtype == torch.float32 else 1e-2) for x in levels)


@needs_qdot
def test_kernel_read_path_rows_are_independent():
    """A query's output is the same bits alone or among others (decode = verify = batch rows),
    with no padding: each query row of the kernels sums in its own fixed order."""
    q, k, v, mask = attention_case(8, 2, 6, 300, torch.float32, seed=1, D=96)
    full = attention.decode_attention_int8(q, k, v, mask)
    for s in (0, 5):
        one = attention.decode_attention_int8(q[:, :, s:s + 1], k, v, mask[:, :, s:s + 1])
        assert torch.equal(one, full[:, :, s:s + 1])


@needs_qdot
def test_kernel_reads_a_slice_of_the_cache_buffer():
    """The cache hands attention a view of its first K slots of a longer buffer: read in place."""
    q, k, v, mask = attention_case(4, 2, 1, 100, torch.float32, seed=2)
    big = [torch.zeros(2, 2, 160, *t.shape[3:], dtype=t.dtype) for t in (*k, *v)]
    for buf, t in zip(big, (*k, *v)):
        buf[:, :, :100] = t
    kk, vv = Int8KV(big[0][:, :, :100], big[1][:, :, :100]), Int8KV(big[2][:, :, :100], big[3][:, :, :100])
    assert qdot.kv_fits(kk.data, kk.scale)
    assert torch.equal(attention.decode_attention_int8(q, kk, vv, mask), attention.decode_attention_int8(q, k, v, mask))


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "qdot"])
def test_fast_read_path_decodes_as_the_plain_one(family, model_type, kernel, monkeypatch):
    """Whole models, fp32, against the plain read path (dequantize, then attend). The torch
    read path: logits within 5e-3 (they differ by ~1e-7 per attention, but a later layer's K/V
    can then round to the neighbouring int8 code: one quantization step, not drift). The qdot.c
    kernels (on the layers whose head dim 32 divides) also round the queries to int8 per 32
    channels, llama.cpp's q8_0 way: within 5e-2 on these random weights (on real weights that
    rounding moves the KL against a bf16 cache from 0.0007 to 0.0008: bench/kv_quality.py).
    Both pick the same tokens (random weights' near-ties aside)."""
    if kernel and not qdot.available():
        pytest.skip("quant/qdot.c is not built (no C compiler at install)")
    if not kernel:
        monkeypatch.setattr(qdot, "kv_fits", lambda codes, scales: False)
    _, model = tiny_model(family, model_type)
    ids = text_ids(model, PROMPT + DECODE, seed=4)
    fast = logits_through_cache(model, ids, "int8")
    monkeypatch.setattr(attention, "INT8_FAST", False)
    plain = logits_through_cache(model, ids, "int8")
    assert (fast - plain).abs().max() < (5e-2 if kernel else 5e-3)
    assert (fast.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_rollback_then_redecode_equals_never_having_decoded(family, model_type):
    """fp32 and bf16: 6 tokens decoded, trimmed, 6 others decoded: logits bit-equal to a cache
    that only ever saw the others (each token's codes and scales are its own: nothing stale)."""
    for dtype in (torch.float32, torch.bfloat16):
        _, model = tiny_model(family, model_type, dtype=dtype)
        ids = text_ids(model, 40, seed=5)
        other = text_ids(model, 6, seed=6)
        runs = []
        for detour in (True, False):
            cache = model.make_cache(1, 64, reserve=8, kv_dtype="int8", quant_layers="all")
            with torch.inference_mode():
                model(ids[:, :34], torch.arange(34)[None], cache=cache)
                if detour:
                    for j in range(34, 40):
                        model(ids[:, j:j + 1], torch.tensor([[j]]), cache=cache)
                    cache.trim(6)
                runs.append(torch.cat([model.head(model(other[:, j:j + 1], torch.tensor([[34 + j]]), cache=cache))
                                       for j in range(6)], 1))
        assert torch.equal(runs[0], runs[1]), dtype


@pytest.mark.parametrize("family,model_type", CASES, ids=IDS)
def test_a_token_does_not_depend_on_how_many_share_its_step(family, model_type):
    """attend's invariant with an int8 cache (what speculative verify relies on), bf16 packed:
    8 one-token steps after 60 tokens (crossing a 64-key block) equal verify forwards of 2..8."""
    from unigemma.models.packed import can_pack, pack_linears

    _, model = tiny_model(family, model_type, dtype=torch.bfloat16)
    if not can_pack(model):
        pytest.skip("needs oneDNN bf16: the packed linears are what make bf16 linears batch-invariant")
    pack_linears(model)
    ids = text_ids(model, 68, seed=7)
    with torch.inference_mode():
        cache = model.make_cache(1, 128, reserve=16, kv_dtype="int8", quant_layers="all")
        model(ids[:, :60], torch.arange(60)[None], cache=cache)
        singles = torch.cat([model(ids[:, j:j + 1], torch.tensor([[j]]), cache=cache) for j in range(60, 68)], 1)
        for n in range(2, 9):
            cache.trim(cache.length - 60)
            assert torch.equal(singles[:, :n], model(ids[:, 60:60 + n], torch.arange(60, 60 + n)[None], cache=cache)), n


@pytest.mark.parametrize("quant_layers", ["all", "full", "sliding"])
def test_batch_insert_save_round_trip_copies_every_tensor(quant_layers):
    """A prefilled int8 row goes into a batch and back out: codes and scales equal slot for slot,
    a step on the batch row equals the step on the one-sequence cache, and its bytes are what
    bytes_per_row says."""
    family, model_type = CASES[0]
    _, model = tiny_model(family, model_type)
    t = model.config.text
    ids = text_ids(model, 30, seed=8)
    one = model.make_cache(1, 40, reserve=4, kv_dtype="int8", quant_layers=quant_layers)
    batch = BatchCache(t, 2, 40, model.dtype, reserve=4, kv_dtype="int8", quant_layers=quant_layers)
    with torch.inference_mode():
        filler = model.make_cache(1, 40, reserve=4, kv_dtype="int8", quant_layers=quant_layers)
        model(ids[:, 10:13], torch.arange(3)[None], cache=filler)
        batch.insert(filler)  # row 0 is another conversation: ours is row 1
        model(ids[:, :29], torch.arange(29)[None], cache=one)
        row = batch.insert(one)
        quantized = {"all": (FULL, SLIDING), "full": (FULL,), "sliding": (SLIDING,)}[quant_layers]
        for layer, lt in enumerate(t.layer_types):
            assert len(batch.layers[layer]) == (4 if lt in quantized else 2)
            for a, b in zip(one.kv_for(layer), batch.kv_for(layer, row)):
                assert torch.equal(a, b)
        saved = model.make_cache(1, 8, reserve=4, kv_dtype="int8", quant_layers=quant_layers)
        batch.save(row, saved)  # grown to the row's 29 tokens
        for layer in range(len(t.layer_types)):
            for a, b in zip(saved.layers[layer], one.layers[layer]):
                assert a.dtype == b.dtype and torch.equal(a[:, :, :29], b[:, :, :29])
        h_one = model(ids[:, 29:30], torch.tensor([[29]]), cache=one)
        tokens = torch.stack([ids[0, 13:14], ids[0, 29:30]])
        h_batch = decode_step(model, batch, tokens, batch.positions[:, None])
        torch.testing.assert_close(h_batch[row:row + 1], h_one, rtol=0, atol=1e-5)
    nbytes = sum(buf[0].nbytes for bufs in batch.layers for buf in bufs)
    assert nbytes == bytes_per_row(t, 40, model.dtype, 4, kv_dtype="int8", quant_layers=quant_layers)
    assert bytes_per_row(t, 40, model.dtype, 4) == sum(buf[0].nbytes for bufs in
                                                       BatchCache(t, 1, 40, model.dtype, reserve=4).layers for buf in bufs)


def test_a_float_row_does_not_go_into_an_int8_batch():
    family, model_type = CASES[0]
    _, model = tiny_model(family, model_type)
    batch = BatchCache(model.config.text, 2, 40, model.dtype, kv_dtype="int8", quant_layers="all")
    with pytest.raises(ValueError, match="stored as"):
        batch.insert(model.make_cache(1, 10))
    with pytest.raises(ValueError, match="stored as"):
        batch.save(0, model.make_cache(1, 10))


CONVS = [
    ([user("Hello there! Tell me about the sea and the sky, at length.")], 24),
    ([user("Count: one, two,")], 15),
    ([user("A list of fruit, one per line, and why each is good:")], 30),
]


@pytest.mark.parametrize("quant_layers", ["all", "sliding"])
def test_scheduler_with_int8_decodes_as_the_engine_alone(gemma, quant_layers):
    """Three greedy conversations batched (joining mid-flight, prompts and replies wrapping the
    16-token windows) produce the tokens each produces alone, both with an int8 cache; a chat
    session's second turn reuses its int8 prefix."""
    engine = Engine(gemma.model, gemma.tokenizer, prefill_chunk=16, kv_cache_dtype="int8",
                    kv_quant_layers=quant_layers)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in CONVS]
    inputs = [gemma.processor()(c) for c, _ in CONVS]
    alone = [engine.generate(x, p) for x, p in zip(inputs, params)]
    s = engine.scheduler(3, 256)
    assert s.cache.kv_dtype == "int8" and s.cache.quant_layers == quant_layers
    requests = []
    for x, p in zip(inputs, params):
        requests.append(s.submit(x, p))
        for _ in range(4):
            s.step()
    s.run_until_done()
    for r, want in zip(requests, alone):
        assert r.result().token_ids == want.token_ids
    session = engine.session()
    first = engine.generate(inputs[0], params[0], session)
    assert session.cache.layer_dtypes == engine.layer_dtypes
    conv = CONVS[0][0] + [{"role": "assistant", "content": first.content}, user("And the wind?")]
    second = engine.generate(gemma.processor()(conv), params[1], session)
    assert second.timings.cached_tokens > inputs[0]["input_ids"].shape[1] // 2


def test_bad_names_are_clear_errors(checkpoint, gemma):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, bf16, fp16, fp32, int8.*fp8 needs a GPU"):
        layer_dtypes(torch.float32, "fp8")
    with pytest.raises(ValueError, match="kv_quant_layers must be one of all, full, sliding, got 'global'"):
        layer_dtypes(torch.float32, "int8", "global")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        unigemma.load(checkpoint, kv_cache_dtype="int4")  # before any weight loads
    with pytest.raises(ValueError, match="kv_quant_layers must be one of"):
        Engine(gemma.model, gemma.tokenizer, kv_cache_dtype="int8", kv_quant_layers="none")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        KVCache(gemma.model.config.text, 1, 8, torch.float32, kv_dtype="q8_0")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        bytes_per_row(gemma.model.config.text, 8, torch.bfloat16, kv_dtype=torch.int8)


def test_cli_refuses_a_bad_kv_flag(capsys):
    from unigemma.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--kv-cache-dtype", "fp8", "hi"])
    assert "--kv-cache-dtype: invalid choice: 'fp8'" in capsys.readouterr().err


def test_bytes_per_row_counts_codes_and_scales():
    """Gemma 3 270M's layer shape (head dim 256, one KV head, window 512), 5 sliding : 1 full."""
    from types import SimpleNamespace

    t = SimpleNamespace(sliding_window=512, layer_types=[SLIDING] * 5 + [FULL], layer_kv_heads=[1] * 6,
                        layer_head_dims=[256] * 6)
    n = 32768
    bf16 = bytes_per_row(t, n, torch.bfloat16)
    assert bf16 == 2 * 256 * 2 * (5 * (511 + 16) + n)
    int8 = 256 + 8 * 2  # codes, and an fp16 scale per 32 channels
    assert bytes_per_row(t, n, torch.bfloat16, kv_dtype="int8", quant_layers="all") == 2 * int8 * (5 * (511 + 16) + n)
    assert bytes_per_row(t, n, torch.bfloat16, kv_dtype="int8", quant_layers="full") == 2 * int8 * n + 2 * 512 * 5 * 527
    assert bytes_per_row(t, n, torch.float32, kv_dtype="bf16") == bf16


@pytest.mark.parametrize("quant_layers", ["all", "full"])
def test_greedy_with_a_drafter_is_identical_to_plain_decoding_on_int8(gemma, quant_layers):
    """Speculative decoding over an int8 cache: verify forwards, rolled-back drafts and the
    drafter reading the target's dequantized K/V (kv_for) leave plain int8 decoding's tokens."""
    from test_speculative import PROMPTS, Oracle, random_drafter

    from unigemma.generate.speculative import DraftLength

    kv = dict(kv_cache_dtype="int8", kv_quant_layers=quant_layers)
    p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    inputs = gemma.processor(70)(PROMPTS[0])
    plain = Engine(gemma.model, gemma.tokenizer, **kv).generate(inputs, p)
    for wrong in (0, 3):
        engine = Engine(gemma.model, gemma.tokenizer, drafter=random_drafter(), draft=DraftLength(k=3, adaptive=False),
                        **kv)
        got_random = engine.generate(inputs, p)
        engine.proposer = Oracle(gemma.model, engine.proposer.drafter, inputs["input_ids"].shape[1], plain.token_ids,
                                 wrong=wrong)
        got = engine.generate(inputs, p)
        assert got.token_ids == plain.token_ids == got_random.token_ids
        assert got.timings.accepted > 0 and got.timings.verify_forwards > 0


def test_server_config_chooses_the_kv_cache(checkpoint):
    """ServerConfig's kv_cache_dtype / kv_quant_layers set the served engine's caches (its
    batch, its prefill, kv_bytes), a chat completion answers, and a bad name fails create_app
    before its scheduler starts."""
    import httpx
    from server_helpers import Running

    from unigemma.server import ServerConfig, create_app

    gemma = unigemma.load(checkpoint, dtype="float32")  # its own engine: create_app sets its KV format
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        create_app(gemma, ServerConfig(kv_cache_dtype="fp8"))
    app = create_app(gemma, ServerConfig(model_name="tiny", max_seqs=2, max_len=256, kv_cache_dtype="int8",
                                         kv_quant_layers="full"))
    s = app.state.scheduler
    assert s.cache.layer_dtypes == {FULL: torch.int8, SLIDING: torch.float32} == gemma.engine.layer_dtypes
    assert s.kv_bytes == 2 * bytes_per_row(gemma.config.text, 256, torch.float32, 16, "int8", "full")
    with Running(app) as server:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_default_layers_are_full_for_int8_and_all_for_a_float_dtype():
    bf16, f32 = torch.bfloat16, torch.float32
    assert layer_dtypes(bf16, "int8") == {FULL: torch.int8, SLIDING: bf16}
    assert layer_dtypes(f32, "bf16") == {FULL: bf16, SLIDING: bf16}
    assert layer_dtypes(f32) == {FULL: f32, SLIDING: f32}
    assert layer_dtypes(f32, "int8", "sliding") == {FULL: f32, SLIDING: torch.int8}
