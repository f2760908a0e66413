"""The access line written straight to a descriptor (the sidecar process) or through `logging` (elsewhere)."""

from __future__ import annotations

import json
import logging
import os
import re

import orjson
import pytest

from kubetoll_sidecar.access_log import AccessLog

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
