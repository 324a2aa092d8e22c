"""N `unigemma serve` replicas and SGLang's router in front of them, as processes on loopback.

What README "Scaling out" documents, one command line per process, started from Python for
tests/test_router.py and bench/router.py: each replica is `python -m unigemma serve ... --port P`,
the router `python -m sglang_router.launch_router --worker-urls URL... --policy POLICY --port R`.
The router is ready once its /workers lists every replica healthy. Every process started is
ended (SIGTERM, then SIGKILL) when the `with` ends, also on an error; their output (`logs`) is
deleted then, unless the `with` ended with an error.

    with Replicas(ckpt, tokenizer, n=2, policy="round_robin") as r:
        httpx.post(r.router_url + "/v1/chat/completions", json=...)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode} before it was ready")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


class Replicas:
    """`n` replicas of `model` behind the router with `policy` (round_robin, cache_aware, ...)."""

    def __init__(self, model, tokenizer=None, n: int = 2, policy: str = "round_robin", threads: int = 1,
                 serve_args: tuple[str, ...] = (), router_args: tuple[str, ...] = ()):
        self.model, self.tokenizer, self.n, self.policy, self.threads = model, tokenizer, n, policy, threads
        self.serve_args, self.router_args = list(serve_args), list(router_args)
        self.ports = [free_port() for _ in range(n)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.router_port = free_port()
        self.router_url = f"http://127.0.0.1:{self.router_port}"
        self.replicas: list[subprocess.Popen] = []
        self.router: subprocess.Popen | None = None
        self.logs = Path(tempfile.mkdtemp(prefix="unigemma-replicas-"))

    def replica_command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "unigemma", "serve", "--model", str(self.model), "--port", str(port),
               "--threads", str(self.threads), *self.serve_args]
        return cmd + (["--tokenizer", str(self.tokenizer)] if self.tokenizer else [])

    def router_command(self) -> list[str]:
        return [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(self.router_port), "--worker-urls", *self.urls, "--policy", self.policy,
                "--log-level", "warn", *self.router_args]

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        log = open(self.logs / f"{name}.log", "wb")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)  # its own group: a signal to us is not one to it

    def __enter__(self) -> "Replicas":
        try:
            self.replicas = [self._spawn(self.replica_command(p), f"replica{i}") for i, p in enumerate(self.ports)]
            for url in self.urls:
                wait_for(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, 180,
                         f"replica {url}", self.replicas)
            self.router = self._spawn(self.router_command(), "router")
            wait_for(self._router_ready, 60, "router", [self.router])
        except BaseException:
            self.close()
            raise
        return self

    def _router_ready(self) -> bool:
        r = httpx.get(self.router_url + "/workers", timeout=2)
        return r.status_code == 200 and sum(w.get("is_healthy", False) for w in r.json().get("workers", [])) == self.n

    def kill(self, i: int) -> None:
        """SIGKILL replica i: a crash, not a shutdown (no grace, open connections reset)."""
        self.replicas[i].send_signal(signal.SIGKILL)
        self.replicas[i].wait(10)

    def stats(self, i: int) -> dict:
        """Replica i's /metrics JSON snapshot (requests by outcome, prefix-cache counts)."""
        return httpx.get(self.urls[i] + "/metrics", params={"format": "json"}, timeout=10).json()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for p in [self.router, *self.replicas]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [self.router, *self.replicas]:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def __exit__(self, kind, *exc) -> None:
        self.close()
        if kind is None:  # kept after an error: the processes' output says why
            shutil.rmtree(self.logs, ignore_errors=True)
