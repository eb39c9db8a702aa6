"""llmproxy benchmark suite: each scenario straight to a fake upstream, then through the proxy.

Usage: ``python bench/run.py [--smoke] [--scenarios A,B,C,D,E,F,G,H] [--streams 100,500,1000,2000]``
(``make bench`` / ``make bench-smoke``). Prints a table and writes ``bench/results/<ts>.json``.
See docs/benchmarks.md for what each scenario measures and how processes are pinned.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Say hello in one short sentence, please."},
    ],
    "max_tokens": 64,
    "user": "bench-user",
}

# Issue 4's targets.
TARGETS = {
    "A": "added p50 <= 1 ms, added p99 <= 3 ms",
    "B": ">= 1500 req/s through one worker",
    "C": "N=1000: all chunks delivered, added gap p99 <= 10 ms, RSS <= 150 MB",
    "D": "peak RSS grows < 10 MB for a 50 MB upload",
    "E": "cost <= 15 % of B (memory), <= 30 % (redis)",
    "F": "OpenTelemetry on: CPU per request <= x1.10 telemetry off",
    "G": "proxy keys on: cost <= 10 % of B (pass-through) by CPU per request",
    "H": "budgets on (Redis): CPU per request <= x1.25 pass-through (budgets off)",
}


class HarnessError(RuntimeError):
    """The benchmark harness itself failed (not a slow proxy)."""


@dataclass
class Plan:
    """Sizes and durations of one run."""

    smoke: bool
    a_seconds: float
    b_seconds: float
    warmup_seconds: float
    b_connections: int
    streams: list[int]
    chunks: int
    delay_ms: float
    upload_mb: int
    scenarios: list[str]

    @classmethod
    def make(cls, smoke: bool, scenarios: list[str], streams: list[int] | None) -> Plan:
        if smoke:
            return cls(True, 1.0, 1.0, 0.3, 16, streams or [20], 5, 5.0, 4, scenarios)
        return cls(False, 8.0, 10.0, 2.0, 64, streams or [100, 500, 1000, 2000], 50, 20.0, 50,
                   scenarios)


@dataclass
class Pinning:
    """Which core runs what: the proxy alone on one core, the rest on the other."""

    proxy: str | None
    harness: str | None

    def prefix(self, cores: str | None) -> list[str]:
        return ["taskset", "-c", cores] if cores is not None and shutil.which("taskset") else []

    def describe(self) -> str:
        if self.proxy is None:
            return "none (fewer than 2 usable cores, or --no-pin)"
        return (f"proxy (gunicorn master + worker) on core {self.proxy}; fake upstream, load "
                f"drivers, redis and this orchestrator on core {self.harness}; scenario A puts "
                f"wrk on core {self.proxy} as well (concurrency 1 is serial)")


def make_pinning(enabled: bool) -> Pinning:
    cores = sorted(os.sched_getaffinity(0))
    if not enabled or len(cores) < 2 or shutil.which("taskset") is None:
        return Pinning(None, None)
    return Pinning(str(cores[1]), str(cores[0]))


# --- /proc helpers --------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise HarnessError(f"{key} missing from /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024.0


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


class RssSampler:
    """Samples a process's RSS every 10 ms in a thread; ``peak_mb`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, HarnessError):
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def http_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                       **headers})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 extra_pids: tuple[int, ...] = ()) -> None:
    """Stop a process we started (and the given gunicorn workers of it), by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for pid in extra_pids:
        # Only if it is still the process we started (a pid can be reused once it exits).
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gunicorn" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- processes under test -------------------------------------------------------------------

class FakeUpstream:
    def __init__(self, pin: Pinning, logdir: Path) -> None:
        cmd = [*pin.prefix(pin.harness), sys.executable, str(BENCH / "fake_upstream.py"),
               "--host", HOST, "--port", "0", "--uvloop"]
        # stderr to a file: an undrained pipe would block the server once it fills.
        self.log_path = logdir / "fake-upstream.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            err = self.log_path.read_text(errors="replace").strip()
            raise HarnessError(f"fake upstream did not start: {err[-400:]}")
        info = json.loads(line)
        self.port = int(info["port"])
        self.pid = self.proc.pid
        self.base = f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class Proxy:
    """``python -m gunicorn -c gunicorn.conf.py wsgi:app`` as deployed, one gevent worker."""

    def __init__(self, pin: Pinning, upstream: FakeUpstream, config: dict[str, Any] | None,
                 logdir: Path, proxy_dir: Path, reference: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = logdir / f"proxy-{self.port}.log"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LLMPROXY_", "OTEL_"))}
        env.update({
            "PORT": str(self.port),
            "BIND": f"{HOST}:{self.port}",  # loopback only
            "WEB_CONCURRENCY": "1",
            # As deployed: one access record per request (text, the default), to a file.
            "LOG_LEVEL": "info",
            "GUNICORN_LOG_LEVEL": "warning",
            "LLMPROXY_OPENAI_BASE_URL": upstream.base,
            "LLMPROXY_ANTHROPIC_BASE_URL": upstream.base,
            "LLMPROXY_GEMINI_BASE_URL": upstream.base,
        })
        env.update(extra_env or {})
        if config is not None:
            cfg = logdir / f"config-{self.port}.yml"
            # JSON is YAML: no YAML writer needed.
            cfg.write_text(json.dumps(config))
            env["LLMPROXY_CONFIG"] = str(cfg)
        cmd = [*pin.prefix(pin.proxy), sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
               "wsgi:app"]
        cwd = proxy_dir
        if reference:  # the bare forwarder (bench/reference_forwarder.py), same server setup
            env["REF_UPSTREAM"] = upstream.base
            cmd = [*pin.prefix(pin.proxy), sys.executable, "-m", "gunicorn", "-k", "gevent",
                   "-w", "1", "-b", f"{HOST}:{self.port}", "--log-level", "warning",
                   "reference_forwarder:app"]
            cwd = BENCH
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.master = self.proc.pid
        self.worker = 0
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"proxy exited with {self.proc.returncode}: {self.log_tail()}")
            workers = children(self.master)
            if len(workers) == 1:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    if http_get(self.port, "/health") == 200:
                        self.worker = workers[0]
                        return
            time.sleep(0.05)
        raise HarnessError(f"proxy not ready within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def cpu(self) -> float:
        return cpu_seconds(self.worker)

    def stop(self) -> None:
        # SIGINT = gunicorn's quick shutdown: don't wait out graceful_timeout on open streams.
        stop_process(self.proc, signal.SIGINT, tuple(children(self.master)))
        self._log.close()


class OtlpSink:
    """bench/otlp_sink.py: the local collector stand-in (OTLP/HTTP or OTLP/gRPC) that decodes
    and counts what the proxy exports, on the harness core."""

    def __init__(self, pin: Pinning, logdir: Path, protocol: str) -> None:
        self.log_path = logdir / f"otlp-sink-{protocol.replace('/', '-')}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [*pin.prefix(pin.harness), sys.executable, str(BENCH / "otlp_sink.py"),
               "--host", HOST, "--protocol", protocol]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            err = self.log_path.read_text(errors="replace").strip()
            raise HarnessError(f"OTLP sink did not start: {err[-400:]}")
        info = json.loads(line)
        self.url = f"http://{HOST}:{info['port']}"
        self.stats_port = int(info["stats_port"])

    def stats(self) -> dict[str, int]:
        conn = http.client.HTTPConnection(HOST, self.stats_port, timeout=5)
        try:
            conn.request("GET", "/stats")
            counts: dict[str, int] = json.loads(conn.getresponse().read())
            return counts
        finally:
            conn.close()

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class RedisServer:
    def __init__(self, pin: Pinning, logdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise HarnessError("redis-server not found")
        self.port = free_port()
        cmd = [*pin.prefix(pin.harness), exe, "--bind", HOST, "--port", str(self.port),
               "--save", "", "--appendonly", "no", "--dir", str(logdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.command("PING") == "PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise HarnessError("redis-server did not answer PING")

    def command(self, *args: str) -> str | None:
        """One RESP command, the reply as text (enough for PING / DBSIZE)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as s:
                parts = [f"*{len(args)}\r\n"] + [f"${len(a)}\r\n{a}\r\n" for a in args]
                s.sendall("".join(parts).encode())
                return s.recv(512).decode().strip().lstrip("+:")
        except OSError:
            return None

    def stop(self) -> None:
        stop_process(self.proc)


