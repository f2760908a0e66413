"""What the sidecar remembers of Batch API objects: which backend holds each id, and the batches it must settle.

Two things, both kept across a restart:

- **known objects**: file and batch id -> the backend that holds it (and, for a
  batch input file uploaded through the sidecar, its `InputSummary`), so a later
  `GET /v1/files/{id}` or `POST /v1/batches` reaches the right backend. Bounded:
  `MAX_KNOWN` ids in this process (the oldest go first); in Redis each id's key
  expires after `KNOWN_TTL_SECONDS`.
- **pending batches**: a batch whose reservation is open, with what settling it
  needs (meters' tenant, tier and creation time, the amounts reserved, the price).
  Removed when it is settled (`finish`, the commit point).

Where: with a Redis budget store, in Redis (`RedisRegistry`; every sidecar of the
namespace sees every id, docs/redis-layout.md), else in `server.stateDir`
(`FileRegistry`, one file written whole, as `budgets/journal.py` writes its own),
else in process memory only.

Who settles: a pending batch has an **owner**, the pod whose sidecar holds its
reservation (the pod name, stable across the sidecar container's restarts). In
Redis an owner is alive while its key `batches:alive:<owner>` is renewed by its
poller; a pending batch whose owner is not alive is adopted by another sidecar
(one wins: a script moves the owner only if it is still the old one). `finish`
removes the batch only if the caller still owns it, so one batch is settled
once, however many sidecars look at it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from kubetoll_core.redis_keys import RedisKeys, check_upstream_id

from .batch_files import InputSummary

log = logging.getLogger("kubetoll.batches")

MAX_KNOWN = 10_000  # ids remembered in one process
KNOWN_TTL_SECONDS = 35 * 86_400  # an id's key in Redis (batches last a day; their files a while longer)
_FILE_VERSION = 1
_FILE_NAME = "batches.json"


@dataclass(slots=True)
class KnownObject:
    kind: str  # "file" | "batch"
    backend: str
    created: float  # epoch seconds
    input: InputSummary | None = None  # a batch input file uploaded through the sidecar

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"kind": self.kind, "backend": self.backend, "created": self.created}
        if self.input is not None:
            doc["input"] = self.input.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> KnownObject:
        inp = doc.get("input")
        return cls(
            str(doc["kind"]),
            str(doc["backend"]),
            float(doc["created"]),
            InputSummary.from_json(inp) if isinstance(inp, dict) else None,
        )


@dataclass(slots=True)
class PendingBatch:
    """A batch whose reservation is open: what settling it needs."""

    id: str
    backend: str
    route: str
    tenant: str
    tier: str
    created: float  # epoch seconds: the calendar periods its meters are in
    input_file_id: str
    lines: int
    usd: float  # reserved on each USD window
    tokens: float  # reserved on each token window
    price: dict[str, Any]  # the batch price it settles at (`batches.price_to_json`)
    owner: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # fields a newer sidecar wrote, kept as they are

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        extra = doc.pop("extra")
        return {**extra, **doc}

    @classmethod
    def from_json(cls, doc: Any) -> PendingBatch:
        names = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            id=str(doc["id"]),
            backend=str(doc["backend"]),
            route=str(doc["route"]),
            tenant=str(doc["tenant"]),
            tier=str(doc["tier"]),
            created=float(doc["created"]),
            input_file_id=str(doc["input_file_id"]),
            lines=int(doc["lines"]),
            usd=float(doc["usd"]),
            tokens=float(doc["tokens"]),
            price=dict(doc["price"]),
            owner=str(doc.get("owner", "")),
            extra={k: v for k, v in doc.items() if k not in names},
        )


class BatchRegistry(Protocol):
    kind: str  # "redis", "file" or "memory": where the map is kept

    async def remember(self, object_id: str, obj: KnownObject, *, replace: bool = True) -> None:
        """Note which backend holds an id. `replace=False`: only if nothing is known of it yet."""
        ...

    async def lookup(self, object_id: str) -> KnownObject | None: ...

    async def add_pending(self, batch: PendingBatch) -> None:
        """Persist a batch whose reservation was just taken, owned by this sidecar."""
        ...

    async def claim(self) -> list[PendingBatch]:
        """The pending batches this sidecar settles: its own, and those it adopted from an owner gone."""
        ...

    async def finish(self, batch_id: str) -> bool:
        """Remove a pending batch before settling it. False: another sidecar owns (or settled) it."""
        ...

    async def heartbeat(self, ttl: float) -> None:
        """Say this owner is alive for `ttl` seconds (each poll)."""
        ...


class _Known:
    """The ids this process remembers, oldest first, at most MAX_KNOWN."""

    def __init__(self) -> None:
        self.items: OrderedDict[str, KnownObject] = OrderedDict()

    def get(self, object_id: str) -> KnownObject | None:
        return self.items.get(object_id)

    def put(self, object_id: str, obj: KnownObject, replace: bool) -> bool:
        if not replace and object_id in self.items:
            return False
        self.items[object_id] = obj
        self.items.move_to_end(object_id)
        while len(self.items) > MAX_KNOWN:
            self.items.popitem(last=False)
        return True


class MemoryRegistry:
    """In this process only; `FileRegistry` adds the file."""

    kind = "memory"

    def __init__(self) -> None:
        self._known = _Known()
        self._pending: dict[str, PendingBatch] = {}

    def _changed(self) -> None:
        return None  # nothing to write

    async def remember(self, object_id: str, obj: KnownObject, *, replace: bool = True) -> None:
        if self._known.put(object_id, obj, replace):
            self._changed()

    async def lookup(self, object_id: str) -> KnownObject | None:
        return self._known.get(object_id)

    async def add_pending(self, batch: PendingBatch) -> None:
        self._pending[batch.id] = batch
        try:
            self._changed()
        except Exception:
            del self._pending[batch.id]  # not persisted: the caller holds it and tries again
            raise

    async def claim(self) -> list[PendingBatch]:
        return list(self._pending.values())  # one process per state directory: all of them are this one's

    async def finish(self, batch_id: str) -> bool:
        batch = self._pending.pop(batch_id, None)
        if batch is None:
            return False
        try:
            self._changed()
        except Exception:
            self._pending[batch_id] = batch  # still pending on disk: settled by the next try
            raise
        return True

    async def heartbeat(self, ttl: float) -> None:
        return None


class FileRegistry(MemoryRegistry):
    """`batches.json` in the state directory, written whole (temporary file, then rename) on every change."""

    kind = "file"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._load()

    @classmethod
    def open(cls, state_dir: str | None) -> MemoryRegistry:
        """A FileRegistry when the directory is usable, else a MemoryRegistry (logged)."""
        p = Path(state_dir) if state_dir else None
        if p is None or not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            log.info(
                "state directory %s is missing or not writable: pending batches are not kept across restarts "
                "(a pod gets one from the injector)",
                p,
            )
            return MemoryRegistry()
        return cls(p / _FILE_NAME)

    def _load(self) -> None:
        try:
            doc = orjson.loads(self.path.read_bytes())
            if not isinstance(doc, dict) or doc.get("version") != _FILE_VERSION:
                raise ValueError(f"not a version {_FILE_VERSION} batches file")
            for object_id, obj in dict(doc["known"]).items():
                self._known.put(object_id, KnownObject.from_json(obj), True)
            for batch_id, b in dict(doc["pending"]).items():
                self._pending[batch_id] = PendingBatch.from_json(b)
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            bad = self.path.with_name(self.path.name + ".bad")
            log.warning("batches file %s cannot be read (%s): kept as %s, not used", self.path, exc, bad.name)
            try:
                os.replace(self.path, bad)
            except OSError:
                pass

    def _changed(self) -> None:
        doc = {
            "version": _FILE_VERSION,
            "known": {k: v.to_json() for k, v in self._known.items.items()},
            "pending": {k: v.to_json() for k, v in self._pending.items()},
        }
        # No fsync, as for the journal: what this guards against is the process ending, and
        # the page cache outlives that.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_bytes(orjson.dumps(doc))
        os.replace(tmp, self.path)


# A pending batch and its owner, together (one script: atomic, and in Cluster mode one slot).
_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# Move a pending batch's owner from `old` to `new`, only if it is still `old` (one adopter wins).
_ADOPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""
# Remove a pending batch, only if `owner` still owns it: the commit point of its settlement.
_FINISH = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class RedisRegistry:
    """The namespace's Batch API map in Redis (key layout: docs/redis-layout.md, "Batch API")."""

    kind = "redis"

    def __init__(self, client: Any, namespace: str, owner: str) -> None:
        self.client = client
        self.keys = RedisKeys(namespace)
        self.owner = owner
        self._known = _Known()  # a cache in front of Redis

    async def remember(self, object_id: str, obj: KnownObject, *, replace: bool = True) -> None:
        try:
            key = self.keys.upstream_object(object_id)
        except ValueError:
            self._known.put(object_id, obj, replace)  # not an id a key can carry: this process only
            return
        if not self._known.put(object_id, obj, replace):
            return
        await self.client.set(key, orjson.dumps(obj.to_json()).decode(), ex=KNOWN_TTL_SECONDS, nx=not replace)

    async def lookup(self, object_id: str) -> KnownObject | None:
        found = self._known.get(object_id)
        if found is not None:
            return found
        try:
            check_upstream_id(object_id)
        except ValueError:
            return None
        raw = await self.client.get(self.keys.upstream_object(object_id))
        if raw is None:
            return None
        try:
            found = KnownObject.from_json(orjson.loads(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("the entry of %s in Redis cannot be read: treated as unknown", object_id)
            return None
        self._known.put(object_id, found, True)
        return found

    async def add_pending(self, batch: PendingBatch) -> None:
        batch.owner = self.owner
        doc = orjson.dumps(batch.to_json()).decode()
        await self.client.eval(
            _ADD, 2, self.keys.batches_pending(), self.keys.batch_owners(), batch.id, doc, self.owner
        )

    async def claim(self) -> list[PendingBatch]:
        owners: dict[str, str] = await self.client.hgetall(self.keys.batch_owners())
        mine = [b for b, o in owners.items() if o == self.owner]
        others = sorted({o for o in owners.values() if o != self.owner})
        alive: dict[str, bool] = {}
        for o in others:
            try:
                key = self.keys.batch_owner_alive(o)
            except ValueError:
                alive[o] = False
                continue
            alive[o] = bool(await self.client.exists(key))
        for batch_id, o in owners.items():
            if o != self.owner and not alive[o]:
                won = await self.client.eval(_ADOPT, 1, self.keys.batch_owners(), batch_id, o, self.owner)
                if won:
                    log.warning("batch %s: its owner %s stopped polling; this sidecar settles it", batch_id, o)
                    mine.append(batch_id)
        if not mine:
            return []
        raws = await self.client.hmget(self.keys.batches_pending(), mine)
        out: list[PendingBatch] = []
        for batch_id, raw in zip(mine, raws):
            if raw is None:
                continue
            try:
                out.append(PendingBatch.from_json(orjson.loads(raw)))
            except (ValueError, KeyError, TypeError):
                log.error("pending batch %s in Redis cannot be read: it is not settled by this sidecar", batch_id)
        return out

    async def finish(self, batch_id: str) -> bool:
        done = await self.client.eval(
            _FINISH, 2, self.keys.batch_owners(), self.keys.batches_pending(), batch_id, self.owner
        )
        return bool(done)

    async def heartbeat(self, ttl: float) -> None:
        await self.client.set(self.keys.batch_owner_alive(self.owner), "1", px=int(ttl * 1000))
