"""The access line written straight to a descriptor (the sidecar process) or through `logging` (elsewhere)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import socket
import time
from typing import Any

import orjson
import pytest

from kubetoll_sidecar import access_log as access_log_module
from kubetoll_sidecar.access_log import AccessLog
from support.harness import base_config

# What logging's "%(asctime)s %(levelname)s %(name)s %(message)s" gives (server.configure_logging).
LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} INFO kubetoll\.access (\{.*\})$")


def test_direct_lines_have_the_log_format_and_are_written_whole() -> None:
    r, w = os.pipe()
    log = AccessLog()
    log.write_to(w)
    big = {"request_id": "r" * 10_000, "route": "chat"}  # past PIPE_BUF: still one whole line
    log.write(orjson.dumps({"request_id": "a", "status": 200}))
    log.write(orjson.dumps(big))
    os.close(w)
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode().splitlines()
    assert len(lines) == 2
    parsed = [json.loads(LINE.match(line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert parsed == [{"request_id": "a", "status": 200}, big]


def test_a_closed_descriptor_loses_the_line_but_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    r, w = os.pipe()
    os.close(r)
    log = AccessLog()
    log.write_to(w)
    caplog.set_level(logging.INFO, logger="kubetoll.access")
    log.write(b'{"n": 1}')  # EPIPE: dropped (SIGPIPE is ignored by Python)
    log.write(b'{"n": 2}')  # and from then on through logging
    os.close(w)
    assert [rec.getMessage() for rec in caplog.records if rec.name == "kubetoll.access"] == ['{"n": 2}']


def test_without_a_descriptor_it_is_a_logging_record_and_the_level_decides(caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog()
    caplog.set_level(logging.WARNING, logger="kubetoll.access")
    assert not log.enabled  # --log-level WARNING: no access lines
    caplog.set_level(logging.INFO, logger="kubetoll.access")
    assert log.enabled
    log.write(b'{"route": "chat"}')
    assert [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "kubetoll.access"] == [
        {"route": "chat"}
    ]


def _read_available(r: int) -> bytes:
    os.set_blocking(r, False)
    try:
        return os.read(r, 1 << 20)
    except BlockingIOError:
        return b""


async def test_on_the_loop_lines_wait_for_the_timer_and_go_out_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    r, w = os.pipe()
    log = AccessLog()
    log.write_to(w)
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    for n in range(3):
        log.write(orjson.dumps({"n": n}))
    assert _read_available(r) == b""  # held until the timer
    await asyncio.sleep(access_log_module.FLUSH_SECONDS * 3)
    data = _read_available(r)
    assert [json.loads(LINE.match(x).group(1))["n"] for x in data.decode().splitlines()] == [0, 1, 2]  # type: ignore[union-attr]
    assert writes == [w]  # one syscall for the three lines
    os.close(r)
    os.close(w)


async def test_a_full_batch_is_written_at_once_without_waiting() -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for the batch: the write blocks otherwise
    log = AccessLog()
    log.write_to(w)
    line = orjson.dumps({"request_id": "x" * 1000})
    n = access_log_module.FLUSH_BYTES // len(line) + 1
    for _ in range(n):
        log.write(line)
    written = _read_available(r)  # before any timer could fire
    assert len(written) >= access_log_module.FLUSH_BYTES and written.endswith(b"\n")
    log.flush()
    assert len((written + _read_available(r)).splitlines()) == n
    os.close(r)
    os.close(w)


async def test_another_log_line_on_the_stream_flushes_the_pending_access_lines_first() -> None:
    r, w = os.pipe()
    log = AccessLog()
    log.write_to(w)
    stream = os.fdopen(os.dup(w), "w", buffering=1)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(log.flush_before)
    other = logging.getLogger("kubetoll.test_order")
    other.addHandler(handler)
    other.setLevel(logging.INFO)
    other.propagate = False
    try:
        log.write(b'{"n": 1}')
        other.warning("between")
        log.write(b'{"n": 2}')
        log.flush()
        lines = _read_available(r).decode().splitlines()
    finally:
        other.removeHandler(handler)
        stream.close()
        os.close(r)
        os.close(w)
    assert len(lines) == 3
    assert lines[0].endswith('kubetoll.access {"n": 1}')
    assert lines[1] == "kubetoll.test_order between"
    assert lines[2].endswith('kubetoll.access {"n": 2}')


def test_a_timer_left_on_an_ended_loop_does_not_strand_the_next_loops_lines() -> None:
    r, w = os.pipe()
    log = AccessLog()
    log.write_to(w)

    async def one() -> None:
        log.write(b'{"n": 1}')

    asyncio.run(one())  # ends before its timer fires: the line stays pending
    asyncio.run(one())  # a new loop arms its own timer...

    async def wait() -> None:
        await asyncio.sleep(access_log_module.FLUSH_SECONDS * 3)

    asyncio.run(wait())
    log.write(b'{"n": 2}')  # (no loop: written at once, after the pending ones)
    lines = _read_available(r).decode().splitlines()
    os.close(r)
    os.close(w)
    assert [x.split("kubetoll.access ", 1)[1] for x in lines] == ['{"n": 1}', '{"n": 1}', '{"n": 2}']


async def test_the_answer_is_written_before_its_metrics_and_access_line(
    sim: Any, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record stage (metrics, the access line) runs after the answer is on the wire: a record
    # that holds the event loop for half a second must not delay the caller's answer, and the
    # added latency it reports is the pipeline's, not the record's own time.
    sc = await start_sidecar(base_config(sim.url))
    pipeline = sc.sidecar.pipeline
    record = pipeline._record
    held: list[float] = []

    def slow_record(ctx: Any) -> None:
        held.append(time.monotonic())
        time.sleep(0.5)  # blocks the loop, as a slow record would
        record(ctx)

    monkeypatch.setattr(pipeline, "_record", slow_record)
    port = int(sc.url.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Kubetoll-Tenant: t1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )

    def call() -> tuple[float, bytes]:  # a client outside the event loop, so the held loop does not hold it
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(raw)
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(65536)
            head, _, rest = got.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            while len(rest) < length:
                rest += s.recv(65536)
            return time.monotonic() - started, got

    took, answer = await asyncio.to_thread(call)
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert held, "the record did not run"
    assert took < 0.4, f"the answer waited {took:.2f} s for the record"
    added = sum(
        s.value for m in sc.sidecar.metrics.added_latency.collect() for s in m.samples if s.name.endswith("_sum")
    )
    assert 0 < added < 0.4, added
