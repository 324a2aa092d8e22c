"""The measuring side of bench.attacks: `unigemma serve` as a subprocess, what a request costs
it, and the traps that show a request reached further than it should.

Owns: the server subprocess (Server), its CPU seconds (utime + stime of all its threads,
/proc/PID/stat) and peak RSS growth (VmHWM after `echo 5 > clear_refs`, minus VmRSS before),
the FIFO tripwire (Tripwire), the bound-UDP-port probe, the 1 byte/s loopback HTTP server
(Trickler) and the request runner that records one row per case and checks /metrics (Bench).
It knows no attack and builds no media (bench.attacks, bench.hostile_media).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

MB = 1 << 20
CLK = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`unigemma serve` on 127.0.0.1 in `cwd`, as a subprocess; killed on exit, whatever happened."""

    def __init__(self, cwd: Path, max_len: int, fetch: bool, malloc_default: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("unigemma")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "unigemma"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--max-len", str(max_len),
                "--max-seqs", "2", "--shutdown-timeout", "1"] + (["--allow-url-fetch"] if fetch else [])
        self.log_path = cwd / f"serve-{'fetch' if fetch else 'plain'}.log"
        self.log = open(self.log_path, "w")
        # A fixed mmap threshold: blocks over 64 KiB are mmapped and unmapped when freed. glibc's
        # default raises the threshold after the first large free and keeps what later requests
        # free, so a request's peak would hide under the memory an earlier one left resident.
        env = {**os.environ} if malloc_default else {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unigemma serve exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"unigemma serve not ready in {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def cpu(self) -> float:
        fields = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK  # utime, stime: every thread's

    def mem(self, key: str) -> int:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class Tripwire:
    """FIFOs in the server's cwd. Opening one O_WRONLY|O_NONBLOCK fails with ENXIO unless a
    reader has it open (a reader blocked in open() counts, and is released by it)."""

    def __init__(self, cwd: Path, names: tuple[str, ...]):
        self.paths = [cwd / name for name in names]
        for p in self.paths:
            os.mkfifo(p)
        self.opened: list[str] = []
        self.anomalies: list[str] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def check(self) -> bool:
        """True when a FIFO had a reader now."""
        hit = False
        for p in self.paths:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                self.opened.append(p.name)
                hit = True
            except OSError as e:
                if e.errno != errno.ENXIO:
                    self.anomalies.append(f"{p.name}: {e}")
        return hit

    def _watch(self) -> None:
        while not self._done.wait(0.01):
            self.check()

    def control(self, probe: bytes) -> bool:
        """Whether the watcher sees FFmpeg, left to probe `probe` (a text naming a FIFO) in a child
        process with the same cwd, open a FIFO: the tripwire itself works."""
        before = len(self.opened)
        script = f"import av, io\ntry:\n av.open(io.BytesIO({probe!r}))\nexcept Exception:\n pass"
        try:
            subprocess.run([sys.executable, "-c", script], cwd=self.paths[0].parent, timeout=30, capture_output=True)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.05)
        return len(self.opened) > before

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


def udp_ports() -> set[int]:
    """Local UDP ports bound in this network namespace."""
    ports = set()
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            for line in open(name).readlines()[1:]:
                ports.add(int(line.split()[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


class Trickler:
    """A 127.0.0.1 HTTP server sending one byte a second (the body, or the header lines); counts
    connections, so a request that never reached it shows 0."""

    def __init__(self, slow_headers: bool = False):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port, self.connections, self.slow_headers = self.listener.getsockname()[1], 0, slow_headers
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn) -> None:
        with conn:
            try:
                conn.settimeout(2)
                conn.recv(4096)
                head, drip = ((b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 60) if self.slow_headers else
                              (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"x" * 60))
                conn.sendall(head)
                for byte in drip:
                    if self._stop.wait(1.0):
                        break
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()

    def __enter__(self) -> Trickler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Bench:
    """Sends cases to one server and records rows; every wait is bounded by the run's deadline."""

    def __init__(self, server: Server, trip: Tripwire | None, deadline: float, run: str):
        self.server, self.trip, self.deadline, self.run = server, trip, deadline, run
        self.client = httpx.Client(timeout=60)
        self.rows: list[dict] = []
        self.metrics_checks: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def request(self, body=None, *, path="/v1/chat/completions", raw: bytes | None = None, headers=None,
                method="POST", client=None, timeout=60.0) -> tuple:
        """(status or 'timeout'/'error', parsed JSON or None)."""
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        try:
            r = (client or self.client).request(method, self.server.url + path, content=raw,
                                                timeout=max(1.0, min(timeout, self.left())),
                                                headers={"Content-Type": "application/json", **(headers or {})})
        except httpx.TimeoutException:
            return "timeout", None
        except httpx.HTTPError as e:
            return f"error:{type(e).__name__}", None
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None

    def measure(self, cls: str, case: str, fn) -> dict:
        """Run `fn() -> (statuses, info)` with the server's CPU and peak RSS around it."""
        if self.left() < 5:
            row = {"class": cls, "case": case, "run": self.run, "skipped": "out of time", "statuses": []}
            self.rows.append(row)
            return row
        time.sleep(0.05)  # let the previous request's tail settle
        s = self.server
        rss0 = s.mem("VmRSS")
        s.reset_peak()
        cpu0, t0 = s.cpu(), time.monotonic()
        statuses, info = fn()
        wall = time.monotonic() - t0
        time.sleep(0.05)  # work finishing just after the response still counts
        cpu, peak, kept = s.cpu() - cpu0, s.mem("VmHWM") - rss0, s.mem("VmRSS") - rss0
        opened = self.trip.check() if self.trip else False
        row = {"class": cls, "case": case, "run": self.run, "statuses": statuses, "n": len(statuses),
               "cpu_s": round(cpu, 2), "rss_growth_mb": round(peak / MB, 1), "rss_kept_mb": round(kept / MB, 1),
               "wall_s": round(wall, 2),
               "tripwire": opened, **info}
        self.rows.append(row)
        return row

    def case(self, cls: str, case: str, body=None, **kw) -> dict:
        def once():
            status, reply = self.request(body, **kw)
            info = {}
            if isinstance(reply, dict) and "error" in reply:
                info["message"] = str(reply["error"].get("message"))[:160]
            elif isinstance(reply, dict) and "usage" in reply:
                info["prompt_tokens"] = reply["usage"]["prompt_tokens"]
            return [status], info
        return self.measure(cls, case, once)

    def metrics(self) -> dict:
        status, reply = self.request(path="/metrics?format=json", method="GET")
        return dict(reply["requests"]) if status == 200 else {}

    def check_metrics(self, cls: str, before: dict) -> None:
        """Each request counted once: ok = 2xx, rejected = 4xx (refused GETs too), failed = 5xx."""
        after, want = self.metrics(), collections.Counter()
        for row in self.rows:
            if row["class"] != cls or row["run"] != self.run:
                continue
            for st in row["statuses"]:
                if isinstance(st, int) and (row.get("method") != "GET" or st >= 400):
                    want["ok" if st < 300 else "rejected" if st < 500 else "failed"] += 1
                elif not isinstance(st, int):
                    want["disconnected"] += 1
        got = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        self.metrics_checks.append({"class": cls, "run": self.run, "expected": dict(want),
                                    "counted": {k: v for k, v in got.items() if v},
                                    "ok": all(got.get(k, 0) == want.get(k, 0) for k in set(got) | set(want))})
