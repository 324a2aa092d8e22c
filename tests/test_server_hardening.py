"""The server against hostile input (issue 15): client data never gives a 5xx, URL fetches keep a
total deadline, the Host header is checked, media work cannot starve plain chat, metrics count
each outcome once, and a shutdown ends running replies after --shutdown-timeout (in a thread
and as a real `unigemma serve` process taking SIGTERM). Loopback only; every wait is bounded."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import anyio.to_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import Running, free_port, tiny_checkpoint, tiny_gemma, wav_base64

from unigemma.errors import InputError
from unigemma.server import ServerConfig, convert, create_app, fetch, guard
from unigemma.server.convert import Limits
from unigemma.server.serve import make_server

DEEP = 700  # past the ~600 levels that once overflowed the chat template's recursion


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def gemma(root):
    return tiny_gemma(root)


@pytest.fixture(scope="module")
def server(gemma):
    config = ServerConfig(max_seqs=2, max_len=128, max_queue=8, max_tokens_default=4, max_body_bytes=1 << 20,
                          limits=Limits(allow_url_fetch=True, max_media_bytes=256 << 10))
    app = create_app(gemma, config)
    with Running(app) as s:
        s.meter = app.state.meter
        yield s
        app.state.scheduler.stop()


def post(server, raw, path="/v1/chat/completions", headers=None, timeout=60):
    if not isinstance(raw, (str, bytes)):
        raw = json.dumps(raw)
    return httpx.post(server.url + path, content=raw, timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def refused(r, status=400) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def chat(content, **kw):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def nest(depth: int, leaf=1):
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


# -- D6: no 500 for what a client sends -------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", chat("hi \ud800"), "messages[0].content"),
    ("/v1/chat/completions", chat([{"type": "text", "text": "\udfff"}]), "messages[0].content[0].text"),
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "x\ud800"], "max_tokens": 2}, "prompt[1]"),
    ("/v1/chat/completions", chat("hi", stop=["\ud800"]), "stop[0]"),
    ("/v1/chat/completions", chat("hi", tools=[{**TOOL, "function": {**TOOL["function"], "description": "\ud83d"}}]),
     "tools[0].function.description"),
    ("/v1/chat/completions", chat("hi", model="\ud800"), "model"),
    ("/v1/chat/completions", chat("hi", metadata={"\ud800": 1}), "metadata"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, field):
    e = refused(post(server, json.dumps(body), path=path))  # json.dumps writes them as \ud800 escapes
    assert e["param"] == field and "surrogate" in e["message"]


def test_deep_nesting_is_400(server):
    history = lambda args: {"messages": [  # noqa: E731
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f",
                                                                                          "arguments": args}}]},
        {"role": "user", "content": "x"}], "max_tokens": 2}
    for args in (nest(DEEP), json.dumps(nest(DEEP)), "[" * 100_000 + "]" * 100_000,
                 json.dumps(nest(40, "\ud800"))):  # escapes inside the JSON text spell a surrogate
        e = refused(post(server, history(args)))
        assert "arguments" in (e["param"] or "") + e["message"], e
    tool = {**TOOL, "function": {**TOOL["function"], "parameters": nest(DEEP)}}
    assert "nested deeper" in refused(post(server, chat("hi", tools=[tool])))["message"]
    refused(post(server, '{"x": ' + "[" * 100_000 + "]" * 100_000 + ', "messages": []}'))
    ok = post(server, history(json.dumps(nest(20))))  # an ordinary nest still works
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("url", ["http://example.com:99999/x.png", "http://a:b/x.png", "http://[::1/x.png",
                                 "http://[::7f00:1]/x.png", "http://[64:ff9b::7f00:1]/x.png",
                                 "http://[2002:7f00:1::]/x.png", "http://" + "a" * 70 + ".example/x.png"])
def test_bad_urls_are_400(server, url):
    e = refused(post(server, chat([{"type": "image_url", "image_url": {"url": url}}])))
    assert e["param"] == "messages[0].content[0]" or "messages" in e["message"]


def test_a_crash_is_500_without_details_and_counted(server, gemma, monkeypatch):
    def boom(_):
        raise RuntimeError("secret internal path /home/x")
    monkeypatch.setattr(gemma.tokenizer, "encode", boom)
    before = dict(server.meter.requests)
    e = refused(post(server, {"prompt": "hi", "max_tokens": 2}, path="/v1/completions"), 500)
    assert "RuntimeError" in e["message"] and "secret" not in e["message"]
    assert server.meter.requests["failed"] == before["failed"] + 1


# property test: the client-input classes the review found, mixed into otherwise valid bodies
NUMBERS = st.sampled_from([0, -1, 1, 2, -(10**100), 10**100, 2**63, 2**64, -(2**63), 1e308, -1e308, 5e-324,
                           float("nan"), float("inf"), float("-inf"), 0.5, True, "7", None])
TEXT = st.text(st.characters(codec=None, categories=None), max_size=12) | st.sampled_from(
    ["\ud800", "a\udc00b", "<|image|>", "\x00", "", "<turn|>"])
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "top_logprobs", "logprobs", "image_budget"]
MAGIC = [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"RIFF\xff\xff\xff\xffWAVEfmt ", b"\x00\x00\x00\x18ftypmp42",
         b"GIF89a", b"\xff\xd8\xff", b"fLaC", b"OggS", b"ffconcat version 1.0\nfile x.wav\n", b"v=0\n"]


@st.composite
def media_part(draw):
    raw = draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=48))
    b64 = base64.b64encode(raw).decode()
    kind = draw(st.sampled_from(["image_url", "video_url", "input_audio"]))
    if kind == "input_audio":
        return {"type": kind, "input_audio": {"data": b64, "format": "wav"}}
    return {"type": kind, kind: {"url": f"data:application/octet-stream;base64,{b64}"}}


@st.composite
def hostile(draw):
    part = st.one_of(TEXT.map(lambda t: {"type": "text", "text": t}), media_part())
    content = draw(st.one_of(TEXT, st.lists(part, min_size=1, max_size=2)))
    if draw(st.booleans()):
        path, body = "/v1/completions", {"prompt": draw(st.one_of(TEXT, st.lists(TEXT, max_size=3)))}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": content}]}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[name] = draw(NUMBERS)
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(TEXT, max_size=2))
    if draw(st.integers(0, 4)) == 0:
        body["extra"] = nest(draw(st.sampled_from([5, 63, 64, 65, 200, 900])))
    body.setdefault("max_tokens", 3)
    return path, json.dumps(body)  # NaN / Infinity go out as the literals a lax client sends


def test_hostile_inputs_never_give_5xx(server):
    seen = {}

    @given(case=hostile())
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        path, raw = case
        r = post(server, raw, path=path)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (raw[:300], r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    print(f"\nhostile inputs: statuses {seen}")
    assert seen.get(400) and seen.get(200)


# -- D7: one deadline for the whole fetch -------------------------------------------------------
def _trickler(headers_first: bool):
    """A 127.0.0.1 server sending one byte a second: the body, or the header lines themselves."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                if headers_first:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    drip = b"x" * 30
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    drip = b"X-Slow: " + b"a" * 30
                try:
                    for byte in drip:
                        if stop.wait(1.0):
                            break
                        conn.sendall(bytes([byte]))
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return listener, stop


