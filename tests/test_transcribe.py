"""/v1/audio/transcriptions and /v1/audio/translations, driven by the official `openai` client (and raw
httpx for the error cases) against a real uvicorn server with the tiny random real-vocabulary model.
Random weights transcribe nothing real: these tests pin the protocol (every response format, the
stream's events, segment times, usage) and the refusals, not the words."""

from __future__ import annotations

import io
import re

import httpx
import numpy as np
import openai
import pytest
import soundfile
from server_helpers import Running, tiny_gemma

from unigemma.errors import QueueFull
from unigemma.server import ServerConfig, create_app
from unigemma.server.transcribe import CUT_FRAME, split
from unigemma.server.transcript import InOrder, Joiner, answer_text

KEY = "test-key"
RATE = 16_000
SRT_CUE = re.compile(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)\n([^\n]+)\n")
VTT_CUE = re.compile(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)\n([^\n]+)\n")


def wav(seconds: float, rate: int = RATE, gap: tuple[float, float] | None = None) -> bytes:
    """A tone with a little noise (silent between gap[0] and gap[1] seconds), as WAV bytes."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    if gap:
        x[int(gap[0] * rate) : int(gap[1] * rate)] = 0
    buf = io.BytesIO()
    soundfile.write(buf, x.astype(np.float32), rate, format="WAV")
    return buf.getvalue()


LONG = wav(40, gap=(29.3, 29.7))  # two segments: the cut falls in the gap


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gemma = tiny_gemma(tmp_path_factory.mktemp("transcribe"))
    # max_len 1024 holds 30 s of audio (750 tokens) + the instruction + an 8-token reply;
    # max_queue 4: at most 4 segments of 30 s (120 s) per request
    config = ServerConfig(model_name="tiny", api_key=KEY, max_seqs=4, max_len=1024, max_queue=4,
                          max_tokens_default=8)
    app = create_app(gemma, config)
    with Running(app) as s:
        s.app = app
        yield s
    app.state.scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path="/v1/audio/transcriptions", files=None, **data):
    files = {"file": ("a.wav", wav(1))} if files is None else files
    return httpx.post(server.url + path, headers={"Authorization": f"Bearer {KEY}"}, files=files, data=data,
                      timeout=120)


def seconds(h, m, s, ms) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


# -- the formats, through the SDK ----------------------------------------------------------------
def test_json_has_text_and_token_usage(client):
    out = client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2)))
    assert isinstance(out.text, str)
    assert out.usage.type == "tokens" and out.usage.output_tokens > 0
    assert out.usage.input_token_details.audio_tokens == 50  # 2 s at 25 tokens/s
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    again = client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2)))
    assert again.text == out.text  # greedy by default


def test_text_format_is_the_json_text(client):
    text = client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2)), response_format="text")
    assert isinstance(text, str)
    assert text == client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2))).text


def test_verbose_json_segments_cover_a_long_clip(client):
    out = client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG), response_format="verbose_json",
                                             timestamp_granularities=["segment"], language="fr")
    assert out.language == "french" and out.duration == pytest.approx(40.0)
    assert out.usage.type == "duration" and out.usage.seconds == pytest.approx(40.0)
    segs = out.segments
    assert len(segs) == 2 and [s.id for s in segs] == [0, 1]
    assert segs[0].start == 0 and segs[-1].end == pytest.approx(40.0) and segs[0].end == segs[1].start
    assert 29.3 <= segs[0].end <= 29.7 + CUT_FRAME / RATE  # cut in the quiet gap, not at 30 s
    assert out.text == " ".join(s.text for s in segs if s.text)
    for s in segs:
        assert s.temperature == 0 and 0 <= s.no_speech_prob <= 1 and s.avg_logprob <= 0
        assert s.compression_ratio >= 0 and all(isinstance(t, int) for t in s.tokens)


def test_srt_and_vtt_have_the_segment_times(client):
    verbose = client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG), response_format="verbose_json")
    spoken = [s for s in verbose.segments if s.text]
    srt = client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG), response_format="srt")
    cues = SRT_CUE.findall(srt)
    assert SRT_CUE.sub("", srt).strip() == ""  # nothing but cues
    assert len(spoken) >= 2 and [int(c[0]) for c in cues] == list(range(1, len(spoken) + 1))
    for c, s in zip(cues, spoken):
        assert seconds(*c[1:5]) == pytest.approx(s.start, abs=1e-3)
        assert seconds(*c[5:9]) == pytest.approx(s.end, abs=1e-3)
        assert c[9] == " ".join(s.text.split())
    vtt = client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    vcues = VTT_CUE.findall(vtt)
    assert VTT_CUE.sub("", vtt[len("WEBVTT\n\n"):]).strip() == ""
    assert [(seconds(*c[0:4]), seconds(*c[4:8])) for c in vcues] == [
        (pytest.approx(s.start, abs=1e-3), pytest.approx(s.end, abs=1e-3)) for s in spoken]
    assert [c[8] for c in vcues] == [" ".join(s.text.split()) for s in spoken]


def test_stream_events_add_up_to_the_text(client):
    whole = client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG))
    events = list(client.audio.transcriptions.create(model="tiny", file=("long.wav", LONG), stream=True))
    deltas, done = events[:-1], events[-1]
    assert all(e.type == "transcript.text.delta" for e in deltas) and done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text == whole.text  # segments in order, joined once
    assert done.usage.type == "tokens" and done.usage.output_tokens == whole.usage.output_tokens


def test_prompt_and_language_reach_the_instruction(client):
    def prompt_tokens(**kw):
        return client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(1)), **kw).usage.input_tokens

    plain = prompt_tokens()
    assert prompt_tokens(prompt="Speakers: Anya Kowalczyk and Brno's mayor.") > plain + 5
    assert prompt_tokens(language="de") != plain  # "in German into German text" for "in its original language"


def test_logprobs_on_request(client):
    out = client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2)), include=["logprobs"])
    assert out.logprobs and all(lp.logprob <= 0 and lp.token is not None for lp in out.logprobs)
    assert client.audio.transcriptions.create(model="tiny", file=("a.wav", wav(2))).logprobs is None


def test_translations(client):
    out = client.audio.translations.create(model="tiny", file=("a.wav", wav(2)))
    assert isinstance(out.text, str)
    verbose = client.audio.translations.create(model="tiny", file=("long.wav", LONG), response_format="verbose_json")
    assert verbose.language == "english" and len(verbose.segments) == 2
    srt = client.audio.translations.create(model="tiny", file=("a.wav", wav(1)), response_format="srt")
    assert isinstance(srt, str) and SRT_CUE.sub("", srt).strip() == ""


def test_other_formats_decode(client):
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(RATE, np.float32), RATE, format="FLAC")
    out = client.audio.transcriptions.create(model="tiny", file=("a.flac", buf.getvalue()))
    assert out.usage.input_token_details.audio_tokens == 25


# -- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("files, data, param", [
    ({"file": ("a.wav", b"\x00garbage bytes, not audio" * 20)}, {}, "file"),
    ({"file": ("a.wav", b"")}, {}, "file"),
    ({}, {"model": "tiny"}, "file"),  # no file
    (None, {"language": "xx"}, "language"),
    (None, {"language": "english"}, "language"),
    (None, {"response_format": "diarized_json"}, "response_format"),
    (None, {"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "timestamp_granularities[]"),
    (None, {"timestamp_granularities[]": "segment"}, "timestamp_granularities[]"),  # needs verbose_json
    (None, {"include[]": "logprobs", "response_format": "text"}, "include[]"),
    (None, {"stream": "true", "response_format": "srt"}, "stream"),
    (None, {"temperature": "nan"}, "temperature"),
    (None, {"chunking_strategy": "auto"}, "chunking_strategy"),  # not implemented: refused, not ignored
])
def test_bad_requests_are_400_naming_the_field(server, files, data, param):
    r = post(server, files=files, **data)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_too_long_is_refused_before_decoding(server):
    # 130 s at 1 kHz (260 KB) is over the 4 × 30 s this server's queue takes: refused from the header
    r = post(server, files={"file": ("long.wav", wav(130, rate=1000))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_segments_are_submitted_all_or_none(server, monkeypatch):
    scheduler, taken = server.app.state.served.scheduler, []
    real = scheduler.submit

    def second_is_refused(*args, **kw):
        if taken:
            raise QueueFull("full")
        taken.append(real(*args, **kw))
        return taken[-1]

    monkeypatch.setattr(scheduler, "submit", second_is_refused)
    r = post(server, files={"file": ("long.wav", LONG)})
    assert r.status_code == 429 and r.headers["retry-after"]
    assert len(taken) == 1 and taken[0].cancelled  # the first segment does not run on alone


def test_translation_takes_no_stream(server):
    r = post(server, "/v1/audio/translations", stream="true")
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_a_model_without_ears_says_so(server, monkeypatch):
    monkeypatch.setattr(server.app.state.served.gemma.config, "audio", None)  # as a text-only checkpoint
    r = post(server)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_model_and_key(server):
    assert post(server, model="other").status_code == 200  # the one model answers any name (server/names.py)
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", wav(1))}, timeout=60)
    assert r.status_code == 401


# -- pieces ----------------------------------------------------------------------------------------
def test_split_cuts_at_the_quietest_frame():
    x = np.ones(70 * RATE, np.float32)
    x[int(29.5 * RATE) : int(29.5 * RATE) + CUT_FRAME] = 0  # the only quiet frame in the last second
    spans = split(x, 30 * RATE)
    assert spans[0] == (0, int(29.5 * RATE) + CUT_FRAME // 2)
    assert all(b - a <= 30 * RATE for a, b in spans) and spans[-1][1] == len(x)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert split(x[:100], 30 * RATE) == [(0, 100)]


@pytest.mark.parametrize("segments", [
    [[" Hello", " wor", "ld.  ", " "], ["  ", "Next\n", " one"]],
    [[" "], ["a"], [], ["  b  c ", "\n"]],
])
def test_joiner_deltas_add_up_to_the_joined_text(segments):
    joiner, out = Joiner(), []
    for pieces in segments:
        out += [joiner.feed(p) for p in pieces]
        joiner.end()
    assert "".join(out) == " ".join(t for t in ("".join(p).strip() for p in segments) if t)


def test_in_order_releases_segments_in_order():
    class D:
        def __init__(self, text, last=False):
            self.content, self.finish_reason = text, "stop" if last else None

    order = InOrder(2)
    assert order.push(1, D("b", last=True)) == []  # segment 1 waits for segment 0
    got = order.push(0, D("a"))
    assert [d.content for d in got] == ["a"]
    got = order.push(0, D("", last=True))
    assert [d and d.content for d in got] == ["", None, "b", None]


def test_translation_keeps_what_follows_the_english_mark():
    assert answer_text("Bonjour à tous.\nEnglish: Hello everyone.", translate=True) == "Hello everyone."
    assert answer_text("Hello everyone.", translate=True) == "Hello everyone."  # no transcription first
    assert answer_text("Bonjour\nEnglish: Hi", translate=False) == "Bonjour\nEnglish: Hi"
