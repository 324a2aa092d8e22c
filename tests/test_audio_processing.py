"""unigemma/processing/audio.py against transformers' Gemma4Unified audio code and against codecs.

Oracles: `Gemma4UnifiedAudioFeatureExtractor` (frames, mask, batch padding), the processor's
own token-count methods, and `transformers.audio_utils.load_audio(backend="soundfile")` (the
reference decode + downmix + soxr path) — all compared exactly. Resampling is also checked
against an analytic resynthesis of the test signal at 16 kHz, since both sides above use soxr.
"""
from __future__ import annotations

import base64
import io
import math
import os
from types import SimpleNamespace

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from unigemma.errors import InputError
from unigemma.processing.audio import (DEFAULT_MAX_SECONDS, SAMPLES_PER_TOKEN, ProcessedAudio, batch_audio,
                                       load_audio, preprocess_audio)
from transformers.audio_utils import load_audio as reference_load
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import Gemma4UnifiedAudioFeatureExtractor
from transformers.models.gemma4_unified.processing_gemma4_unified import Gemma4UnifiedProcessor

SR = 16_000
LENGTHS = [1, 639, 640, 641, 1280, 16000, 16000 * 3 + 17]
EXTRACTOR = Gemma4UnifiedAudioFeatureExtractor()
# The processor's token-count methods only read these attributes; no tokenizer needed.
PROC = SimpleNamespace(feature_extractor=EXTRACTOR, boa_token="<A>", audio_token="@", eoa_token="</A>")


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


def tone(n: int, rate: int, channels: int = 1) -> np.ndarray:
    """[n, channels] float32: different, band-limited content per channel."""
    t = np.arange(n) / rate
    cols = [0.3 * np.sin(2 * np.pi * (220 * (c + 1) * t + 0.1 * c)) + 0.1 * np.sin(2 * np.pi * 1500 * t)
            for c in range(channels)]
    return np.stack(cols, 1).astype(np.float32)