# --- load drivers ---------------------------------------------------------------------------

def ensure_wrk() -> str:
    exe = shutil.which("wrk")
    if exe:
        return exe
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        exe = shutil.which("wrk")
        if exe:
            return exe
    raise HarnessError("wrk not found; install it (Debian/Ubuntu: apt-get install wrk)")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 1), "errors": self.errors,
                "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
                "p999_ms": self.p999_ms, "mean_ms": self.mean_ms, "max_ms": self.max_ms}


@dataclass
class Runner:
    plan: Plan
    pin: Pinning
    fake: FakeUpstream
    workdir: Path
    wrk: str
    proxy_dir: Path  # the checkout gunicorn starts in
    body_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.body_file = self.workdir / "chat.json"
        self.body_file.write_text(json.dumps(CHAT_BODY, separators=(",", ":")))

    def run_wrk(self, port: int, path: str, connections: int, seconds: float,
                core: str | None, headers: dict[str, str] | None = None) -> WrkResult:
        return self.wrk_result(self.start_wrk(port, path, connections, seconds, core, headers),
                               seconds)

    def start_wrk(self, port: int, path: str, connections: int, seconds: float,
                  core: str | None, headers: dict[str, str] | None = None
                  ) -> subprocess.Popen[str]:
        env = {**os.environ, "BENCH_BODY_FILE": str(self.body_file),
               "BENCH_HEADERS": ";".join(f"{k}:{v}" for k, v in (headers or {}).items())}
        cmd = [*self.pin.prefix(core), self.wrk, "-t1", f"-c{connections}",
               f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s",
               str(BENCH / "wrk" / "post.lua"), f"http://{HOST}:{port}{path}"]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    @staticmethod
    def wrk_result(proc: subprocess.Popen[str], seconds: float) -> WrkResult:
        try:
            stdout, stderr = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise HarnessError("wrk did not finish") from None
        line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if proc.returncode != 0 or line is None:
            raise HarnessError(f"wrk failed ({proc.returncode}): {stderr.strip()[-400:]}")
        d = json.loads(line.split(" ", 1)[1])
        errors = sum(int(d[k]) for k in d if k.startswith("err_"))
        ms = 1000.0
        return WrkResult(int(d["requests"]), d["duration_us"] / 1e6, errors,
                         d["p50_us"] / ms, d["p90_us"] / ms, d["p99_us"] / ms, d["p999_us"] / ms,
                         d["lat_mean_us"] / ms, d["lat_max_us"] / ms)

    def run_streams(self, port: int, prefix: str, n: int, dialect: str = "openai",
                    chunks: int | None = None) -> dict[str, Any]:
        chunks = chunks or self.plan.chunks
        timeout = chunks * self.plan.delay_ms / 1000.0 + 30.0
        cmd = [*self.pin.prefix(self.pin.harness), sys.executable,
               str(BENCH / "stream_client.py"), "--host", HOST, "--port", str(port),
               "--prefix", prefix, "--dialect", dialect, "--streams", str(n),
               "--chunks", str(chunks), "--delay-ms", str(self.plan.delay_ms),
               "--timeout", str(timeout), "--uvloop"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60)
        if out.returncode != 0:
            raise HarnessError(f"stream client failed: {out.stderr.strip()[-400:]}")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def proxy(self, config: dict[str, Any] | None = None,
              env: dict[str, str] | None = None) -> Proxy:
        return Proxy(self.pin, self.fake, config, self.workdir, self.proxy_dir, extra_env=env)

    def reference(self) -> Proxy:
        """The bare Flask + gevent + requests forwarder, started like the proxy."""
        return Proxy(self.pin, self.fake, None, self.workdir, self.proxy_dir, reference=True)


def upload(port: int, path: str, size: int) -> dict[str, Any]:
    """POST ``size`` bytes with Content-Length, streamed from a 1 MiB block."""
    block = bytes(range(256)) * 4096
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Content-Type: application/octet-stream\r\nAuthorization: Bearer sk-bench-0000\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=120) as s:
        s.sendall(head)
        left = size
        view = memoryview(block)
        while left:
            n = min(left, len(block))
            s.sendall(view[:n])
            left -= n
        resp = bytearray()
        while True:
            data = s.recv(65536)
            if not data:
                break
            resp += data
    seconds = time.perf_counter() - t0
    head_end = resp.find(b"\r\n\r\n")
    status = int(resp[9:12]) if len(resp) >= 12 else 0
    body = bytes(resp[head_end + 4:]) if head_end >= 0 else b""
    received = None
    with contextlib.suppress(ValueError):
        received = json.loads(body[body.find(b"{"):]).get("received")
    return {"status": status, "seconds": round(seconds, 3),
            "mb_per_s": round(size / 1048576 / seconds, 1), "received": received}


# --- scenarios ------------------------------------------------------------------------------

CHAT_PATH = "/v1/chat/completions"
HEADERS = {"x-bench-chunks": "20", "x-bench-chunk-bytes": "8"}


def _pair(direct: WrkResult, proxy: WrkResult) -> dict[str, Any]:
    return {
        "direct": direct.as_dict(), "proxy": proxy.as_dict(),
        "added_p50_ms": round(proxy.p50_ms - direct.p50_ms, 3),
        "added_p99_ms": round(proxy.p99_ms - direct.p99_ms, 3),
        "rps_ratio": round(proxy.rps / direct.rps, 3) if direct.rps else None,
    }


