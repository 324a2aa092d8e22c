"""Replay the security review's attacks (issue 15) against a real `unigemma serve` process and
measure what each one costs the server.

Starts `unigemma serve` (the demo checkpoint, 127.0.0.1 only, the default limits and --max-len)
in a scratch working directory that holds a real WAV and MP4 and FIFO tripwires, warms it up
with one request per media kind, then sends each attack class's cases one at a time, the server
otherwise idle. Per request: status, the server's CPU seconds (utime + stime of all its threads,
/proc/PID/stat) and its peak RSS growth (VmHWM after `echo 5 > clear_refs`, minus VmRSS before).
The server runs with MALLOC_MMAP_THRESHOLD_=65536, so the large blocks a request frees leave the
process (glibc's default, --malloc-default, keeps them once one was freed, and a request's peak
hides under memory an earlier one left); small blocks are still kept, so the growth is a lower
bound on a request's working memory. A tripwire is a FIFO: a non-blocking writer can open it
only while something has it open to read, so a watcher polls every FIFO through the whole run,
each request is followed by a check, and at the end FFmpeg left to probe an ffconcat text (in a
child process in the same cwd) must trip it. /metrics is compared with the statuses seen, per
class. A second, short run with --allow-url-fetch covers the URL cases with loopback and
malformed URLs only: nothing leaves this machine. Accepted requests per media kind give prompt
tokens and peak RSS growth (bytes per prompt token) for the README's memory formula.

Targets (issue 15): a rejected request costs at most 1 s of CPU and 200 MB of peak RSS; no 5xx;
no file outside the request is opened. GGUF attacks (class 7) are not server attacks: see
tests/test_gguf_hostile.py. Tables go to stderr; the last stdout line is one JSON object.

This file owns the attack cases per class, the run of each server, the tables and the JSON line;
the media and request bodies come from bench.hostile_media, the server subprocess, its
measurement, the tripwire and the loopback server from bench.attack_harness.

    python -m bench.attacks [--max-len 8192] [--budget-s 420] [--malloc-default]
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.attack_harness import MB, Bench, Server, Trickler, Tripwire, free_port, udp_ports
from bench.hostile_media import (FIFOS, M3U8, MPD, audio, build_media, chat, ffconcat, image, nest, sdp,
                                 tool_history, url_part, video)

CPU_TARGET_S, RSS_TARGET_MB = 1.0, 200.0


# --- the attack classes ------------------------------------------------------------------------
def warm_up(b: Bench, media: dict) -> None:
    """One accepted request per kind: processors, FFmpeg, the vision and audio paths are built once."""
    for body in (chat("hi"), chat([image(media["photo"])]), chat([audio(media["audio10"])]),
                 chat([video(media["short"])]), chat([image(media["photo"])], image_budget=1120)):
        b.request(body, timeout=120)


def local_files(b: Bench) -> None:
    cls = "1 local files via FFmpeg"
    for name, part in [
        ("ffconcat -> real.wav, input_audio", audio(ffconcat("real.wav"))),
        ("ffconcat -> miss.wav, input_audio", audio(ffconcat("miss.wav"))),  # same length: same message?
        ("ffconcat -> FIFO trip.wav, input_audio", audio(ffconcat("trip.wav"))),
        ("ffconcat (BOM, blank line) -> real.wav, input_audio", audio(ffconcat("real.wav", b"\xef\xbb\xbf\n"))),
        ("ID3 tag + ffconcat -> trip.wav, input_audio",
         audio(b"ID3\x04\x00\x00\x00\x00\x00\x00" + ffconcat("trip.wav"))),
        ("ffconcat -> real.mp4, data:video/mp4", video(ffconcat("real.mp4"))),
        ("ffconcat -> miss.mp4, data:video/mp4", video(ffconcat("miss.mp4"))),
        ("ffconcat -> FIFO trip.mp4, data:video/mp4", video(ffconcat("trip.mp4"))),
        ("m3u8 -> FIFO trip.ts, data:video/mp4", video(M3U8)),
        ("m3u8 -> FIFO trip.ts, input_audio", audio(M3U8)),
        ("mpd -> FIFO trip.mp4, data:video/mp4", video(MPD)),
        ("image2 pattern trip%03d.png, data:video/mp4", video(b"trip%03d.png")),
        ("image2 pattern trip%03d.png, input_audio", audio(b"trip%03d.png")),
    ]:
        b.case(cls, name, chat([part]))
    real = {r["case"].split(",")[0]: r.get("message") for r in b.rows if r["class"] == cls}
    same = (real["ffconcat -> real.wav"] == real["ffconcat -> miss.wav"]
            and real["ffconcat -> real.mp4"] == real["ffconcat -> miss.mp4"])
    b.rows[-1]["existence_oracle_closed"] = same


def memory(b: Bench, media: dict) -> None:
    cls = "2 memory amplification"
    tiny = media["tiny"]
    b.case(cls, f"60 x {len(tiny)} B PNG, image_budget 1120", chat([image(tiny)] * 60, image_budget=1120))
    b.case(cls, "33 x tiny PNG, image_budget 1120", chat([image(tiny)] * 33, image_budget=1120))
    b.case(cls, "32 x tiny PNG, image_budget 1120", chat([image(tiny)] * 32, image_budget=1120))
    b.case(cls, f"10,000^2 16-bit PNG ({len(media['deep']) // 1024} KB)", chat([image(media["deep"])]), timeout=120)
    b.case(cls, f"10,000^2 float TIFF ({len(media['tiff']) // 1024} KB)",
           chat([image(media["tiff"], "image/tiff")]), timeout=120)
    b.case(cls, f"4K x 32-frame H.264 ({len(media['uhd']) // 1024} KB)", chat([video(media["uhd"])]), timeout=120)


def sdp_attacks(b: Bench) -> None:
    cls = "3 SDP as audio/video"
    before = udp_ports()
    named = []
    for kind in ("audio", "video"):
        port = free_port(socket.SOCK_DGRAM)
        named += [port, port + 1]
        part = audio(sdp(port)) if kind == "audio" else video(sdp(port, "video"))
        b.case(cls, f"SDP as {kind} (UDP {port})", chat([part]))
    b.rows[-1]["udp_bound"] = bool((udp_ports() - before) & set(named))

    # 45 at once while a plain chat is timed
    def alone():
        t0 = time.monotonic()
        status, _ = b.request(chat("hi"))
        return status, time.monotonic() - t0

    ports = [free_port(socket.SOCK_DGRAM) for _ in range(45)]
    statuses, seen_udp, done = [], set(), threading.Event()

    def flood(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            part = audio(sdp(ports[i])) if i % 2 else video(sdp(ports[i], "video"))
            statuses.append(b.request(chat([part]), client=c, timeout=40)[0])

    def watch_udp() -> None:
        while not done.wait(0.02):
            seen_udp.update(udp_ports() - before)

    def burst():
        alone_status, plain_alone = alone()
        threads = [threading.Thread(target=flood, args=(i,)) for i in range(45)]
        watcher = threading.Thread(target=watch_udp)
        watcher.start()
        for t in threads:
            t.start()
        time.sleep(0.2)
        plain_status, plain = alone()
        for t in threads:
            t.join(45)
        done.set()
        watcher.join(5)
        hit = seen_udp & {p + d for p in ports for d in (0, 1)}
        return statuses + [alone_status, plain_status], {"plain_chat_alone_s": round(plain_alone, 3),
                                           "plain_chat_during_s": round(plain, 3), "udp_bound": bool(hit)}

    b.measure(cls, "45 SDP requests at once + 1 plain chat (+1 before)", burst)


def cpu_amplification(b: Bench, media: dict) -> None:
    cls = "4 CPU amplification"
    fps = media["fps20k"]
    b.case(cls, f"1000-fps header, 20,000 frames 1080p ({len(fps) // 1024} KB)", chat([video(fps)]), timeout=120)
    text = json.dumps(chat("a " * 15_000_000)).encode()
    b.case(cls, f"{len(text) / 1e6:.0f} MB text body", raw=text, timeout=120)
    del text
    enum = [f"v{i:05d}" + "x" * 1000 for i in range(20_000)]
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "enum": enum}}}}}]
    body = json.dumps(chat("hi", tools=tools)).encode()
    b.case(cls, f"20,000-entry tool enum ({len(body) / 1e6:.0f} MB)", raw=body, timeout=120)
    b.case(cls, f"1000-fps header, 2,000 frames 1080p ({len(media['fps2k']) // 1024} KB)",
           chat([video(media["fps2k"])]), timeout=120)


def client_500s(b: Bench, fetch: bool) -> None:
    cls = "5 500s on client input"
    if not fetch:
        b.case(cls, "lone surrogate, chat content string", raw=b'{"messages":[{"role":"user","content":"hi \\ud800"}],'
                                                               b'"max_tokens":1}')
        b.case(cls, "lone surrogate, chat text part", chat([{"type": "text", "text": "\udfff"}]))
        b.case(cls, "lone surrogate, completions prompt", {"prompt": "\ud800", "max_tokens": 1},
               path="/v1/completions")
        b.case(cls, "lone surrogate, completions prompt list", {"prompt": ["ok", "x\ud800"], "max_tokens": 1},
               path="/v1/completions")
        b.case(cls, "tool_calls arguments nested 700 deep (object)", tool_history(nest(700)))
        b.case(cls, "tool_calls arguments nested 700 deep (JSON text)", tool_history(json.dumps(nest(700))))
        b.case(cls, "tool_calls arguments: surrogate escape in JSON text", tool_history(json.dumps(nest(40, "\ud800"))))
    for url in ("http://example.com:99999/x.png", "http://a:b/x.png", "http://[::1/x.png",
                "http://127.0.0.1:8\r\n0/x.png"):
        b.case(cls, f"bad URL {url!r}" + (" (fetch on)" if fetch else " (fetch off)"), chat([url_part(url)]))


def slow_fetch(b: Bench) -> dict:
    """With fetch on, loopback is refused before connecting: each request must be refused well
    inside the fetch deadline and the trickler must see no connection."""
    cls = "6 slow URL fetch"
    with Trickler() as trickler:
        for host in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "2130706433"):
            for kind in ("image_url", "video_url"):
                url = f"http://{host}:{trickler.port}/x.png"
                b.case(cls, f"{kind} {url}", chat([url_part(url, kind)]), timeout=30)
    return {"trickler_connections": trickler.connections}


def fetch_deadline_in_process() -> list[dict]:
    """fetch() itself against the 1 byte/s server, its address check stubbed (loopback is not
    public): the client side of D7, measured in this process, not the server."""
    from unigemma.errors import InputError
    from unigemma.server import fetch as fetch_mod

    rows, real = [], fetch_mod.check_address
    fetch_mod.check_address = lambda address: None
    try:
        for slow_headers in (False, True):
            with Trickler(slow_headers) as t:
                t0, outcome = time.monotonic(), "returned"
                try:
                    fetch_mod.fetch(f"http://127.0.0.1:{t.port}/x.png", max_bytes=1 << 20, timeout=2.0)
                except InputError as e:
                    outcome = str(e)[:100]
            rows.append({"case": f"fetch(timeout=2.0), slow {'headers' if slow_headers else 'body'}",
                         "wall_s": round(time.monotonic() - t0, 2), "outcome": outcome})
    finally:
        fetch_mod.check_address = real
    return rows


def host_and_ssrf(b: Bench, fetch: bool) -> dict:
    cls = "8 Host header / SSRF forms"
    info = {}
    if not fetch:
        b.case(cls, "POST chat, Host: rebind.evil.example", chat("hi"), headers={"Host": "rebind.evil.example"})
        for path in ("/metrics", "/"):
            row = b.case(cls, f"GET {path}, Host: rebind.evil.example:80", path=path, method="GET",
                         headers={"Host": "rebind.evil.example:80"})
            row["method"] = "GET"
        row = b.case(cls, f"GET /health, Host: localhost:{b.server.port} (control)", path="/health", method="GET",
                     headers={"Host": f"localhost:{b.server.port}"})
        row["method"] = "GET"
        return info
    with Trickler() as trickler:
        for host in ("[::7f00:1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::ffff:7f00:1]"):
            url = f"http://{host}:{trickler.port}/x.png"
            b.case(cls, f"image_url {url}", chat([url_part(url)]), timeout=30)
    info["trickler_connections"] = trickler.connections
    return info


def accepted(b: Bench, media: dict) -> None:
    """Accepted requests per media kind, for the README's memory formula (after warm-up)."""
    cls = "accepted (memory formula)"
    b.case(cls, "text, 330 x 'lighthouse keeper '", chat("lighthouse keeper " * 330))
    b.case(cls, "text, 2,000 x 'lighthouse keeper '", chat("lighthouse keeper " * 2000), timeout=120)
    b.case(cls, "image 640x480, budget 280", chat([image(media["photo"])]))
    b.case(cls, "image 640x480, budget 1120", chat([image(media["photo"])], image_budget=1120))
    b.case(cls, "7 images 640x480, budget 1120", chat([image(media["photo"])] * 7, image_budget=1120), timeout=120)
    b.case(cls, "audio 10 s WAV", chat([audio(media["audio10"])]))
    b.case(cls, "video 16 frames 128x96", chat([video(media["short"])]))