def encode(data: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_ffmpeg(mono: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def snr_db(got: np.ndarray, want: np.ndarray) -> float:
    return 10 * math.log10(np.mean(want.astype(np.float64) ** 2) / np.mean((got - want.astype(np.float64)) ** 2))


# --- features vs. the reference extractor ----------------------------------------------------
@pytest.mark.parametrize("n", LENGTHS)
def test_features_match_reference(n):
    samples = noise(n, seed=n)
    ours = preprocess_audio(samples)
    ref = EXTRACTOR(samples, return_tensors="np")
    assert ours.input_features.dtype == np.float32 and ours.input_features.shape == (-(-n // 640), 640)
    np.testing.assert_array_equal(ours.input_features, ref["input_features"][0])
    np.testing.assert_array_equal(ours.mask, ref["input_features_mask"][0])
    assert ours.mask.dtype == bool
    # float64 in: the reference casts to float32 after padding; same values.
    np.testing.assert_array_equal(preprocess_audio(samples.astype(np.float64) / 3).input_features,
                                  EXTRACTOR(samples.astype(np.float64) / 3, return_tensors="np")["input_features"][0])


@pytest.mark.parametrize("n", LENGTHS)
def test_num_soft_tokens_match_reference_processor(n):
    ours = preprocess_audio(noise(n))
    # Both of the processor's counts: the prompt expansion (mask sum) and the sizing helper.
    expansion = Gemma4UnifiedProcessor.replace_audio_token(PROC, EXTRACTOR(noise(n), return_tensors="np"), 0)
    assert ours.num_soft_tokens == expansion.count("@") == math.ceil(n / 640)
    assert ours.num_soft_tokens == Gemma4UnifiedProcessor._compute_audio_num_tokens(PROC, np.zeros(n), SR)


def test_batch_matches_reference():
    clips = [noise(n, seed=i) for i, n in enumerate([641, 1, 16000 * 3 + 17, 640, 12345])]
    features, mask = batch_audio([preprocess_audio(c) for c in clips])
    ref = EXTRACTOR(clips, return_tensors="pt")
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(features, ref["input_features"]) and torch.equal(mask, ref["input_features_mask"])
    for i, clip in enumerate(clips):  # each clip's expansion still counts only its own frames
        assert Gemma4UnifiedProcessor.replace_audio_token(PROC, ref, i).count("@") == math.ceil(len(clip) / 640)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=4), st.integers(0, 2 ** 31))
def test_batch_matches_reference_property(lengths, seed):
    clips = [noise(n, seed + i) for i, n in enumerate(lengths)]
    features, mask = batch_audio([preprocess_audio(c) for c in clips])
    ref = EXTRACTOR(clips, return_tensors="pt")
    assert torch.equal(features, ref["input_features"]) and torch.equal(mask, ref["input_features_mask"])


def test_preprocess_rejects_bad_samples():
    for bad, match in [(np.zeros(0, np.float32), "empty"), (np.zeros((2, 640), np.float32), "1-D"),
                       (np.arange(640), "float"), (np.array([0.0, np.inf], np.float32), "NaN/infinite")]:
        with pytest.raises(InputError, match=match):
            preprocess_audio(bad)
    with pytest.raises(InputError, match="at least one"):
        batch_audio([])


# --- decoding ---------------------------------------------------------------------------------
def test_lossless_decoding_is_exact(tmp_path):
    """Written at 16 kHz (no resampling): decoding must give back the PCM values exactly."""
    rng = np.random.default_rng(1)
    pcm16 = rng.integers(-2 ** 15, 2 ** 15, (4000, 2), dtype=np.int16)
    pcm24 = (rng.integers(-2 ** 23, 2 ** 23, (4000, 2)) * 256).astype(np.int32)  # PCM_24 keeps the top 24 bits
    flt = rng.uniform(-1, 1, (4000, 2)).astype(np.float32)
    cases = [(pcm16, "WAV", "PCM_16", 2.0 ** 15), (pcm24, "WAV", "PCM_24", 2.0 ** 31),
             (flt, "WAV", "FLOAT", 1.0), (pcm16, "FLAC", "PCM_16", 2.0 ** 15)]
    for data, fmt, subtype, scale in cases:
        encoded = encode(data, SR, fmt, subtype)
        channels = (data.astype(np.float32) / np.float32(scale)).T
        want = channels.mean(axis=0)  # stereo -> mono is the plain average
        np.testing.assert_array_equal(load_audio(encoded), want, err_msg=subtype)
        mono = encode(data[:, 0], SR, fmt, subtype)
        np.testing.assert_array_equal(load_audio(mono), channels[0], err_msg=subtype)


def test_every_source_kind_gives_the_same_samples(tmp_path):
    encoded = encode(tone(5000, 22050, 2), 22050, "FLAC", "PCM_24")
    path = tmp_path / "clip.flac"
    path.write_bytes(encoded)
    want = load_audio(encoded)
    uri = "data:audio/flac;base64," + base64.b64encode(encoded).decode()
    for source in [str(path), path, bytearray(encoded), memoryview(encoded), io.BytesIO(encoded), uri,
                   base64.b64encode(encoded).decode(), {"bytes": encoded}, {"path": str(path), "bytes": None}]:
        np.testing.assert_array_equal(load_audio(source), want, err_msg=type(source).__name__)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), want)


@pytest.mark.parametrize("fmt,subtype,ext", [("WAV", "PCM_16", "wav"), ("WAV", "FLOAT", "wav"),
                                             ("FLAC", "PCM_24", "flac"), ("OGG", "VORBIS", "ogg"),
                                             ("MP3", "MPEG_LAYER_III", "mp3")])
