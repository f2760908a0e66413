"""The access line: one JSON line a request, `kubetoll.access`, written without the logging machinery.

Going through `logging` (a LogRecord, the handler's lock, the formatter, the
text stream) costs ~12 µs a line against ~2 µs for formatting the same line
and one `write(2)` (bench/access_line.py), and the access line is written once
a request. So the sidecar process (`configure_logging` in server.py) points it
straight at stderr's file descriptor, in the same format as its other log lines
(`2026-12-03 10:45:12,345 INFO kubetoll.access {...}`), each line written whole
by one blocking write, as the logging handler does. Anywhere else (tests, an
embedding program) it stays an ordinary `logging` record, so capturing and
filtering work as usual.
"""

from __future__ import annotations

import logging
import os
import time

_logger = logging.getLogger("kubetoll.access")


class AccessLog:
    def __init__(self) -> None:
        self._fd: int | None = None
        self._second = -1
        self._stamp = b""

    def write_to(self, fd: int | None) -> None:
        """Write lines straight to `fd` (stderr's, in the sidecar process); None: through `logging`."""
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
        try:
            while line:
                line = line[os.write(fd, line) :]
        except OSError:
            # stderr gone (a closed pipe): the line is lost, as a logging handler would lose it; never the request.
            self._fd = None


access_log = AccessLog()