@pytest.mark.parametrize("headers_first", [True, False], ids=["slow-body", "slow-headers"])
def test_fetch_deadline_holds_against_a_trickling_server(monkeypatch, headers_first):
    monkeypatch.setattr(fetch, "check_address", lambda a: None)
    listener, stop = _trickler(headers_first)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    try:
        t0 = time.monotonic()
        with pytest.raises(InputError, match="longer than 1.0 s"):
            fetch.fetch(url, max_bytes=1 << 20, timeout=1.0)
        assert time.monotonic() - t0 < 1.5
    finally:
        stop.set()
        listener.close()


@pytest.mark.parametrize("address", ["::7f00:1", "::10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::1",
                                     "2002:7f00:1::", "2002:a9fe:a9fe::1", "2001:0:4136:e378:8000:63bf:80ff:fffe"])
def test_ipv6_forms_carrying_private_ipv4_are_refused(address):
    with pytest.raises(InputError, match="not a public address"):
        fetch.check_address(address)


def test_ipv6_forms_carrying_public_ipv4_pass():
    fetch.check_address("64:ff9b::808:808")  # NAT64 to 8.8.8.8
    fetch.check_address("2002:808:808::1")  # 6to4 from 8.8.8.8


# -- D10, D11: API key sources, Host check -------------------------------------------------------
def test_host_header_is_checked(server):
    assert refused(post(server, chat("hi"), headers={"Host": "rebind.evil.example"}))["code"] == "host_not_allowed"
    assert httpx.get(server.url + "/metrics", headers={"Host": "rebind.evil.example:80"}).status_code == 400
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert httpx.get(server.url + "/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_defaults():
    names, any_ip = guard.allowed_hosts("127.0.0.1")
    assert set(names) == {"localhost", "127.0.0.1", "::1"} and not any_ip
    names, any_ip = guard.allowed_hosts("192.0.2.7", ["Chat.Example.com", "[2001:db8::1]"])
    assert {"192.0.2.7", "chat.example.com", "2001:db8::1"} <= set(names) and any_ip
    check = guard.HostCheck(None, names, any_ip)
    assert check.allows(b"chat.example.com:8000") and check.allows(b"198.51.100.1") and check.allows(b"[fe80::1]")
    assert not check.allows(b"evil.example") and not check.allows(b"chat.example.com.evil.example")
    assert guard.HostCheck(None, ("*",)).allows(b"anything") and guard.HostCheck(None, ()).allows(None)


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    from argparse import Namespace

    from unigemma.cli import _api_key
    from unigemma.errors import UnigemmaError

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("UNIGEMMA_API_KEY", "from-env")
    assert _api_key(Namespace(api_key="from-flag", api_key_file=str(key_file))) == "from-flag"
    assert _api_key(Namespace(api_key=None, api_key_file=str(key_file))) == "from-file"
    assert _api_key(Namespace(api_key=None, api_key_file=None)) == "from-env"
    monkeypatch.delenv("UNIGEMMA_API_KEY")
    assert _api_key(Namespace(api_key=None, api_key_file=None)) is None
    with pytest.raises(UnigemmaError, match="cannot read"):
        _api_key(Namespace(api_key=None, api_key_file=str(tmp_path / "missing")))


# -- D12: every outcome counted once ------------------------------------------------------------
def test_metrics_count_each_outcome_once(server):
    m = server.meter.requests
    before = dict(m)
    refused(post(server, "{"))  # bad JSON
    refused(post(server, chat("hi", temperature=9)))  # bad field
    refused(post(server, chat([{"type": "hologram"}])))  # bad part (InputError)
    refused(post(server, chat("hi"), headers={"Host": "evil.example"}))  # Host
    refused(post(server, "x" * (2 << 20)), 413)  # body
    assert post(server, chat("hi")).status_code == 200
    assert m["rejected"] == before["rejected"] + 5 and m["ok"] == before["ok"] + 1
    before = dict(m)
    with httpx.Client(timeout=60) as c:  # a stream the client hangs up on
        with c.stream("POST", server.url + "/v1/chat/completions",
                      json=chat("x", max_tokens=120, stream=True, ignore_eos=True)) as r:
            next(r.iter_lines())
    deadline = time.time() + 10
    while m["disconnected"] == before["disconnected"] and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert m["disconnected"] == before["disconnected"] + 1 and m["cancelled"] == before["cancelled"]
    assert sum(m.values()) == sum(before.values()) + 1


# -- D3: media work on its own bounded pool -----------------------------------------------------
def test_a_media_flood_does_not_delay_plain_chat(gemma, monkeypatch):
    real = convert._b64

    def stuck_decoder(data, where, limits):  # as SDP text once held a thread for 10–20 s
        time.sleep(2.0)
        return real(data, where, limits)

    monkeypatch.setattr(convert, "_b64", stuck_decoder)
    app = create_app(gemma, ServerConfig(max_seqs=2, max_len=512, max_tokens_default=2, media_workers=2,
                                         media_queue=2))
    audio = [{"type": "input_audio", "input_audio": {"data": wav_base64(0.2), "format": "wav"}}, {"type": "text",
                                                                                              "text": "hi"}]
    async def starve():  # the shared pool as 45 stuck requests left it: 2 threads, not 40
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2

    app.add_api_route("/test-starve", starve)
    with Running(app) as s:
        assert httpx.get(s.url + "/test-starve").status_code == 200
        assert post(s, chat("hi")).status_code == 200  # warm: the first request builds the processor
        t0 = time.monotonic()
        assert post(s, chat("hi")).status_code == 200
        alone = time.monotonic() - t0
        answers = []

        def media():
            t0 = time.monotonic()
            r = post(s, chat(audio))
            answers.append((r.status_code, time.monotonic() - t0))

        flood = [threading.Thread(target=media) for _ in range(8)]
        for t in flood:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert post(s, chat("hi")).status_code == 200
        plain = time.monotonic() - t0
        for t in flood:
            t.join(30)
        app.state.scheduler.stop()
    print(f"\nplain chat: {alone:.2f} s alone, {plain:.2f} s during a media flood; media {sorted(answers)}")
    assert plain < alone + 0.75  # on the shared pool it would wait for a stuck media thread (>= 1.7 s)
    assert sorted(code for code, _ in answers) == [200] * 4 + [429] * 4  # 2 decoding + 2 waiting; 4 refused
    assert all(t < 1.0 for code, t in answers if code == 429)  # refused at once, not after a wait


# -- D9: a bounded shutdown ---------------------------------------------------------------------
def _stream_lines(url, body, out: list, headers=None):
    try:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers or {}) as r:
                out.append(r.status_code)
                for line in r.iter_lines():
                    if line:
                        out.append(line)
    except httpx.HTTPError as e:
        out.append(repr(e))