@pytest.mark.parametrize("rate", [22050, 44100])
def test_matches_reference_loader_exactly(tmp_path, fmt, subtype, ext, rate):
    """Decode + downmix + resample is bit-identical to transformers' soundfile/soxr loader."""
    path = tmp_path / f"clip.{ext}"
    sf.write(path, tone(rate * 3 // 2 + 11, rate, 3 if fmt != "MP3" else 2), rate, format=fmt, subtype=subtype)
    np.testing.assert_array_equal(load_audio(path), reference_load(str(path), SR, backend="soundfile"))


@pytest.mark.parametrize("fmt,subtype,min_snr", [("OGG", "VORBIS", 20), ("OGG", "OPUS", 15),
                                                 ("MP3", "MPEG_LAYER_III", 20)])
def test_lossy_codecs_are_close_to_the_source(fmt, subtype, min_snr):
    source = tone(SR, SR, 2)
    got = load_audio(encode(source, SR, fmt, subtype))
    assert len(got) == SR  # libsndfile trims the codecs' priming/padding
    assert snr_db(got, source.mean(axis=1)) >= min_snr


@pytest.mark.parametrize("container,codec", [("ipod", "aac"), ("webm", "libopus"), ("adts", "aac")])
def test_ffmpeg_fallback(container, codec):
    """Formats libsndfile lacks decode through PyAV; allow for the encoder's priming delay."""
    rate = 48000
    source = tone(rate, rate)[:, 0]
    got = load_audio(encode_ffmpeg(source, rate, container, codec))
    want = load_audio((source, rate))
    assert abs(len(got) - len(want)) <= 2048 * SR // rate  # AAC: 1024 priming + padding to a 1024 frame
    lag = max(range(0, 700), key=lambda k: float(np.dot(got[k:k + 8000], want[:8000])))
    n = min(len(got) - lag, len(want)) - 400  # the encoder's last frame may fade out
    assert snr_db(got[lag + 400:lag + n], want[400:n]) >= 15


def test_array_sources():
    x = noise(1000)
    np.testing.assert_array_equal(load_audio(x), x)  # a bare array is taken as 16 kHz mono
    np.testing.assert_array_equal(load_audio(x.astype(np.float64)), x)
    np.testing.assert_array_equal(load_audio(list(map(float, x))), x)
    np.testing.assert_array_equal(load_audio(torch.from_numpy(x)), x)
    np.testing.assert_array_equal(load_audio({"array": x, "sampling_rate": 16000}), x)
    stereo = np.stack([x, -x / 2])
    want = stereo.mean(axis=0)
    for arr in (stereo, stereo.T, torch.from_numpy(stereo)):  # channels on the shorter axis either way
        np.testing.assert_array_equal(load_audio((arr, SR)), want)
    pcm = np.array([-32768, 0, 16384, 32767], np.int16)
    np.testing.assert_array_equal(load_audio(pcm), pcm / np.float32(32768))
    np.testing.assert_array_equal(load_audio(np.array([0, 128, 255], np.uint8)), [-1, 0, 127 / 128])
    np.testing.assert_array_equal(load_audio(torch.tensor([0.5, -0.25], dtype=torch.bfloat16)), [0.5, -0.25])
    assert load_audio((noise(4410), 44100)).shape == (1600,)  # ceil(n * 16000 / rate), as the reference
    assert load_audio((noise(1), 44100)).shape == (1,)


# --- resampling -------------------------------------------------------------------------------
def multitone(t: np.ndarray, top: float) -> np.ndarray:
    """Sines up to `top` Hz plus a linear chirp 50 Hz -> `top` over 2 s: exact at any rate."""
    freqs, amps = np.array([110, 440, 1234.5, 0.4 * top, 0.8 * top, top]), [0.1, 0.15, 0.1, 0.1, 0.05, 0.05]
    y = sum(a * np.sin(2 * np.pi * f * t + p) for a, f, p in zip(amps, freqs, [0.3, 1.1, 2.0, 0.7, 1.5, 0.2]))
    return y + 0.1 * np.sin(2 * np.pi * (50 * t + (top - 50) * t ** 2 / 4))


# Away from 50 ms edges. Measured: content <= 3.4 kHz is within 2.5e-7 (>= 130 dB) at every
# rate; up to 7 kHz likewise from 8/48 kHz, but soxr HQ's passband roll-off at the 22.05/44.1 kHz
# ratios (-0.0065 dB at 7 kHz, -0.4 dB at 7.5 kHz) leaves 1.0e-4 max, 76 dB.
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("top,max_err,min_snr", [(3400, 1e-6, 120), (7000, 3e-4, 70)])
def test_resampling_matches_analytic_signal(rate, top, max_err, min_snr):
    top = min(top, 0.45 * rate)  # stay inside the input's own band
    x = multitone(np.arange(2 * rate) / rate, top).astype(np.float32)
    got = load_audio((x, rate))
    assert len(got) == 2 * SR
    want = multitone(np.arange(len(got)) / SR, top)
    edge = SR // 20  # 50 ms: the analytic signal does not stop where the clip does
    err = got[edge:-edge] - want[edge:-edge]
    assert np.abs(err).max() <= max_err and snr_db(got[edge:-edge], want[edge:-edge]) >= min_snr


# --- limits and bad input -----------------------------------------------------------------------
def test_length_limit(tmp_path):
    assert DEFAULT_MAX_SECONDS == 30
    assert len(load_audio(np.zeros(30 * SR, np.float32))) == 30 * SR  # exactly 30 s is fine
    with pytest.raises(InputError, match=r"30\.00 s long.*limit is 30 s"):
        load_audio(np.zeros(30 * SR + 1, np.float32))
    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(48000 * 40, np.float32), 48000)
    with pytest.raises(InputError, match=r"'long\.flac'.*40\.00 s long.*limit is 30 s"):
        load_audio(path)
    with pytest.raises(InputError, match=r"over 35 s long.*limit is 35 s"):
        load_audio(encode_ffmpeg(np.zeros(48000 * 40, np.float32), 48000, "ipod", "aac"), max_seconds=35)
    assert len(load_audio(path, max_seconds=None)) == 40 * SR
    assert len(load_audio(path, max_seconds=41)) == 40 * SR


def truncated(fmt: str, subtype: str) -> bytes:
    data = encode(tone(SR * 2, SR, 2), SR, fmt, subtype)
    return data[: len(data) // 2]


@pytest.mark.parametrize("source,match", [
    (b"", "empty"),
    (np.zeros(0, np.float32), "empty"),
    (encode(np.zeros((0, 1), np.float32), SR, "WAV", "PCM_16"), "empty"),
    (os.urandom(4096), "not a readable audio file"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt junk", "corrupt or truncated|not a readable"),
    (truncated("WAV", "PCM_16"), "truncated"),
    (truncated("FLAC", "PCM_16"), "corrupt or truncated"),
    (truncated("OGG", "VORBIS"), "truncated"),
    (truncated("MP3", "MPEG_LAYER_III"), "truncated"),
    (encode(np.array([[0.1], [np.nan], [0.2]], np.float32), SR, "WAV", "FLOAT"), r"1 NaN/infinite.*frame 1"),
    (np.array([0.0, np.inf, -np.inf]), "2 NaN/infinite"),
    (12345, "unsupported audio source type int"),
    (object(), "unsupported audio source type object"),
    (np.zeros((2, 3, 4), np.float32), "1-D or 2-D"),
    (np.zeros((40, 40), np.float32), "cannot tell channels"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.zeros((40, 50000), np.float32), "cannot tell channels"),
    ((np.zeros(10, np.float32), 10 ** 7), "sample rate .* outside"),
    ([[0.0, 1.0], [0.5]], "not an array of samples"),
    ({"bytes": "not bytes"}, "not a readable|does not exist"),
    (np.array(["a", "b"]), "dtype"),
    (np.zeros(10, np.int64), "dtype int64"),
    ((np.zeros(10, np.float32), 0), "sampling rate"),
    ((np.zeros(10, np.float32), "16k"), "sampling rate"),
    ({"array": np.zeros(10)}, "no 'sampling_rate'"),
    ({"foo": 1}, "audio dict needs"),
    ("/no/such/clip.wav", "does not exist"),
    ("https://example.com/a.wav", "not fetched"),
    ("data:audio/wav;base64,@@@", "not valid base64"),
    ("data:audio/wav,plain", "base64"),
    ("A" * 5000, "not a readable audio file"),
    (io.StringIO("text"), "binary mode"),
])
def test_bad_input_raises_input_error(source, match):
    with pytest.raises(InputError, match=match):
        load_audio(source)


def test_bad_paths_and_settings(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_audio(tmp_path)
    (tmp_path / "notes.wav").write_text("not audio at all")
    with pytest.raises(InputError, match="'notes.wav'.*not a readable audio file"):
        load_audio(tmp_path / "notes.wav")
    with pytest.raises(InputError, match="max_seconds"):
        load_audio(noise(10), max_seconds=0)


def _mutations(data: bytes, rng: np.random.Generator, count: int):
    for _ in range(count):
        b = bytearray(data[: rng.integers(1, len(data) + 1)] if rng.random() < 0.3 else data)
        for pos in rng.integers(0, len(b), rng.integers(1, 20)):
            b[pos] = rng.integers(0, 256)
        yield bytes(b)


def _fuzz(count: int):
    rng = np.random.default_rng(7)
    seeds = [encode(tone(4000, SR, 2), SR, f, s) for f, s in
             [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]]
    seeds.append(encode_ffmpeg(tone(4800, 48000)[:, 0], 48000, "ipod", "aac"))
    for seed in seeds:
        for data in _mutations(seed, rng, count):
            try:
                out = load_audio(data, max_seconds=60)
            except InputError:
                continue
            assert out.dtype == np.float32 and out.ndim == 1 and len(out) and np.isfinite(out).all()


def test_channel_layout_change_mid_stream_is_an_error_not_a_crash():
    """Found by fuzzing: two damaged bytes make FFmpeg's AAC decoder switch from 1 to 29
    channels mid-stream, and PyAV's to_ndarray() then segfaults on the bogus frame."""
    damaged = bytearray(encode_ffmpeg(tone(4800, 48000)[:, 0], 48000, "ipod", "aac"))
    damaged[402], damaged[1917] = 12, 6
    try:  # another FFmpeg build may encode other bytes; then it need only fail cleanly
        out = load_audio(bytes(damaged))
    except InputError as e:
        assert "corrupt" in str(e)  # here: "changes from 1 channels at 48000 Hz to 29 channels"
    else:
        assert out.dtype == np.float32 and np.isfinite(out).all()


def test_damaged_files_never_escape_as_raw_errors():
    _fuzz(8)


@pytest.mark.slow
def test_damaged_files_never_escape_as_raw_errors_many():
    _fuzz(300)


def test_processed_audio_is_a_plain_record():
    p = preprocess_audio(noise(641))
    assert isinstance(p, ProcessedAudio) and p.num_soft_tokens == 2 and p.input_features.shape[1] == SAMPLES_PER_TOKEN


def test_chat_processor_parity(tmp_path):
    """Through `Processor` (audio only), tensors equal transformers' apply_chat_template."""
    chat = pytest.importorskip("test_chat", reason="tests/test_chat.py's oracle is not available")
    import unigemma.processing.audio as audio
    path = tmp_path / "clip.wav"
    sf.write(path, tone(30000, 22050, 2), 22050, subtype="PCM_16")
    clips = [{"type": "audio", "audio": noise(n, n)} for n in (1, 640, 641, 16007)]
    for conversation in ([{"role": "user", "content": [*clips, {"type": "text", "text": "Both?"}]}],
                         [{"role": "user", "content": [{"type": "audio", "path": str(path)}]}]):
        want = chat.oracle(chat.MAIN).apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True)
        got = chat.Processor(chat.ours(), chat.templates()[chat.MAIN], media={"audio": audio})(conversation)
        assert set(got) == set(want)
        for key in got:
            assert torch.equal(got[key], want[key]), key
