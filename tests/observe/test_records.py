"""Usage records: one JSON line per request, size-based rotation, failures logged not raised."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from llmproxy.exchange import Exchange, ResponseMeta, Usage
from llmproxy.observe.records import MAX_FIELD_CHARS, UsageRecordSink, record_of


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_records(directory: Path, name: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for file in directory.glob(name + "*"):
        if not file.name.endswith(".lock"):
            out.extend(lines(file))
    return out


def test_record_carries_the_terminal_event_without_secrets() -> None:
    ex = Exchange("rid-1", "POST", "/gemini/v1beta/models/x:generateContent?key=REDACTED",
                  provider="gemini", dialect="gemini", model="gemini-2.5-flash", user="alice",
                  user_source="header", api_key="AIza-secret-value", key_fingerprint="fp_abc",
                  streaming=True, status=200, started_wall=1_700_000_000.0)
    ex.meta = ResponseMeta(model="gemini-2.5-flash", finish_reason="STOP",
                           usage=Usage(input_tokens=10, output_tokens=4, reasoning_tokens=2,
                                       total_tokens=16))
    ex.finish()
    ex.cost_usd = 0.00125
    rec = record_of(ex)
    assert rec["request_id"] == "rid-1"
    assert rec["user"] == "alice" and rec["key_fingerprint"] == "fp_abc"
    assert (rec["provider"], rec["model"], rec["outcome"]) == ("gemini", "gemini-2.5-flash",
                                                               "completed")
    assert (rec["input_tokens"], rec["output_tokens"], rec["reasoning_tokens"]) == (10, 4, 2)
    assert rec["cost_usd"] == 0.00125
    assert rec["started_at"] == "2023-11-14T22:13:20.000Z"
    assert rec["duration_ms"] is not None and rec["duration_ms"] >= 0
    assert "AIza-secret-value" not in json.dumps(rec)


def test_text_chosen_by_others_is_cut_in_the_record() -> None:
    huge = "x" + "-001" * 500_000
    ex = Exchange("rid-2", "POST", "/meta/" + "u" * 3000 + "/openai/v1/files",
                  provider="openai", dialect="openai", model=huge, user="u" * 5000)
    ex.meta = ResponseMeta(model=huge, finish_reason=huge, response_id=huge)
    ex.finish()
    rec = record_of(ex)
    for name in ("path", "model", "user", "response_model", "finish_reason",
                 "upstream_request_id"):
        assert len(rec[name]) == MAX_FIELD_CHARS and rec[name].endswith("\u2026"), name
    assert rec["model"].startswith("x-001-001")
    assert len(json.dumps(rec)) < 20 * MAX_FIELD_CHARS
    short = record_of(Exchange("rid-3", "GET", "/openai/v1/models", model="m" * MAX_FIELD_CHARS))
    assert short["model"] == "m" * MAX_FIELD_CHARS  # at the limit: kept whole


def test_records_are_written_one_json_line_each(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = UsageRecordSink(str(path), max_bytes=1 << 20, backups=2)
    for i in range(50):
        assert sink.write({"request_id": f"r{i}", "cost_usd": i / 1000, "user": "ünï"})
    sink.close()
    got = lines(path)
    assert [r["request_id"] for r in got] == [f"r{i}" for i in range(50)]
    assert got[3]["user"] == "ünï"


def test_rotation_keeps_backups_and_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    max_bytes = 2_000
    sink = UsageRecordSink(str(path), max_bytes=max_bytes, backups=50)
    for i in range(200):
        sink.write({"request_id": f"r{i:04d}", "pad": "x" * 60})
    sink.close()
    files = sorted(p for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert len(files) > 3  # ~90 bytes a line, 200 lines, 2 kB files
    assert all(f.stat().st_size <= max_bytes for f in files)
    ids = sorted(r["request_id"] for r in all_records(tmp_path, "usage.jsonl"))
    assert ids == [f"r{i:04d}" for i in range(200)]


def test_rotation_drops_the_oldest_beyond_backups(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = UsageRecordSink(str(path), max_bytes=500, backups=2)
    for i in range(100):
        sink.write({"request_id": f"r{i:04d}", "pad": "y" * 40})
    sink.close()
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["usage.jsonl", "usage.jsonl.1", "usage.jsonl.2"]
    newest = lines(path)
    assert newest[-1]["request_id"] == "r0099"


def test_two_writers_sharing_a_file_interleave_whole_lines(tmp_path: Path) -> None:
    """Two sinks on one path stand for two gunicorn workers: rotation by one is seen by the
    other, every line is whole and none is lost."""
    path = tmp_path / "usage.jsonl"
    sinks = [UsageRecordSink(str(path), max_bytes=3_000, backups=1000) for _ in range(2)]

    def produce(n: int) -> None:
        for i in range(300):
            sinks[n].write({"request_id": f"w{n}-{i:04d}", "pad": "z" * 50})

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        sink.close()
    ids = sorted(r["request_id"] for r in all_records(tmp_path, "usage.jsonl"))
    assert ids == sorted(f"w{n}-{i:04d}" for n in range(2) for i in range(300))
    files = [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert all(p.stat().st_size <= 3_000 for p in files)


def test_unwritable_path_is_logged_not_raised(tmp_path: Path,
                                              records_log: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    drops: list[str] = []
    sink = UsageRecordSink(str(blocker / "usage.jsonl"), max_bytes=1000, backups=1,
                           on_drop=drops.append)
    for i in range(5):
        assert sink.write({"request_id": f"r{i}"})  # queued: the caller never sees I/O
    sink.close()
    assert drops == ["write_error"] * 5
    errors = [r for r in records_log.records if "cannot write" in r.getMessage()]
    assert len(errors) == 1  # rate-limited: a failing disk does not flood the log


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_is_logged_not_fatal(tmp_path: Path,
                                                 records_log: pytest.LogCaptureFixture) -> None:
    """/dev/full fails every write with ENOSPC, like a full disk."""
    link = tmp_path / "usage.jsonl"
    link.symlink_to("/dev/full")
    drops: list[str] = []
    sink = UsageRecordSink(str(link), max_bytes=0, backups=0, on_drop=drops.append)
    sink.write({"request_id": "lost"})
    sink.close()
    assert drops == ["write_error"]
    assert any("No space left" in r.getMessage() for r in records_log.records)


def test_a_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    drops: list[str] = []
    sink = UsageRecordSink(str(path), max_bytes=1 << 20, backups=1, queue_size=1,
                           on_drop=drops.append)
    # Hold the writer inside the interprocess lock so nothing leaves the queue.
    handler = sink._handler  # noqa: SLF001 - the test needs to stall the writer
    entered = threading.Event()
    release = threading.Event()
    original = handler.emit

    def stalled_emit(record: logging.LogRecord) -> None:
        entered.set()
        release.wait(5)
        original(record)

    handler.emit = stalled_emit  # type: ignore[method-assign]
    assert sink.write({"request_id": "first"})
    assert entered.wait(5)
    assert sink.write({"request_id": "queued"})
    assert not sink.write({"request_id": "dropped"})
    assert drops == ["queue_full"]
    release.set()
    sink.close()
    assert [r["request_id"] for r in lines(path)] == ["first", "queued"]
    assert not sink.write({"request_id": "after-close"})
    assert drops == ["queue_full", "closed"]


def test_flush_waits_for_the_queued_records_and_keeps_the_sink_open(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = UsageRecordSink(str(path), max_bytes=1 << 20, backups=1)
    handler = sink._handler  # noqa: SLF001 - the test needs to stall the writer
    release = threading.Event()
    original = handler.emit

    def slow_emit(record: logging.LogRecord) -> None:
        release.wait(5)
        original(record)

    handler.emit = slow_emit  # type: ignore[method-assign]
    for i in range(3):
        assert sink.write({"request_id": f"r{i}"})
    assert not sink.flush(timeout=0.05)  # the writer is held: not all written in time
    release.set()
    assert sink.flush(timeout=5)
    assert [r["request_id"] for r in lines(path)] == ["r0", "r1", "r2"]
    assert sink.write({"request_id": "after"})  # still open
    sink.close()
    assert [r["request_id"] for r in lines(path)][-1] == "after"