def _median_result(runs: list[WrkResult]) -> WrkResult:
    """Per-percentile median over slices; counts and time summed."""
    def med(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    return WrkResult(
        sum(x.requests for x in runs), sum(x.seconds for x in runs), sum(x.errors for x in runs),
        med([x.p50_ms for x in runs]), med([x.p90_ms for x in runs]),
        med([x.p99_ms for x in runs]), med([x.p999_ms for x in runs]),
        med([x.mean_ms for x in runs]), max(x.max_ms for x in runs))


def _vs_reference(out: dict[str, Any], ref: WrkResult, direct: WrkResult) -> None:
    """The bare forwarder's figures beside the proxy's."""
    out["reference"] = ref.as_dict()
    out["reference_added_p50_ms"] = round(ref.p50_ms - direct.p50_ms, 3)
    out["reference_added_p99_ms"] = round(ref.p99_ms - direct.p99_ms, 3)


def scenario_a(r: Runner, proxy: Proxy, ref: Proxy | None = None) -> dict[str, Any]:
    """Overhead at concurrency 1, in slices alternating direct and proxied, median per
    percentile: a burst of other work on the machine then spoils one slice, not the figure.

    wrk shares the proxy's core: at concurrency 1 nothing runs at the same time, and so both
    runs cross cores exactly once per round trip."""
    p = r.plan
    core = r.pin.proxy
    path = "/openai" + CHAT_PATH
    slices = 1 if p.smoke else 4
    seconds = max(1.0, p.a_seconds / slices)
    r.run_wrk(proxy.port, path, 1, p.warmup_seconds, core, HEADERS)
    if ref is not None:
        r.run_wrk(ref.port, path, 1, p.warmup_seconds, core, HEADERS)
    direct_runs, proxy_runs, ref_runs = [], [], []
    for _ in range(slices):
        direct_runs.append(r.run_wrk(r.fake.port, CHAT_PATH, 1, seconds, core, HEADERS))
        proxy_runs.append(r.run_wrk(proxy.port, path, 1, seconds, core, HEADERS))
        if ref is not None:
            ref_runs.append(r.run_wrk(ref.port, path, 1, seconds, core, HEADERS))
    direct = _median_result(direct_runs)
    out = _pair(direct, _median_result(proxy_runs))
    out["slices"] = {"seconds": seconds, "direct": [x.as_dict() for x in direct_runs],
                     "proxy": [x.as_dict() for x in proxy_runs],
                     "reference": [x.as_dict() for x in ref_runs]}
    if ref_runs:
        _vs_reference(out, _median_result(ref_runs), direct)
    out["pass"] = out["added_p50_ms"] <= 1.0 and out["added_p99_ms"] <= 3.0
    return out


def _throughput(r: Runner, proxy: Proxy,
                seconds: float | None = None) -> tuple[WrkResult, dict[str, float]]:
    p = r.plan
    path = "/openai" + CHAT_PATH
    r.run_wrk(proxy.port, path, p.b_connections, p.warmup_seconds, r.pin.harness, HEADERS)
    c0, f0, t0 = proxy.cpu(), cpu_seconds(r.fake.pid), time.perf_counter()
    res = r.run_wrk(proxy.port, path, p.b_connections, seconds or p.b_seconds, r.pin.harness,
                    HEADERS)
    c1, f1, t1 = proxy.cpu(), cpu_seconds(r.fake.pid), time.perf_counter()
    cpu = c1 - c0
    return res, {
        "proxy_cpu_s": round(cpu, 2),
        "proxy_cpu_s_per_1000": round(cpu / res.requests * 1000, 3) if res.requests else 0.0,
        "proxy_cpu_util": round(cpu / (t1 - t0), 2),
        # What one worker would do with a whole core to itself: robust to other load.
        "proxy_cpu_bound_rps": round(res.requests / cpu, 0) if cpu else 0.0,
        "fake_cpu_util": round((f1 - f0) / (t1 - t0), 2),
        "proxy_rss_mb": round(rss_mb(proxy.worker), 1),
    }


def scenario_b(r: Runner, proxy: Proxy, ref: Proxy | None = None) -> dict[str, Any]:
    p = r.plan
    f0, t0 = cpu_seconds(r.fake.pid), time.perf_counter()
    direct = r.run_wrk(r.fake.port, CHAT_PATH, p.b_connections, p.b_seconds, r.pin.harness,
                       HEADERS)
    fake_util = (cpu_seconds(r.fake.pid) - f0) / (time.perf_counter() - t0)
    via, extra = _throughput(r, proxy)
    out = _pair(direct, via)
    out["direct"]["fake_cpu_util"] = round(fake_util, 2)
    out["proxy"].update(extra)
    if ref is not None:
        ref_res, ref_extra = _throughput(r, ref)
        _vs_reference(out, ref_res, direct)
        out["reference"].update(ref_extra)
        out["vs_reference_rps"] = round(via.rps / ref_res.rps, 2) if ref_res.rps else None
        cpu_ref, cpu_proxy = ref_extra["proxy_cpu_s_per_1000"], extra["proxy_cpu_s_per_1000"]
        out["vs_reference_cpu"] = round(cpu_ref / cpu_proxy, 2) if cpu_proxy else None
    out["pass"] = via.rps >= 1500 and via.errors == 0
    return out


def scenario_c(r: Runner) -> dict[str, Any]:
    rows = []
    knee = None
    for n in r.plan.streams:
        direct = r.run_streams(r.fake.port, "", n)
        proxy = r.proxy()
        try:
            r.run_streams(proxy.port, "/openai", min(n, 20), chunks=3)  # warm the pool
            base_rss = rss_mb(proxy.worker)
            reset_peak_rss(proxy.worker)
            c0, t0 = proxy.cpu(), time.perf_counter()
            with RssSampler(proxy.worker) as sampler:
                via = r.run_streams(proxy.port, "/openai", n)
            cpu, wall = proxy.cpu() - c0, time.perf_counter() - t0
            peak = max(sampler.peak_mb, status_kb(proxy.worker, "VmHWM") / 1024.0)
        finally:
            proxy.stop()
        row = {
            "streams": n, "direct": direct, "proxy": via,
            "delivered_direct": round(direct["delivered"], 5),
            "delivered_proxy": round(via["delivered"], 5),
            "added_ttfb_p99_ms": round(via["ttfb_ms"]["p99"] - direct["ttfb_ms"]["p99"], 2),
            "added_gap_p99_ms": round(via["gap_ms"]["p99"] - direct["gap_ms"]["p99"], 2),
            "proxy_rss_start_mb": round(base_rss, 1),
            "proxy_rss_peak_mb": round(peak, 1),
            "proxy_cpu_s": round(cpu, 2),
            "proxy_cpu_util": round(cpu / wall, 2),
        }
        row["ok"] = (via["delivered"] >= 1.0 and row["added_gap_p99_ms"] <= 10.0
                     and peak <= 150.0)
        if not row["ok"] and knee is None:
            knee = n
        rows.append(row)
    at_1000 = next((x for x in rows if x["streams"] == 1000), None)
    return {"rows": rows, "first_failing_n": knee,
            "pass": bool(at_1000["ok"]) if at_1000 else None}


def scenario_d(r: Runner) -> dict[str, Any]:
    size = r.plan.upload_mb * 1048576
    direct = upload(r.fake.port, "/v1/files", size)
    proxy = r.proxy()
    try:
        for _ in range(20):  # warm the code paths a small request takes
            http_post(proxy.port, "/openai" + CHAT_PATH, json.dumps(CHAT_BODY).encode(),
                      {"Authorization": "Bearer sk-bench-0000"})
        upload(proxy.port, "/openai/v1/files", 4 * 1048576)  # and a large one
        before = rss_mb(proxy.worker)
        hwm_reset = reset_peak_rss(proxy.worker)
        with RssSampler(proxy.worker) as sampler:
            via = upload(proxy.port, "/openai/v1/files", size)
        hwm = status_kb(proxy.worker, "VmHWM") / 1024.0
        peak = max(sampler.peak_mb, hwm) if hwm_reset else sampler.peak_mb
    finally:
        proxy.stop()
    growth = peak - before
    return {
        "upload_mb": r.plan.upload_mb, "direct": direct, "proxy": via,
        "proxy_rss_before_mb": round(before, 1), "proxy_rss_peak_mb": round(peak, 1),
        "rss_growth_mb": round(growth, 1), "peak_from": "VmHWM" if hwm_reset else "sampled",
        "pass": growth < 10.0 and via["status"] == 200 and via["received"] == size,
    }


def _limits_config(backend: str, redis_port: int | None) -> dict[str, Any]:
    rl: dict[str, Any] = {
        "enabled": True, "backend": backend,
        "limits": {"requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000},
        # A user that is denied quickly proves the limiter is really on.
        "overrides": {"per_user": {"bench-probe": {"requests_per_minute": 2}}},
    }
    if redis_port is not None:
        rl["redis"] = {"url": f"redis://{HOST}:{redis_port}/0"}
    return {"features": {"rate_limiting": rl}}


def _probe_denies(proxy: Proxy) -> bool:
    body = json.dumps({**CHAT_BODY, "user": "bench-probe"}).encode()
    statuses = [http_post(proxy.port, "/openai" + CHAT_PATH, body,
                          {"Authorization": "Bearer sk-bench-probe", "X-User-ID": "bench-probe"})[0]
                for _ in range(4)]
    return 429 in statuses


def _measure_limited(r: Runner, backend: str | None, redis: RedisServer | None
                     ) -> tuple[WrkResult, dict[str, Any], bool]:
    config = _limits_config(backend, redis.port if redis else None) if backend else None
    proxy = r.proxy(config)
    try:
        res, extra = _throughput(r, proxy)
        verified = _probe_denies(proxy) if backend else False
    finally:
        proxy.stop()
    return res, extra, verified


def scenario_e(r: Runner) -> dict[str, Any]:
    """B with rate limiting on. Its own baseline (limits off) is measured right before and
    right after, so that the comparison is not moved by other load changing over the run."""
    base1, base1_extra, _ = _measure_limited(r, None, None)
    rows: dict[str, Any] = {}
    for backend in ("memory", "redis"):
        redis: RedisServer | None = None
        try:
            if backend == "redis":
                try:
                    redis = RedisServer(r.pin, r.workdir)
                except HarnessError as exc:
                    rows[backend] = {"available": False, "reason": str(exc)}
                    continue
            try:
                res, extra, verified = _measure_limited(r, backend, redis)
            except HarnessError as exc:
                rows[backend] = {"available": False, "reason": str(exc)[-300:]}
                continue
            row: dict[str, Any] = {"available": True, "limiter_verified": verified,
                                   **res.as_dict(), **extra}
            if redis is not None:
                keys = redis.command("DBSIZE")
                row["redis_keys"] = int(keys) if keys and keys.isdigit() else None
            rows[backend] = row
        finally:
            if redis is not None:
                redis.stop()
    base2, base2_extra, _ = _measure_limited(r, None, None)
    base_rps = (base1.rps + base2.rps) / 2
    base_cpu = (base1_extra["proxy_cpu_s_per_1000"] + base2_extra["proxy_cpu_s_per_1000"]) / 2
    for backend, limit in (("memory", 0.15), ("redis", 0.30)):
        got = rows.get(backend)
        if not got or not got.get("available"):
            continue
        row = got
        row["cost_vs_b"] = round(1.0 - row["rps"] / base_rps, 3) if base_rps else None
        # The same cost as CPU per request: what it costs the throughput of a CPU-bound
        # worker, and much less moved by other load on the machine than req/s is.
        cpu_cost = 1.0 - base_cpu / row["proxy_cpu_s_per_1000"]
        row["cpu_cost_vs_b"] = round(cpu_cost, 3)
        row["pass"] = cpu_cost <= limit and row["errors"] == 0 and row["limiter_verified"]
    return {"baseline": {"rps": round(base_rps, 1), "proxy_cpu_s_per_1000": round(base_cpu, 3),
                         "runs": [base1.as_dict() | base1_extra, base2.as_dict() | base2_extra]},
            **rows}


def scenario_f(r: Runner) -> dict[str, Any]:
    """B's load with OpenTelemetry on (a span and the GenAI metrics per request, exported by
    the SDK's batch processor to a local collector stand-in) against telemetry off, as a
    paired comparison: both proxies run at the same time on the proxy core, each driven by
    its own wrk with half of B's connections, so that whatever else runs on the machine
    weighs on both alike. The figure is the median over rounds of (CPU per request on) /
    (CPU per request off). A control pair (off against off) shows the design's own error.
    The SDK's defaults otherwise (5 s batches of up to 512 spans, metrics every 60 s)."""
    p = r.plan
    rounds = 1 if p.smoke else 3
    seconds = p.b_seconds if p.smoke else p.b_seconds / 2
    connections = max(1, p.b_connections // 2)
    path = "/openai" + CHAT_PATH

    def med(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def pair(env: dict[str, str]) -> dict[str, Any]:
        base, other = r.proxy(), r.proxy(env=env)
        try:
            procs = [r.start_wrk(x.port, path, connections, p.warmup_seconds, r.pin.harness,
                                 HEADERS) for x in (base, other)]
            for proc in procs:
                r.wrk_result(proc, p.warmup_seconds)
            runs = []
            for _ in range(rounds):
                c0 = (base.cpu(), other.cpu())
                procs = [r.start_wrk(x.port, path, connections, seconds, r.pin.harness,
                                     HEADERS) for x in (base, other)]
                off, on = (r.wrk_result(proc, seconds) for proc in procs)
                cpu_off, cpu_on = base.cpu() - c0[0], other.cpu() - c0[1]
                per_off = cpu_off / off.requests * 1000 if off.requests else 0.0
                per_on = cpu_on / on.requests * 1000 if on.requests else 0.0
                runs.append({"off": off.as_dict() | {"proxy_cpu_s_per_1000": round(per_off, 3)},
                             "on": on.as_dict() | {"proxy_cpu_s_per_1000": round(per_on, 3)},
                             "cpu_ratio": round(per_on / per_off, 3) if per_off else None})
            rss = (round(rss_mb(base.worker), 1), round(rss_mb(other.worker), 1))
        finally:
            base.stop()
            other.stop()  # the worker flushes its queue to the sink on the way out
        ratios = [x["cpu_ratio"] for x in runs if x["cpu_ratio"] is not None]
        return {"available": True, "runs": runs, "cpu_ratios_vs_off": ratios,
                "cpu_ratio_vs_off": round(med(ratios), 3) if ratios else None,
                "proxy_cpu_s_per_1000": round(med([x["on"]["proxy_cpu_s_per_1000"]
                                                   for x in runs]), 3),
                "off_cpu_s_per_1000": round(med([x["off"]["proxy_cpu_s_per_1000"]
                                                 for x in runs]), 3),
                "requests": sum(x["on"]["requests"] for x in runs),
                "errors": sum(x["on"]["errors"] + x["off"]["errors"] for x in runs),
                "rss_mb": {"off": rss[0], "on": rss[1]}}

    rows: dict[str, Any] = {"control": pair({"OTEL_SDK_DISABLED": "true"})}
    for protocol in ("http/protobuf", "grpc"):
        try:
            sink = OtlpSink(r.pin, r.workdir, protocol)
        except HarnessError as exc:
            rows[protocol] = {"available": False, "reason": str(exc)[-300:]}
            continue
        try:
            row = pair({"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url,
                        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
            row["sink"] = sink.stats()
        finally:
            sink.stop()
        ratio = row["cpu_ratio_vs_off"]
        row["pass"] = ratio is not None and ratio <= 1.10 and not row["errors"]
        rows[protocol] = row
    return {"rounds": rounds, "seconds": seconds, "connections_each": connections, **rows}


# The providers' own keys the proxy holds in scenario G (the fake upstream ignores them).
SERVER_KEYS = {f"{name}_API_KEY": "sk-bench-server"
               for name in ("OPENAI", "ANTHROPIC", "GEMINI", "GROQ")}
# Creates one proxy key in the database named by argv[1] and prints its secret: run by the
# checkout under test, with its own llmproxy.
_CREATE_KEY = ("import sys; from llmproxy.keys.store import KeyStore; "
               "s = KeyStore.from_url(sys.argv[1]); s.migrate(); "
               "print(s.create('bench', user='bench-user', team='bench')[1])")


def _create_proxy_key(r: Runner, url: str) -> str:
    out = subprocess.run([sys.executable, "-c", _CREATE_KEY, url], cwd=r.proxy_dir,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise HarnessError(f"cannot create a proxy key: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def _keys_denies_unknown(proxy: Proxy) -> bool:
    """A well-formed key nobody issued is refused: the check is really on."""
    status, _ = http_post(proxy.port, "/openai" + CHAT_PATH, json.dumps(CHAT_BODY).encode(),
                          {"Authorization": "Bearer llmp-" + "0" * 43})
    return status == 401


def _slice(r: Runner, proxy: Proxy, headers: dict[str, str], seconds: float
           ) -> tuple[WrkResult, float]:
    """One measured wrk run at B's concurrency: the result and CPU seconds per 1,000."""
    c0 = proxy.cpu()
    res = r.run_wrk(proxy.port, "/openai" + CHAT_PATH, r.plan.b_connections, seconds,
                    r.pin.harness, headers)
    cpu = proxy.cpu() - c0
    return res, (cpu / res.requests * 1000 if res.requests else 0.0)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _alternating(r: Runner, modes: list[tuple[str, Proxy, dict[str, str]]]
                 ) -> dict[str, dict[str, Any]]:
    """B's load on each proxy in alternating slices (the order flipped every round), so
    that other load on the machine hits every mode alike; the medians per mode."""
    p = r.plan
    for _, proxy, headers in modes:
        r.run_wrk(proxy.port, "/openai" + CHAT_PATH, p.b_connections, p.warmup_seconds,
                  r.pin.harness, headers)
    slices = 1 if p.smoke else 8
    seconds = max(1.0, p.b_seconds / 2)
    runs: dict[str, list[tuple[WrkResult, float]]] = {mode: [] for mode, _, _ in modes}
    for n in range(slices):
        for mode, proxy, headers in modes if n % 2 == 0 else modes[::-1]:
            runs[mode].append(_slice(r, proxy, headers, seconds))
    summary: dict[str, dict[str, Any]] = {}
    for mode, got in runs.items():
        summary[mode] = {"rps": round(_median([w.rps for w, _ in got]), 1),
                         "p99_ms": round(_median([w.p99_ms for w, _ in got]), 2),
                         "errors": sum(w.errors for w, _ in got),
                         "requests": sum(w.requests for w, _ in got),
                         "proxy_cpu_s_per_1000": round(_median([c for _, c in got]), 3),
                         "slices_cpu_s_per_1000": [round(c, 3) for _, c in got],
                         "slice_seconds": seconds}
    return summary


def scenario_g(r: Runner) -> dict[str, Any]:
    """B with proxy keys (auth.mode keys, SQLite, the key cached after its first call)
    against pass-through. Both proxies run side by side and are measured in alternating
    slices (the median of each), so that other load on the machine hits both alike."""
    url = f"sqlite:///{r.workdir / 'keys.db'}"
    try:
        secret = _create_proxy_key(r, url)
    except HarnessError as exc:
        return {"available": False, "reason": str(exc)}
    plain = {**HEADERS, "Authorization": "Bearer sk-bench"}
    keyed = {**HEADERS, "Authorization": f"Bearer {secret}"}
    base = r.proxy(None, SERVER_KEYS)
    keys = r.proxy({"auth": {"mode": "keys", "database_url": url}}, SERVER_KEYS)
    try:
        summary = _alternating(r, [("passthrough", base, plain), ("keys", keys, keyed)])
        verified = _keys_denies_unknown(keys)
    finally:
        base.stop()
        keys.stop()
    summary["keys"]["keys_verified"] = verified
    base_cpu = summary["passthrough"]["proxy_cpu_s_per_1000"]
    keys_cpu = summary["keys"]["proxy_cpu_s_per_1000"]
    # Per pair of neighbouring slices too: the spread says how far to trust the median.
    paired = [1.0 - b / k for b, k in zip(summary["passthrough"]["slices_cpu_s_per_1000"],
                                          summary["keys"]["slices_cpu_s_per_1000"],
                                          strict=True) if k]
    cpu_cost = 1.0 - base_cpu / keys_cpu if keys_cpu else None
    return {
        "available": True, "slice_seconds": summary["keys"]["slice_seconds"],
        "baseline": summary["passthrough"], "keys": summary["keys"],
        "cpu_cost_vs_b": round(cpu_cost, 3) if cpu_cost is not None else None,
        "paired_cpu_costs": [round(x, 3) for x in paired],
        "pass": cpu_cost is not None and cpu_cost <= 0.10 and summary["keys"]["errors"] == 0
        and verified,
    }


# Creates a proxy key with a budget no benchmark reaches, and prints its secret.
_CREATE_BUDGET_KEY = ("import sys; from llmproxy.keys.store import KeyStore; "
                      "from llmproxy.budgets.model import Budget; "
                      "s = KeyStore.from_url(sys.argv[1]); s.migrate(); "
                      "s.set_budget('user', 'bench-user', Budget(day=100000.0, total=900000.0)); "
                      "print(s.create('bench', user='bench-key-user', team='bench', "
                      "budgets=Budget(day=100000.0, total=900000.0))[1])")


def _budget_config(url: str, redis_port: int, *, budgets: bool = True,
                   limits: bool = False, keys: bool = True) -> dict[str, Any]:
    """The database at ``url``, Redis on ``redis_port``; proxy keys, budgets and/or rate
    limits on."""
    rl: dict[str, Any] = {"enabled": limits, "backend": "redis", "redis": {
        "url": f"redis://{HOST}:{redis_port}/0", "reconcile_delay_ms": 50}}
    if limits:
        rl["limits"] = {"requests_per_minute": 100_000_000, "tokens_per_minute": 1_000_000_000}
    return {"auth": {"mode": "keys" if keys else "passthrough", "database_url": url},
            "budgets": {"enabled": budgets}, "features": {"rate_limiting": rl}}


def _budget_refuses(r: Runner, proxy: Proxy, url: str) -> bool:
    """A key whose budget is spent is refused with 429: the check is really on."""
    code = ("import sys; from llmproxy.keys.store import KeyStore; "
            "from llmproxy.budgets.model import Budget; s = KeyStore.from_url(sys.argv[1]); "
            "print(s.create('broke', budgets=Budget(total=0.0))[1])")
    out = subprocess.run([sys.executable, "-c", code, url], cwd=r.proxy_dir,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return False
    status, _ = http_post(proxy.port, "/openai" + CHAT_PATH, json.dumps(CHAT_BODY).encode(),
                          {**HEADERS, "Authorization": f"Bearer {out.stdout.strip()}"})
    return status == 429


def scenario_h(r: Runner) -> dict[str, Any]:
    """B with budgets on against the same pass-through proxy with budgets off, in
    alternating slices like G: a day and a total budget on the body's user, the Redis
    backend (one reservation round trip per call, settlements carried by the next one, the
    ledger written in batches). Three more proxies show budgets on a proxy key (proxy keys
    on as well) and what budgets add to proxy keys with Redis rate limits (they ride in the
    limits' round trip)."""
    url = f"sqlite:///{r.workdir / 'budgets.db'}"
    try:
        out = subprocess.run([sys.executable, "-c", _CREATE_BUDGET_KEY, url],
                             cwd=r.proxy_dir, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise HarnessError(f"cannot create a proxy key: {out.stderr.strip()[-300:]}")
        secret = out.stdout.strip()
        redis = RedisServer(r.pin, r.workdir)
    except HarnessError as exc:
        return {"available": False, "reason": str(exc)}
    plain = {**HEADERS, "Authorization": "Bearer sk-bench"}
    keyed = {**HEADERS, "Authorization": f"Bearer {secret}"}
    proxies = {"passthrough": r.proxy(None, SERVER_KEYS),
               # the same pass-through proxy with budgets on: the body's user has one
               "user_budgets": r.proxy(_budget_config(url, redis.port, keys=False),
                                       SERVER_KEYS),
               "budgets": r.proxy(_budget_config(url, redis.port), SERVER_KEYS),
               "limits": r.proxy(_budget_config(url, redis.port, budgets=False, limits=True),
                                 SERVER_KEYS),
               "limits_budgets": r.proxy(_budget_config(url, redis.port, limits=True),
                                         SERVER_KEYS)}
    try:
        summary = _alternating(r, [(mode, proxy, plain if mode in ("passthrough",
                                                                   "user_budgets") else keyed)
                                   for mode, proxy in proxies.items()])
        verified = _budget_refuses(r, proxies["budgets"], url) and _user_budget_on(
            proxies["user_budgets"])
    finally:
        for proxy in proxies.values():
            proxy.stop()
        redis.stop()

    def ratio(on: str, off: str) -> tuple[float | None, list[float]]:
        a = summary[on]["proxy_cpu_s_per_1000"]
        b = summary[off]["proxy_cpu_s_per_1000"]
        pairs = [x / y for x, y in zip(summary[on]["slices_cpu_s_per_1000"],
                                       summary[off]["slices_cpu_s_per_1000"], strict=True)
                 if y]
        return (round(a / b, 3) if b else None), [round(x, 3) for x in pairs]

    on_off, on_off_pairs = ratio("user_budgets", "passthrough")
    vs_pass, pairs = ratio("budgets", "passthrough")
    vs_limits, limit_pairs = ratio("limits_budgets", "limits")
    summary["budgets"]["budgets_verified"] = verified
    errors = sum(row["errors"] for row in summary.values())
    return {
        "available": True, "baseline": summary["passthrough"],
        "user_budgets": summary["user_budgets"], "budgets": summary["budgets"],
        "limits": summary["limits"], "limits_budgets": summary["limits_budgets"],
        "cpu_ratio_budgets_on_off": on_off, "paired_cpu_ratios_on_off": on_off_pairs,
        "cpu_ratio_vs_passthrough": vs_pass, "paired_cpu_ratios": pairs,
        "cpu_ratio_vs_limits": vs_limits, "paired_cpu_ratios_vs_limits": limit_pairs,
        "pass": on_off is not None and on_off <= 1.25 and errors == 0 and verified,
    }


def _user_budget_on(proxy: Proxy) -> bool:
    """The pass-through proxy's calls carry the body user's budget: it is really on."""
    conn = http.client.HTTPConnection(HOST, proxy.port, timeout=10)
    try:
        conn.request("POST", "/openai" + CHAT_PATH, json.dumps(CHAT_BODY).encode(),
                     {**HEADERS, "Authorization": "Bearer sk-bench",
                      "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200 and resp.getheader("X-Budget-Scope") == "user:bench-user"
    finally:
        conn.close()


# --- report ---------------------------------------------------------------------------------

def _f(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _verdict(ok: Any) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}.get(ok, str(ok))


def render(results: dict[str, Any]) -> str:
    s = results["scenarios"]
    lines: list[str] = []
    add = lines.append
    meta = results["meta"]
    add(f"llmproxy benchmark — {meta['timestamp']}  ({meta['cpu_model']}, {meta['cores']} cores; "
        f"{'smoke' if meta['smoke'] else 'full'} run)")
    if meta["smoke"]:
        add("smoke run: tiny counts to prove the harness works; the verdicts mean nothing here")
    add(f"pinning: {meta['pinning']}")
    add(f"load average before/after: {meta['loadavg_before']:.2f} / {meta['loadavg_after']:.2f}"
        " (other processes on these cores make the figures noisy)")
    if "A" in s:
        a = s["A"]
        add("")
        add(f"A. Overhead — non-streaming chat, concurrency 1, median of "
            f"{len(a['slices']['proxy'])} alternating slices   [{_verdict(a.get('pass'))}: "
            f"{TARGETS['A']}]")
        ra = a.get("reference")
        add(f"  {'':18}{'direct':>10}{'proxy':>10}{'added':>10}"
            + (f"{'bare fwd':>10}{'added':>10}" if ra else ""))
        for k, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("p999_ms", "p99.9 ms")):
            d, v = a["direct"][k], a["proxy"][k]
            add(f"  {label:18}{d:>10.3f}{v:>10.3f}{v - d:>+10.3f}"
                + (f"{ra[k]:>10.3f}{ra[k] - d:>+10.3f}" if ra else ""))
        add(f"  {'req/s':18}{a['direct']['rps']:>10,.0f}{a['proxy']['rps']:>10,.0f}"
            f"{'x' + _f(a['rps_ratio'], 3):>10}"
            + (f"{ra['rps']:>10,.0f}" if ra else ""))
        if ra:
            add("  bare fwd: bench/reference_forwarder.py, a 20-line Flask + gevent + requests "
                "forwarder")
    if "B" in s:
        b = s["B"]
        add("")
        add(f"B. Throughput — non-streaming chat, {results['plan']['b_connections']} connections, "
            f"one worker   [{_verdict(b.get('pass'))}: {TARGETS['B']}]")
        add(f"  {'':18}{'direct':>10}{'proxy':>10}{'ratio':>10}")
        add(f"  {'req/s':18}{b['direct']['rps']:>10,.0f}{b['proxy']['rps']:>10,.0f}"
            f"{'x' + _f(b['rps_ratio'], 3):>10}")
        for k, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            add(f"  {label:18}{b['direct'][k]:>10.2f}{b['proxy'][k]:>10.2f}")
        add(f"  {'errors':18}{b['direct']['errors']:>10}{b['proxy']['errors']:>10}")
        pb = b["proxy"]
        add(f"  proxy CPU: {pb['proxy_cpu_s_per_1000']:.3f} s per 1,000 requests (= "
            f"{pb['proxy_cpu_bound_rps']:,.0f} req/s with a whole core), "
            f"{pb['proxy_cpu_util'] * 100:.0f} % of its core used; fake upstream at "
            f"{b['direct']['fake_cpu_util'] * 100:.0f} % (direct) / {pb['fake_cpu_util'] * 100:.0f}"
            f" % (proxy run) of its core; worker RSS {pb['proxy_rss_mb']} MB")
        rb = b.get("reference")
        if rb:
            add(f"  bare forwarder (same setup): {rb['rps']:,.0f} req/s, p99 "
                f"{rb['p99_ms']:.2f} ms, {rb['proxy_cpu_s_per_1000']:.3f} s CPU per 1,000; "
                f"llmproxy does "
                f"x{_f(b['vs_reference_rps'])} its req/s and x{_f(b['vs_reference_cpu'])} its "
                f"requests per CPU second")
    if "C" in s:
        c = s["C"]
        add("")
        add(f"C. Streams — N concurrent, {results['plan']['chunks']} chunks "
            f"{results['plan']['delay_ms']:g} ms apart, one worker   [{_verdict(c.get('pass'))}: "
            f"{TARGETS['C']}]")
        add(f"  {'N':>6}{'delivered d/p':>16}{'TTFB p99 d/p':>18}{'gap p99 d/p':>16}"
            f"{'added gap':>11}{'RSS MB':>8}{'CPU s':>7}{'CPU %':>7}")
        for row in c["rows"]:
            d, v = row["direct"], row["proxy"]
            add(f"  {row['streams']:>6}"
                f"{d['delivered'] * 100:>8.1f}/{v['delivered'] * 100:<6.1f}%"
                f"{d['ttfb_ms']['p99']:>9.1f}/{v['ttfb_ms']['p99']:<8.1f}"
                f"{d['gap_ms']['p99']:>8.1f}/{v['gap_ms']['p99']:<7.1f}"
                f"{row['added_gap_p99_ms']:>+11.1f}{row['proxy_rss_peak_mb']:>8.1f}"
                f"{row['proxy_cpu_s']:>7.2f}{row['proxy_cpu_util'] * 100:>7.0f}")
        knee = c["first_failing_n"]
        add(f"  knee: {'no N failed' if knee is None else f'first failing N = {knee}'}")
    if "D" in s:
        d = s["D"]
        add("")
        add(f"D. Upload — {d['upload_mb']} MB body   [{_verdict(d.get('pass'))}: {TARGETS['D']}]")
        add(f"  direct {d['direct']['seconds']:.2f} s ({d['direct']['mb_per_s']} MB/s), proxy "
            f"{d['proxy']['seconds']:.2f} s ({d['proxy']['mb_per_s']} MB/s), status "
            f"{d['proxy']['status']}; proxy RSS {d['proxy_rss_before_mb']} -> "
            f"{d['proxy_rss_peak_mb']} MB peak (+{d['rss_growth_mb']} MB, {d['peak_from']})")
    if "E" in s:
        e = s["E"]
        add("")
        add(f"E. Rate limiting on — scenario B   [{TARGETS['E']}]")
        base = e["baseline"]
        add(f"  limits off (baseline, before and after) {base['rps']:>8,.0f} req/s  "
            f"{base['proxy_cpu_s_per_1000']:.3f} s CPU / 1,000")
        for backend in ("memory", "redis"):
            row = e.get(backend)
            if row is None:
                continue
            if not row.get("available"):
                add(f"  {backend:7} not available: {row.get('reason')}")
                continue
            add(f"  {backend:7} {row['rps']:>8,.0f} req/s  p99 {row['p99_ms']:.2f} ms  cost vs B "
                f"{_f(row.get('cost_vs_b', 0) * 100, 1)} % (by CPU per request "
                f"{_f(row.get('cpu_cost_vs_b', 0) * 100, 1)} %, "
                f"{row['proxy_cpu_s_per_1000']:.3f} s/1,000)  limiter verified "
                f"{_f(row['limiter_verified'])}  [{_verdict(row.get('pass'))}]")
    if "F" in s:
        f = s["F"]
        add("")
        add(f"F. OpenTelemetry on vs off, paired (both proxies at once, {f['connections_each']}"
            f" connections each), {f['rounds']} round(s) of {f['seconds']:g} s, median   "
            f"[{TARGETS['F']}]")
        for key in ("control", "http/protobuf", "grpc"):
            row = f.get(key)
            if row is None:
                continue
            if not row.get("available"):
                add(f"  {key:13} not available: {row.get('reason')}")
                continue
            rounds = ", ".join(f"x{x:.3f}" for x in row["cpu_ratios_vs_off"])
            line = (f"  {key:13} CPU per request x{_f(row['cpu_ratio_vs_off'], 3)} "
                    f"(rounds: {rounds}); {row['proxy_cpu_s_per_1000']:.3f} vs "
                    f"{row['off_cpu_s_per_1000']:.3f} s / 1,000; RSS {row['rss_mb']['on']} vs "
                    f"{row['rss_mb']['off']} MB")
            if key == "control":
                line += "  (off against off: the comparison's own error)"
            else:
                sink = row["sink"]
                line += (f"; sink got {sink['spans']:,} spans in {sink['trace_exports']} "
                         f"exports  [{_verdict(row.get('pass'))}]")
            add(line)
    if "G" in s:
        f = s["G"]
        add("")
        add(f"G. Proxy keys on (auth.mode keys) — scenario B, alternating slices   "
            f"[{TARGETS['G']}]")
        if not f.get("available"):
            add(f"  not available: {f.get('reason')}")
        else:
            for label, row in (("pass-through", f["baseline"]), ("proxy keys", f["keys"])):
                add(f"  {label:13}{row['rps']:>8,.0f} req/s  p99 {row['p99_ms']:.2f} ms  "
                    f"{row['proxy_cpu_s_per_1000']:.3f} s CPU / 1,000 (median of "
                    f"{len(row['slices_cpu_s_per_1000'])} slices)")
            cost = f["cpu_cost_vs_b"]
            paired = ", ".join(f"{x * 100:.1f}" for x in f["paired_cpu_costs"])
            add(f"  cost by CPU per request {_f(None if cost is None else cost * 100, 1)} % "
                f"(slice pairs: {paired} %)  keys verified {_f(f['keys']['keys_verified'])}  "
                f"[{_verdict(f.get('pass'))}]")
    if "H" in s:
        f = s["H"]
        add("")
        add(f"H. Budgets on (Redis backend) — scenario B, alternating slices   "
            f"[{TARGETS['H']}]")
        if not f.get("available"):
            add(f"  not available: {f.get('reason')}")
        else:
            for label, row in (("pass-through", f["baseline"]),
                               ("user budgets", f["user_budgets"]),
                               ("key budgets", f["budgets"]),
                               ("keys+limits", f["limits"]),
                               ("+ budgets", f["limits_budgets"])):
                add(f"  {label:13}{row['rps']:>8,.0f} req/s  p99 {row['p99_ms']:.2f} ms  "
                    f"{row['proxy_cpu_s_per_1000']:.3f} s CPU / 1,000 (median of "
                    f"{len(row['slices_cpu_s_per_1000'])} slices)")
            paired = ", ".join(f"x{x:.2f}" for x in f["paired_cpu_ratios_on_off"])
            add(f"  budgets on/off (pass-through, a user budget): CPU per request "
                f"x{_f(f['cpu_ratio_budgets_on_off'])} (slice pairs: {paired})  budgets "
                f"verified {_f(f['budgets']['budgets_verified'])}  [{_verdict(f.get('pass'))}]")
            paired = ", ".join(f"x{x:.2f}" for x in f["paired_cpu_ratios"])
            add(f"  proxy keys with budgets over pass-through: "
                f"x{_f(f['cpu_ratio_vs_passthrough'])} (slice pairs: {paired})")
            paired = ", ".join(f"x{x:.2f}" for x in f["paired_cpu_ratios_vs_limits"])
            add(f"  budgets over keys + Redis rate limits: x{_f(f['cpu_ratio_vs_limits'])} "
                f"(slice pairs: {paired})")
    return "\n".join(lines)


def loadavg() -> float:
    """1-minute load average: other work on the machine makes every figure noisy."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uv = None
    with contextlib.suppress(PackageNotFoundError):
        uv = version("uvloop")
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    return {"cpu_model": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "uvloop": uv, "git_commit": commit,
            "wrk": wrk.split(" [")[0].strip() or None}


# --- main -----------------------------------------------------------------------------------

def check_smoke(results: dict[str, Any]) -> list[str]:
    """What proves the harness broken in a smoke run (targets are not checked)."""
    problems = []
    s = results["scenarios"]
    for key in ("A", "B"):
        if key in s:
            for side in ("direct", "proxy", "reference"):
                if s[key][side]["requests"] == 0 or s[key][side]["errors"]:
                    problems.append(f"{key} {side}: {s[key][side]}")
    for row in s.get("C", {}).get("rows", []):
        for side in ("direct", "proxy"):
            if row[side]["delivered"] < 1.0:
                problems.append(f"C N={row['streams']} {side}: delivered {row[side]['delivered']}")
    if "D" in s:
        for side in ("direct", "proxy"):
            if s["D"][side]["status"] != 200:
                problems.append(f"D {side}: {s['D'][side]}")
    for key, row in s.get("dialects", {}).items():
        if row["delivered"] < 1.0:
            problems.append(f"stream dialect {key}: delivered {row['delivered']}")
    for backend in ("memory", "redis"):
        row = s.get("E", {}).get(backend)
        if row and row.get("available") and (row["requests"] == 0 or row["errors"]):
            problems.append(f"E {backend}: {row}")
    for key in ("control", "http/protobuf", "grpc"):
        row = s.get("F", {}).get(key)
        if row is None:
            continue
        # Every measured request's span must have reached the sink (warm-up ones come too).
        spans = row.get("sink", {}).get("spans", row.get("requests", 0))
        if not row.get("available") or row["requests"] == 0 or row["errors"] \
                or spans < row["requests"]:
            problems.append(f"F {key}: {row}")
    g = s.get("G")
    if g is not None and (not g.get("available") or g["keys"]["requests"] == 0
                          or g["keys"]["errors"] or g["baseline"]["errors"]
                          or not g["keys"]["keys_verified"]):
        problems.append(f"G: {g.get('keys', g)}")
    h = s.get("H")
    if h is not None and (not h.get("available") or h["budgets"]["requests"] == 0
                          or h["budgets"]["errors"] or h["baseline"]["errors"]
                          or not h["budgets"]["budgets_verified"]):
        problems.append(f"H: {h.get('budgets', h)}")
    return problems


def run(args: argparse.Namespace) -> int:
    scenarios = [x.strip().upper() for x in args.scenarios.split(",") if x.strip()]
    unknown = set(scenarios) - set("ABCDEFGH")
    if unknown:
        raise SystemExit(f"unknown scenarios: {','.join(sorted(unknown))}")
    streams = [int(x) for x in args.streams.split(",")] if args.streams else None
    plan = Plan.make(args.smoke, scenarios, streams)
    pin = make_pinning(not args.no_pin)
    if pin.harness is not None:
        # This process (the upload client, RSS sampler) counts as harness too.
        os.sched_setaffinity(0, {int(pin.harness)})
    proxy_dir = Path(args.proxy_dir).resolve() if args.proxy_dir else ROOT
    missing = [f for f in ("wsgi.py", "gunicorn.conf.py", "llmproxy/relay.py")
               if not (proxy_dir / f).exists()]
    if missing:
        raise HarnessError(f"the proxy is not there yet (missing {', '.join(missing)})")
    wrk = ensure_wrk()
    load = loadavg()
    if load > 1.0:
        print(f"warning: load average {load:.2f} before the run: other processes share the "
              "cores, figures will be noisy", file=sys.stderr)
    started = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc)
    results: dict[str, Any] = {
        "meta": {"timestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "smoke": plan.smoke,
                 "pinning": pin.describe(),
                 # Not the path: results must not carry machine paths.
                 "proxy_checkout": "this repository" if proxy_dir == ROOT
                 else f"another checkout ({proxy_dir.name})",
                 **machine_info()},
        "plan": plan.__dict__,
        "targets": TARGETS,
        "scenarios": {},
    }
    s = results["scenarios"]
    with tempfile.TemporaryDirectory(prefix="llmproxy-bench-") as tmp:
        workdir = Path(tmp)
        fake = FakeUpstream(pin, workdir)
        try:
            r = Runner(plan, pin, fake, workdir, wrk, proxy_dir)
            if {"A", "B"} & set(scenarios):
                proxy = r.proxy()
                ref = r.reference()
                try:
                    if "A" in scenarios:
                        s["A"] = scenario_a(r, proxy, ref)
                    if "B" in scenarios:
                        s["B"] = scenario_b(r, proxy, ref)
                finally:
                    proxy.stop()
                    ref.stop()
            if "C" in scenarios:
                s["C"] = scenario_c(r)
                if plan.smoke:
                    # The other two stream dialects, through the proxy, so their paths are covered.
                    proxy = r.proxy()
                    try:
                        s["dialects"] = {
                            d: r.run_streams(proxy.port, "/" + d, 5, dialect=d)
                            for d in ("anthropic", "gemini")
                        }
                    finally:
                        proxy.stop()
            if "D" in scenarios:
                s["D"] = scenario_d(r)
            if "E" in scenarios:
                s["E"] = scenario_e(r)
            if "F" in scenarios:
                s["F"] = scenario_f(r)
            if "G" in scenarios:
                s["G"] = scenario_g(r)
            if "H" in scenarios:
                s["H"] = scenario_h(r)
        finally:
            fake.stop()
    results["meta"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["loadavg_before"] = load
    results["meta"]["loadavg_after"] = loadavg()
    print(render(results))
    RESULTS.mkdir(exist_ok=True)
    name = ("smoke-" if plan.smoke else "") + now.strftime("%Y%m%dT%H%M%SZ") + ".json"
    out_path = RESULTS / name
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {out_path.relative_to(ROOT)}  ({results['meta']['wall_seconds']} s)")
    if plan.smoke:
        problems = check_smoke(results)
        if problems:
            print("smoke FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print("smoke OK: every scenario ran direct and through the proxy")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds with tiny counts: proves the harness works")
    ap.add_argument("--scenarios", default="A,B,C,D,E,F,G,H",
                    help="comma-separated subset of A-H")
    ap.add_argument("--streams", default="", help="scenario C stream counts, e.g. 100,500,1000")
    ap.add_argument("--proxy-dir", default="",
                    help="start the proxy from this checkout instead (to compare a change)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"bench: harness error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
