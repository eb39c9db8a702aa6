"""Metrics and records under the real server: 2 gevent workers, multiprocess metrics, SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ProxyProcess, new_request_id
from fake_upstream import FakeUpstream
from prometheus_client.multiprocess import MultiProcessCollector

from observe.helpers import parse_scrape, scrape_sum

pytestmark = pytest.mark.e2e

CHAT = "/openai/v1/chat/completions"
BATCH = 20
MAX_BATCHES = 10


def config_for(pricing_raw: dict[str, Any], records: Path) -> dict[str, Any]:
    return {"pricing": pricing_raw,
            "usage_records": {"enabled": True, "path": str(records), "max_bytes": 1 << 20,
                              "backups": 2}}


def requests_by_pid(prom_dir: Path) -> dict[int, float]:
    """llmproxy_requests_total per worker, read from each worker's own multiprocess file."""
    out = {}
    for file in prom_dir.glob("counter_*.db"):
        pid = int(file.stem.split("_")[-1])
        families = MultiProcessCollector.merge([str(file)], accumulate=False)
        out[pid] = sum(s.value for f in families if f.name == "llmproxy_requests"
                       for s in f.samples if s.name == "llmproxy_requests_total")
    return out


def settled_counts(prom_dir: Path, sent: int, timeout: float = 5.0) -> dict[int, float]:
    """Per-worker counts once all ``sent`` requests are counted: a request is counted at its
    terminal event, just after its last byte reached the client."""
    deadline = time.monotonic() + timeout
    while True:
        counts = {pid: n for pid, n in requests_by_pid(prom_dir).items() if n}
        if sum(counts.values()) >= sent or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)  # the counts are written by other processes: poll their files


def send(proxy: ProxyProcess, model: str) -> None:
    # A new connection per request (no session), so both workers get to accept some.
    resp = requests.post(proxy.url + CHAT, json={"model": model, "messages": []}, timeout=10,
                         headers={"Connection": "close"})
    assert resp.status_code == 200, resp.text


