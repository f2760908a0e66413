"""Invalidating a cache policy's entries by hand (an operator's flush).

Every entry key carries the policy's generation, and the generation carries the
admin epoch stored at `kt:cache:{<ns>}:<policy>:epoch`. Bumping the epoch
(`INCR`) makes every entry written before it unreachable: each sidecar reads the
epochs once a second, drops its local copies and reads and writes under the
new generation from then on. `flush_policy` bumps the epoch and then deletes
the old keys so they do not wait for their TTL to free the memory.

Deleting needs `SCAN`, which a namespace's own ACL user does not get
(docs/redis-layout.md, "ACL"): Redis does not filter SCAN by the user's key
patterns, so it would list every namespace's key names. Under that user the flush
is the epoch bump alone, and the old keys expire by their TTL (every entry and
insert stream has one); the result says so (`swept` is False).

Three equivalent ways to flush (namespace `shop`, policy `faq`):

    kubetoll cache flush --redis-url redis://redis.kubetoll:6379/0 --namespace shop --policy faq
    redis-cli INCR 'kt:cache:{shop}:faq:epoch'        # the epoch alone; old keys expire by TTL
    await flush_policy(redis_client, "shop", "faq")   # from Python (an operator handler)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoPermissionError

from kubetoll_sidecar.cache import keys


@dataclass(frozen=True, slots=True)
class FlushResult:
    epoch: int  # the new epoch
    deleted: int  # keys removed (entries and insert streams of older generations)
    swept: bool = True  # False: this Redis user may not SCAN, so the old keys are left to their TTL


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


async def flush_policy(redis: Any, namespace: str, policy: str, batch: int = 500) -> FlushResult:
    """Invalidate every entry of `policy` in `namespace`. `redis` is a `redis.asyncio` client."""
    epoch_key = keys.epoch_key(namespace, policy)
    epoch = int(await redis.incr(epoch_key))
    pattern = _glob_escape(keys.policy_prefix(namespace, policy)) + "*"
    deleted = 0
    doomed: list[Any] = []
    ek = epoch_key.encode()
    found = aiter(redis.scan_iter(match=pattern, count=batch))
    try:
        key = await anext(found, None)
    except NoPermissionError:
        # A namespace's own user (see the module doc): the bump above is the flush.
        return FlushResult(epoch, 0, swept=False)
    while key is not None:
        if key not in (ek, epoch_key):
            doomed.append(key)
            if len(doomed) >= batch:
                deleted += int(await redis.unlink(*doomed))
                doomed.clear()
        key = await anext(found, None)
    if doomed:
        deleted += int(await redis.unlink(*doomed))
    return FlushResult(epoch, deleted)


async def policy_epoch(redis: Any, namespace: str, policy: str) -> int:
    return int(await redis.get(keys.epoch_key(namespace, policy)) or 0)
