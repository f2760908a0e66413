"""A budget's kill switch in Redis: the flag every sidecar of the namespace polls, and its publish.

The sidecars stop admitting under a suspended budget within their poll interval
(at most 2 s), or within milliseconds when the pub/sub message reaches them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from .redis_keys import RedisKeys


async def set_suspended(client: Any, namespace: str, budget: str, on: bool) -> None:
    """Turn a budget's kill switch on or off and tell every subscribed sidecar."""
    keys = RedisKeys(namespace)
    k = keys.suspended(budget)
    if on:
        await client.set(k, str(int(time.time())))
    else:
        await client.delete(k)
    await client.publish(keys.channel(), orjson.dumps({"budget": budget, "suspended": bool(on)}))


async def get_suspended(client: Any, namespace: str, budget: str) -> bool:
    return bool(await client.exists(RedisKeys(namespace).suspended(budget)))