def test_shutdown_ends_running_replies_after_the_grace(gemma):
    app = create_app(gemma, ServerConfig(max_seqs=2, max_len=256))
    port = free_port()
    server = make_server(app, "127.0.0.1", port, shutdown_timeout=1.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    scheduler = app.state.scheduler
    scheduler.stop()  # the replies wait in the queue: still running when the grace ends
    url = f"http://127.0.0.1:{port}"
    streamed, whole = [], {}
    clients = [threading.Thread(target=_stream_lines, args=(url, chat("x", stream=True), streamed)),
               threading.Thread(target=lambda: whole.update(r=httpx.post(url + "/v1/chat/completions",
                                                                         json=chat("x"), timeout=60)))]
    for c in clients:
        c.start()
    while len(scheduler.waiting) < 2 and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.monotonic()
    server.should_exit = True
    thread.join(10)
    took = time.monotonic() - t0
    for c in clients:
        c.join(10)
    print(f"\nshutdown with 2 replies running, --shutdown-timeout 1: {took:.2f} s")
    assert not thread.is_alive() and 1.0 <= took < 2.5
    assert streamed[0] == 200 and streamed[-1] == "data: [DONE]", streamed
    assert json.loads(streamed[-2][6:])["error"]["code"] == "server_shutting_down"
    assert refused(whole["r"], 503)["code"] == "server_shutting_down"
    assert app.state.meter.requests["cancelled"] == 2


def test_sigterm_ends_a_serve_process_within_the_timeout(root, tmp_path):
    from unigemma.vocab import gemma4_vocab_gguf

    key = tmp_path / "key"
    key.write_text("k3y\n")
    port, ckpt = free_port(), tiny_checkpoint(root)
    proc = subprocess.Popen([sys.executable, "-m", "unigemma", "serve", "--model", str(ckpt), "--dtype", "float32",
                             "--tokenizer", str(gemma4_vocab_gguf()), "--port", str(port), "--api-key-file", str(key),
                             "--max-seqs", "1", "--max-len", "2048", "--shutdown-timeout", "1"],
                            stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the file
        body = chat("x", stream=True, max_tokens=2000, ignore_eos=True)
        # one row: the streams run one after another (the tiny model is fast), so some are
        # still running or waiting when the grace ends
        outs = [[] for _ in range(6)]
        clients = [threading.Thread(target=_stream_lines, args=(url, body, out, auth)) for out in outs]
        for c in clients:
            c.start()
        while max(map(len, outs)) < 3 and time.time() < deadline:  # one has the row: status, role chunk, a token
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        took = time.monotonic() - t0
        for c in clients:
            c.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    ended = sum("server_shutting_down" in out[-2] for out in outs)
    print(f"\nserve process exit after SIGTERM with 6 streams, --shutdown-timeout 1: {took:.2f} s; "
          f"{ended} ended by the server, {[len(out) for out in outs]} lines")
    assert took < 3.5 and ended >= 1
    for out in outs:  # every stream ends cleanly: finished, or an error event, then [DONE]
        assert out[0] == 200 and out[-1] == "data: [DONE]", out[-3:]
        assert "server_shutting_down" in out[-2] or '"finish_reason": "length"' in out[-2]