# --- report ------------------------------------------------------------------------------------
def rejected(row: dict) -> bool:
    return any(isinstance(s, int) and 400 <= s < 500 for s in row["statuses"])


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for cls in dict.fromkeys(r["class"] for r in rows):
        mine = [r for r in rows if r["class"] == cls and "skipped" not in r]
        codes = collections.Counter(s for r in mine for s in r["statuses"])
        rej = [r for r in mine if rejected(r) and r["class"] != "accepted (memory formula)"]
        out.append({"class": cls, "cases": len(mine), "requests": sum(r["n"] for r in mine),
                    "statuses": {str(k): v for k, v in sorted(codes.items(), key=str)},
                    "max_cpu_s_per_rejected": max((r["cpu_s"] / r["n"] for r in rej), default=None),
                    "max_rss_growth_mb_rejected": max((r["rss_growth_mb"] for r in rej), default=None),
                    "max_rss_growth_mb": max((r["rss_growth_mb"] for r in mine), default=None),
                    "skipped": sum("skipped" in r for r in rows if r["class"] == cls)})
    return out


def print_tables(rows: list[dict], summary: list[dict]) -> None:
    err = sys.stderr
    for cls in dict.fromkeys(r["class"] for r in rows):
        print(f"\n## {cls}\n{'case':<62} {'status':<16} {'CPU s':>6} {'+RSS MB':>8} {'wall s':>7}  note", file=err)
        for r in (r for r in rows if r["class"] == cls):
            if "skipped" in r:
                print(f"{r['case'][:62]:<62} skipped ({r['skipped']})", file=err)
                continue
            codes = collections.Counter(r["statuses"])
            st = " ".join(f"{k}" if v == 1 else f"{k}x{v}" for k, v in codes.items())
            note = (f"{r['prompt_tokens']} prompt tokens, {r['bytes_per_prompt_token'] / 1024:.0f} KiB/token"
                    if r.get("prompt_tokens") else r.get("message", ""))
            extra = {k: r[k] for k in ("plain_chat_alone_s", "plain_chat_during_s", "udp_bound",
                                       "existence_oracle_closed") if k in r}
            print(f"{r['case'][:62]:<62} {st[:16]:<16} {r['cpu_s']:>6.2f} {r['rss_growth_mb']:>8.1f} "
                  f"{r['wall_s']:>7.2f}  {note[:90]}{' ' + json.dumps(extra) if extra else ''}", file=err)
    print(f"\n## summary (targets: rejected <= {CPU_TARGET_S} s CPU, <= {RSS_TARGET_MB:.0f} MB; 0 x 5xx)", file=err)
    print(f"{'class':<30} {'cases':>5} {'reqs':>5}  {'statuses':<26} {'max CPU s/rej':>13} {'max MB rej':>10} "
          f"{'max MB any':>10}", file=err)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for s in summary:
        st = " ".join(f"{k}x{v}" for k, v in s["statuses"].items())
        print(f"{s['class'][:30]:<30} {s['cases']:>5} {s['requests']:>5}  {st[:26]:<26} "
              f"{fmt(s['max_cpu_s_per_rejected']):>13} {fmt(s['max_rss_growth_mb_rejected']):>10} "
              f"{fmt(s['max_rss_growth_mb']):>10}", file=err)


