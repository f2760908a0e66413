"""The access line: one JSON line a request, `kubetoll.access`, written without the logging machinery.

Going through `logging` (a LogRecord, the handler's lock, the formatter, the
text stream) costs ~12 µs a line against ~2 µs for formatting the same line
and one `write(2)` (bench/access_line.py), and the access line is written once
a request. So the sidecar process (`configure_logging` in server.py) points it
straight at stderr's file descriptor, in the same format as its other log lines
(`2026-12-03 10:45:12,345 INFO kubetoll.access {...}`), each line written whole
by blocking writes, as the logging handler does. Anywhere else (tests, an
embedding program) it stays an ordinary `logging` record, so capturing and
filtering work as usual.

Lines are gathered and written together: one `write(2)` a line was ~8% of the
sidecar's CPU under load (a syscall costs 10-25 µs on a virtualised node, far
more than the line itself), so on the event loop a line waits at most
`FLUSH_SECONDS` (or until `FLUSH_BYTES` are pending) and the batch goes out in
one call. Order with the other log lines is kept: the stderr handler flushes the
pending access lines before it writes any record of its own (`flush_before`),
and they are flushed at exit. What a killed process (SIGKILL, OOM) had not
flushed, at most `FLUSH_SECONDS` of lines, is lost, as a logging handler loses
what is in a pipe's buffer; spend is never in these lines (that is the ledger).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import time

_logger = logging.getLogger("kubetoll.access")

FLUSH_SECONDS = 0.02  # the longest a line waits in the process
FLUSH_BYTES = 64 * 1024  # written at once past this (a burst does not hold memory)


class AccessLog:
    def __init__(self) -> None:
        self._fd: int | None = None
        self._second = -1
        self._stamp = b""
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def write_to(self, fd: int | None) -> None:
        """Write lines straight to `fd` (stderr's, in the sidecar process); None: through `logging`."""
        self.flush()
        self._fd = fd

    @property
    def enabled(self) -> bool:
        # The logger's level decides in both modes (configure_logging sets it, --log-level WARNING turns it off).
        return _logger.isEnabledFor(logging.INFO)

    def write(self, payload: bytes) -> None:
        """One access line; `payload` is the JSON object (orjson bytes)."""
        fd = self._fd
        if fd is None:
            _logger.info(payload.decode())
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # logging's default asctime, recomputed once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)).encode()
        line = b"%s,%03d INFO kubetoll.access %s\n" % (self._stamp, int((now - second) * 1000), payload)
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: nothing would flush later
            self.flush()
            return
        if self._timer is None or self._timer_loop is not loop:  # (a timer of a loop that has ended never fires)
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        """Write the pending lines now (the timer, a full batch, another log line, exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        fd = self._fd
        if fd is None:
            return
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            # stderr gone (a closed pipe): the lines are lost, as a logging handler would lose them; never a request.
            self._fd = None

    def flush_before(self, record: logging.LogRecord) -> bool:
        """A logging filter for the handler on the same stream: pending access lines go out first."""
        self.flush()
        return True


access_log = AccessLog()
atexit.register(access_log.flush)
