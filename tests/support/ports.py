"""Ports for the servers tests start, without the "find a free port, close it, bind it later" race.

A port found free and then closed can be taken by anything before the server
binds it (any outgoing connection on the machine draws its local port from the
same range). So:

- In-process servers bind port 0 themselves and report the port they got:
  `listening_socket()` gives a bound, listening socket for aiohttp's `SockSite`.
- kopf's webhook server binds with SO_REUSEPORT, so `reserved_port()` can hold the
  port for it (bound, not listening) until the test ends: the kernel hands it to
  nobody else, and only kopf's socket accepts connections.
- A port that must refuse connections (a dead backend): `refusing_port()`, bound
  and never listening.
- External processes that must be given a port (redis-server, the sidecar CLI)
  start through `start_on_free_port`: when the process reports the port taken
  (`PortTaken`), it is started again on another one.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


class PortTaken(RuntimeError):
    """The server could not bind its port: someone else has it."""


def listening_socket(host: str = LOCALHOST) -> socket.socket:
    """A TCP socket bound to port 0 on `host` and listening; `.getsockname()[1]` is its port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    s.setblocking(False)
    return s


@contextmanager
def reserved_port(host: str = LOCALHOST) -> Iterator[int]:
    """A port held for a server that binds it with SO_REUSEPORT (kopf's webhook server).

    Our socket is bound with SO_REUSEPORT but never listens: the server can bind the
    same port, connections go only to its listening socket, and no one else gets the
    port (bind(0) and outgoing connections skip it) while the context is open.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, 0))
        yield s.getsockname()[1]
    finally:
        s.close()


@contextmanager
def refusing_port(host: str = LOCALHOST) -> Iterator[int]:
    """A port where connections are refused: bound by us, never listening, for as long as the context is open."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        yield s.getsockname()[1]
    finally:
        s.close()


def candidate_port(host: str = LOCALHOST) -> int:
    """A port free at this moment, for a process we must give a port to.

    It can be taken before that process binds it: start the process through
    `start_on_free_port`, which tries another port when that happens.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_on_free_port(start: Callable[[int], T], *, attempts: int = 5, port: Callable[[], int] = candidate_port) -> T:
    """`start(port)` on a fresh candidate port, again on a new one while it raises `PortTaken`."""
    last: PortTaken | None = None
    for _ in range(attempts):
        try:
            return start(port())
        except PortTaken as exc:
            last = exc
    raise RuntimeError(f"no free port after {attempts} attempts: {last}")


def is_address_in_use(text: str) -> bool:
    """Does a server's error output say its port was taken? (Redis, aiohttp and Python all word it so.)"""
    lowered = text.lower()
    return "address already in use" in lowered or f"errno {errno.EADDRINUSE}" in lowered