# --- main --------------------------------------------------------------------------------------
def run_server(cwd: Path, args, fetch: bool, deadline: float, media: dict | None) -> tuple[list, list, dict, dict]:
    server = Server(cwd, args.max_len, fetch, args.malloc_default)
    trip = Tripwire(cwd, FIFOS) if not fetch else None
    extra, info = {}, {}
    try:
        server.wait_ready(max(30.0, min(240.0, deadline - time.monotonic())))
        info = {"pid": server.pid, "idle_rss_mb": round(server.mem("VmRSS") / MB, 1)}
        b = Bench(server, trip, deadline, "fetch" if fetch else "plain")
        t0 = time.monotonic()
        b.request(chat("hi"))
        if media:
            warm_up(b, media)
        info["warm_up_s"] = round(time.monotonic() - t0, 1)
        c0, t0 = server.cpu(), time.monotonic()
        time.sleep(1.0)
        info["idle_cpu_s_per_s"] = round((server.cpu() - c0) / (time.monotonic() - t0), 3)
        info["rss_after_warm_up_mb"] = round(server.mem("VmRSS") / MB, 1)
        steps = ([(lambda: local_files(b), "1 local files via FFmpeg"),
                  (lambda: memory(b, media), "2 memory amplification"),
                  (lambda: sdp_attacks(b), "3 SDP as audio/video"),
                  (lambda: cpu_amplification(b, media), "4 CPU amplification"),
                  (lambda: client_500s(b, False), "5 500s on client input"),
                  (lambda: extra.update(host=host_and_ssrf(b, False)), "8 Host header / SSRF forms"),
                  (lambda: accepted(b, media), "accepted (memory formula)")] if not fetch else
                 [(lambda: client_500s(b, True), "5 500s on client input"),
                  (lambda: extra.update(slow_fetch=slow_fetch(b)), "6 slow URL fetch"),
                  (lambda: extra.update(ssrf=host_and_ssrf(b, True)), "8 Host header / SSRF forms")])
        for step, cls in steps:
            before = b.metrics()
            step()
            b.check_metrics(cls, before)
        info["health_after"] = b.request(path="/health", method="GET")[0]
        info["final_metrics"] = b.request(path="/metrics?format=json", method="GET")[1]
        b.client.close()
        if trip:
            opened = list(trip.opened)
            extra["tripwire"] = {"opened": opened, "anomalies": trip.anomalies,
                                 "still_fifos": all(p.is_fifo() for p in trip.paths),
                                 "control_detected": trip.control(ffconcat("trip.wav"))}
            trip.stop()
        return b.rows, b.metrics_checks, extra, info
    except BaseException:
        print(f"server log tail:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        if trip:
            trip.stop()
        server.stop()
        info["exit_code"] = server.proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-len", type=int, default=8192, help="the server's --max-len (its default: 8192)")
    p.add_argument("--budget-s", type=float, default=420, help="the whole run's deadline")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold on in the server (peaks then hide under kept memory)")
    args = p.parse_args()
    start = time.monotonic()
    deadline = start + args.budget_s
    media = build_media()
    cwd = Path(tempfile.mkdtemp(prefix="unigemma-attacks-"))
    (cwd / "real.wav").write_bytes(media["real_wav"])
    (cwd / "real.mp4").write_bytes(media["real_mp4"])
    try:
        rows, checks, extra, plain_info = run_server(cwd, args, False, deadline - 40, media)
        rows2, checks2, extra2, fetch_info = run_server(cwd, args, True, deadline, None)
        in_process = fetch_deadline_in_process()
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    rows += rows2
    checks += checks2
    for r in rows:
        if r.get("prompt_tokens"):
            r["bytes_per_prompt_token"] = round(r["rss_growth_mb"] * MB / r["prompt_tokens"])
    summary = summarize(rows)
    print_tables(rows, summary)
    print("\n## in-process fetch() deadline (D7; not via the server)", file=sys.stderr)
    for r in in_process:
        print(f"{r['case']:<40} {r['wall_s']:>6.2f} s  {r['outcome']}", file=sys.stderr)
    print("\n## /metrics: each request counted once", file=sys.stderr)
    for c in checks:
        print(f"{c['run']:<6} {c['class']:<30} {'ok' if c['ok'] else 'MISMATCH'} expected {c['expected']} "
              f"counted {c['counted']}", file=sys.stderr)

    hostile = [r for r in rows if "skipped" not in r and r["class"] != "accepted (memory formula)"]
    rej = [r for r in hostile if rejected(r)]
    five = [r["case"] for r in rows if any(isinstance(s, int) and s >= 500 for s in r["statuses"])
            or any(not isinstance(s, int) for s in r["statuses"])]
    opened = bool(extra.get("tripwire", {}).get("opened")) or any(r.get("tripwire") for r in rows)
    checks_pass = {
        "rejected_cpu_le_1s": all(r["cpu_s"] / r["n"] <= CPU_TARGET_S for r in rej),
        "rejected_rss_le_200mb": all(r["rss_growth_mb"] <= RSS_TARGET_MB for r in rej),
        "no_5xx_or_timeouts": not five,
        "tripwire_never_opened": not opened and not extra.get("tripwire", {}).get("anomalies"),
    }
    other = {
        "metrics_each_outcome_once": all(c["ok"] for c in checks),
        "no_udp_bound_by_sdp": not any(r.get("udp_bound") for r in rows),
        "no_request_reached_the_loopback_listener": extra2.get("slow_fetch", {}).get("trickler_connections", 1) == 0
        and extra2.get("ssrf", {}).get("trickler_connections", 1) == 0,
        "tripwire_control_detected": extra.get("tripwire", {}).get("control_detected", False),
        "fetch_deadline_held_in_process": all(r["wall_s"] < 3.0 and r["outcome"] != "returned" for r in in_process),
        "no_case_skipped": not any("skipped" in r for r in rows),
    }
    over = [{"case": r["case"], "cpu_s": r["cpu_s"], "rss_growth_mb": r["rss_growth_mb"]} for r in rej
            if r["cpu_s"] / r["n"] > CPU_TARGET_S or r["rss_growth_mb"] > RSS_TARGET_MB]
    print(f"\npass: {all(checks_pass.values())} {checks_pass}\nother checks: {other}\nover target: {over}\n"
          f"5xx/timeouts: {five}\nrun took {time.monotonic() - start:.0f} s", file=sys.stderr)

    import torch

    from bench.machine import machine

    threads = torch.get_num_threads()
    print(json.dumps({"bench": "attacks", "model": "demo", "server_max_len": args.max_len, "server_max_seqs": 2,
                      "server_malloc": "default" if args.malloc_default else "MALLOC_MMAP_THRESHOLD_=65536",
                      "pass": all(checks_pass.values()), "targets": checks_pass, "other_checks": other,
                      "over_target": over, "five_xx": five, "summary": summary, "rows": rows,
                      "metrics_checks": checks, "fetch_in_process": in_process, "extra": {**extra, **extra2},
                      "servers": {"plain": plain_info, "fetch": fetch_info},
                      "run_s": round(time.monotonic() - start, 1), **machine(threads)}, default=str))


if __name__ == "__main__":
    main()
