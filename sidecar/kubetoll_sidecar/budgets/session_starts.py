"""When each session began, for tiers whose per-session limits end with the session (`sessionIdleSeconds`).

A session's meters (usdPerSession, tokensPerSession) are named after the session id
and, where its tier sets `sessionIdleSeconds`, after the time the session began: a
session that has been idle that long starts afresh, with a whole allowance again,
though the app keeps sending the same id (a support chat reopened the next morning).

The start is shared by the namespace's sidecars through Redis, so a conversation
spread over pods is one session: one key per (tier, session) holding its start and
when it was last seen, read and renewed by every request (one short script call;
only requests with a session, in such a tier, make it). Without Redis, or while Redis is
away (one timeout, then a cool-down, as the cache's calls), the start is kept in
this sidecar: a session on one pod keeps its meters, and a session spread over pods
may start afresh on a pod that had not seen it; the budget meters themselves keep
their own fail mode.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kubetoll_core.redis_keys import RedisKeys

from ..cache.redis_guard import RedisGuard, RedisUnavailable

log = logging.getLogger("kubetoll.sessions")

# Sessions this sidecar remembers the start of (LRU): a few hundred bytes each.
MAX_LOCAL_SESSIONS = 50_000

# The session's start and when it was last seen, "<start>:<seen>" (epoch seconds, the sidecars' clocks):
# a session seen less than `idle` ago goes on, any other starts now. The key's TTL only clears away
# sessions long over; idleness is judged on the clock, so it does not depend on when Redis expires keys.
_START = """
local now, idle = tonumber(ARGV[1]), tonumber(ARGV[2])
local start, seen = now, now
local v = redis.call('GET', KEYS[1])
if v then
  local s, last = string.match(v, '^(%d+):(%d+)$')
  if s and now - tonumber(last) < idle then
    start, seen = tonumber(s), math.max(tonumber(last), now)
  end
end
redis.call('SET', KEYS[1], string.format('%d:%d', start, seen), 'EX', idle + 3600)
return start
"""


def session_digest(tier: str, session: str) -> str:
    """The key part of one session in one tier: hashed, so an app's id never reaches a key as typed."""
    return hashlib.blake2b(f"{tier}\0{session}".encode(), digest_size=16).hexdigest()


class SessionStarts:
    def __init__(
        self,
        namespace: str,
        client: Any | None,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_local: int = MAX_LOCAL_SESSIONS,
    ) -> None:
        self.keys = RedisKeys(namespace)
        self.guard = RedisGuard(client, timeout=0.05, cooldown=5.0, monotonic=monotonic)
        self._wall = wall
        self._max_local = max_local
        # digest -> [start, last seen] (wall seconds), least recently seen first.
        self._local: OrderedDict[str, list[float]] = OrderedDict()
        self._script: Any = None

    async def start_of(self, tier: str, session: str, idle_seconds: int) -> int:
        """When `session` began in `tier` (epoch seconds): now, for a new one or one idle `idle_seconds` or more."""
        now = self._wall()
        digest = session_digest(tier, session)
        local = self._local_start(digest, idle_seconds, now)
        if self.guard.available:
            key = self.keys.session_start(digest)
            try:
                got = await self.guard.call("session_start", lambda c: self._run(c, key, int(now), idle_seconds))
                shared = int(got)
            except (RedisUnavailable, ValueError, TypeError) as exc:
                log.debug("session start kept in this sidecar: %s", exc)
            else:
                self._local[digest][0] = shared
                return shared
        return local

    def _local_start(self, digest: str, idle_seconds: int, now: float) -> int:
        seen = self._local.get(digest)
        if seen is None or now - seen[1] >= idle_seconds:
            seen = [float(int(now)), now]
            self._local[digest] = seen
            if len(self._local) > self._max_local:
                self._local.popitem(last=False)
        else:
            seen[1] = now
            self._local.move_to_end(digest)
        return int(seen[0])

    async def _run(self, client: Any, key: str, now: int, idle_seconds: int) -> Any:
        if self._script is None:
            self._script = client.register_script(_START)
        return await self._script(keys=[key], args=[now, int(idle_seconds)])
