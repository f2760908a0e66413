"""Wait for a log record, as it is emitted: for code that runs on a thread and reports through logging.

`kubetoll run`'s watcher ends every recompile with one log line; a test waits for
that line (a `threading.Condition` notified by the handler) instead of sleeping
and looking again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class LogEvents(logging.Handler):
    """Records of one logger, in order; `wait_for` consumes them up to the first that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._next = 0  # the first record `wait_for` has not looked at
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def wait_for(self, match: str | Callable[[str], bool], timeout: float = 30.0) -> str:
        """The message of the next record matching (a substring, or a predicate on the message).

        Records before it are passed over, so successive waits follow the order of events.
        `timeout` bounds a hang; it is not a speed claim.
        """
        test = (lambda m: match in m) if isinstance(match, str) else match

        def take() -> str | None:
            while self._next < len(self.records):
                message = self.records[self._next].getMessage()
                self._next += 1
                if test(message):
                    return message
            return None

        with self._cond:
            found: list[str] = []

            def ready() -> bool:
                message = take()
                if message is not None:
                    found.append(message)
                return bool(found)

            if not self._cond.wait_for(ready, timeout):
                seen = "\n".join(r.getMessage() for r in self.records[-20:])
                raise AssertionError(f"no log record matching {match!r} within {timeout:.0f}s; last records:\n{seen}")
            return found[0]


@contextmanager
def log_events(logger: str, level: int = logging.INFO) -> Iterator[LogEvents]:
    """A `LogEvents` on `logger` (at `level`) for the duration of the block."""
    log = logging.getLogger(logger)
    handler = LogEvents()
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(min(level, old_level) if old_level else level)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