def test_counters_sum_across_workers(start_proxy: Callable[..., ProxyProcess],
                                     fake_upstream: FakeUpstream, pricing_raw: dict[str, Any],
                                     tmp_path: Path) -> None:
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    proxy = start_proxy(config=config_for(pricing_raw, tmp_path / "usage.jsonl"), workers=2,
                        env={"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)})
    fake_upstream.scenario.model = "gpt-4o-mini-2024-07-18"  # the model that was billed
    fake_upstream.script(fake_upstream.scripts.delayed(0.05))  # overlap requests in time
    sent = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(MAX_BATCHES):
            list(pool.map(lambda _: send(proxy, "gpt-4o-mini"), range(BATCH)))
            sent += BATCH
            served = settled_counts(prom_dir, sent)
            if len(served) >= 2:
                break
    assert len(served) >= 2, f"one worker served everything: {served}"
    assert sum(served.values()) == sent

    # Whichever worker answers the scrape, it reports every worker's requests.
    for _ in range(4):
        samples = parse_scrape(requests.get(proxy.url + "/metrics", timeout=5,
                                            headers={"Connection": "close"}).text)
        assert scrape_sum(samples, "llmproxy_requests_total", provider="openai",
                          model="gpt-4o-mini", outcome="completed") == sent
        sc = fake_upstream.scenario
        assert scrape_sum(samples, "llmproxy_tokens_total", model="gpt-4o-mini",
                          kind="input") == sent * sc.input_tokens
        price = pricing_raw["openai"]["models"]["gpt-4o-mini"]
        one = ((sc.input_tokens - sc.cached_tokens) * price["input"]
               + sc.cached_tokens * price["cached_input"]
               + sc.output_tokens * price["output"]) / 1_000_000
        assert scrape_sum(samples, "llmproxy_cost_usd_total", model="gpt-4o-mini") == (
            pytest.approx(sent * one))
        assert scrape_sum(samples, "llmproxy_request_duration_seconds_count",
                          model="gpt-4o-mini") == sent
        # Per-worker gauges: one series per live worker, all idle now.
        in_flight = {lbls: v for (n, lbls), v in samples.items()
                     if n == "llmproxy_in_flight_requests"}
        assert len(in_flight) == 2 and set(in_flight.values()) == {0.0}


def test_sigterm_lets_a_running_stream_finish(start_proxy: Callable[..., ProxyProcess],
                                              fake_upstream: FakeUpstream,
                                              pricing_raw: dict[str, Any],
                                              tmp_path: Path) -> None:
    records = tmp_path / "usage.jsonl"
    proxy = start_proxy(config=config_for(pricing_raw, records), workers=2,
                        env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    fake_upstream.scenario.model = "gpt-4o-2024-08-06"
    # The default chat stream is 9 writes; 0.4 s after each: a stream of about 3.2 s.
    fake_upstream.script(fake_upstream.scripts.paused(0.4))
    rid = new_request_id()
    assert proxy.proc is not None
    with requests.post(proxy.url + CHAT, stream=True, timeout=30,
                       headers={"X-Request-ID": rid},
                       json={"model": "gpt-4o", "stream": True, "messages": [],
                             "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_content(chunk_size=None)
        body = next(chunks)
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for chunk in chunks:
            body += chunk
        finished = time.monotonic()
    assert finished - signalled > 2  # the stream really was running when the signal came
    text = "".join(
        (c.get("delta") or {}).get("content") or ""
        for line in body.decode().splitlines()
        if line.startswith("data: {") for c in json.loads(line[6:])["choices"])
    assert text == fake_upstream.scenario.text
    assert body.rstrip().endswith(b"data: [DONE]")
    assert proxy.proc.wait(30) == 0

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    [record] = [r for r in lines if r["request_id"] == rid]
    assert record["outcome"] == "completed"
    assert record["output_tokens"] == fake_upstream.scenario.output_tokens
    assert record["cost_usd"] is not None and record["cost_usd"] > 0


GRACEFUL = 8  # seconds: the master SIGKILLs a worker still running this long after SIGTERM
CUT = 2  # seconds before that the worker cuts what still runs (llmproxy.shutdown.margin)


@pytest.mark.parametrize("idle_client", [False, True], ids=["worker-exits", "worker-killed"])
def test_stream_outliving_the_graceful_timeout_is_cut_and_recorded(
        start_proxy: Callable[..., ProxyProcess], fake_upstream: FakeUpstream,
        pricing_raw: dict[str, Any], tmp_path: Path, idle_client: bool) -> None:
    """A stream far longer than GRACEFUL_TIMEOUT: the worker itself ends it shortly before the
    master's SIGKILL, closes the upstream connection and writes its usage and access records
    (``outcome: shutdown``). Then it exits by itself, or, while a client's idle keep-alive
    connection holds it, is killed: the records were written before."""
    records = tmp_path / "usage.jsonl"
    proxy = start_proxy(config=config_for(pricing_raw, records), workers=1,
                        env={"GRACEFUL_TIMEOUT": str(GRACEFUL), "KEEPALIVE": "30"})
    idle = requests.Session()
    if idle_client:  # a pooled connection, as SDK clients keep them
        assert idle.get(proxy.url + "/health", timeout=10).status_code == 200
    fake_upstream.script(fake_upstream.scripts.endless("openai", interval=0.05, count=100_000))
    rid = new_request_id()
    assert proxy.proc is not None
    received = 0
    with requests.post(proxy.url + CHAT, stream=True, timeout=30,
                       headers={"X-Request-ID": rid, "Connection": "close"},
                       json={"model": "gpt-4o", "stream": True, "messages": []}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_content(chunk_size=None)
        received += len(next(chunks))
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            for chunk in chunks:
                received += len(chunk)
        except requests.RequestException:  # the cut: a chunked body that never ends
            pass
        ended = time.monotonic() - signalled
    assert proxy.proc.wait(GRACEFUL + 10) == 0
    idle.close()
    log = proxy.log_text()
    print(f"\nstream cut {ended:.2f} s after SIGTERM (graceful timeout {GRACEFUL} s)")
    assert GRACEFUL - CUT - 0.5 < ended < GRACEFUL, "the stream was not cut before the SIGKILL"
    assert fake_upstream.client_gone.is_set(), "the upstream connection was left open"
    if idle_client:  # no exit handler of the worker ran
        assert "Worker exiting" not in log, "the idle connection was expected to hold it"
    else:
        assert "SIGKILL" not in log, "the master had to kill the worker"
        assert "Worker exiting" in log

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    [record] = [r for r in lines if r["request_id"] == rid]
    assert (record["outcome"], record["status"]) == ("shutdown", 200), record
    assert 0 < record["response_bytes"] and record["response_bytes"] >= received
    [access] = proxy.records_for(rid)
    assert access["outcome"] == "shutdown"


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGINT], ids=["SIGQUIT", "SIGINT"])
def test_quick_shutdown_records_running_streams(start_proxy: Callable[..., ProxyProcess],
                                                fake_upstream: FakeUpstream,
                                                pricing_raw: dict[str, Any], tmp_path: Path,
                                                sig: signal.Signals) -> None:
    """SIGQUIT/SIGINT: gunicorn exits the worker at once; running streams are cut and
    recorded first (``outcome: shutdown``)."""
    records = tmp_path / "usage.jsonl"
    proxy = start_proxy(config=config_for(pricing_raw, records), workers=1)
    fake_upstream.script(fake_upstream.scripts.endless("openai", interval=0.05, count=100_000))
    rid = new_request_id()
    assert proxy.proc is not None
    with requests.post(proxy.url + CHAT, stream=True, timeout=30,
                       headers={"X-Request-ID": rid},
                       json={"model": "gpt-4o", "stream": True, "messages": []}) as resp:
        chunks = resp.iter_content(chunk_size=None)
        next(chunks)
        proxy.proc.send_signal(sig)
        with pytest.raises(requests.RequestException):  # cut: the chunked body never ends
            for _ in chunks:
                pass
    assert proxy.proc.wait(15) == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["outcome"] for r in lines if r["request_id"] == rid] == ["shutdown"]
    assert [r["outcome"] for r in proxy.records_for(rid)] == ["shutdown"]
    assert fake_upstream.client_gone.is_set()
