"""A budget's kill switch in Redis: the flag every sidecar of the namespace polls, and its publish.

The sidecars stop admitting under a suspended budget within their poll interval
(at most 2 s), or within milliseconds when the pub/sub message reaches them.

Two keys per budget, in the budget's slot: `suspended` (present: suspended) and
`suspended:known` (present: the flag was written since Redis last lost its
data). A missing flag with no `known` key proves nothing, since Redis may have
restarted empty, so the sidecars keep the suspension they knew (and a sidecar
that knew none takes its config's `suspended`) until someone writes the switch
again: `kubetoll budget suspend|resume`, or the operator's `assert_suspensions`
from each TokenBudget's `spec.suspended`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from .redis_keys import RedisKeys

# Sets the flag as asked and marks it known, unless it is known already (then the
# running value, which `kubetoll budget` may have set faster than the spec moved, wins).
# KEYS: flag, known. ARGV: "1" to suspend, "0" to clear; the flag's value. Returns 1 if written.
_ASSERT = r"""
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[1] == '1' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], '1')
return 1
"""


def _event(budget: str, on: bool) -> bytes:
    return orjson.dumps({"budget": budget, "suspended": bool(on)})


async def set_suspended(client: Any, namespace: str, budget: str, on: bool) -> None:
    """Turn a budget's kill switch on or off and tell every subscribed sidecar."""
    keys = RedisKeys(namespace)
    k = keys.suspended(budget)
    # One transaction: a sidecar never reads `known` without the flag it vouches for.
    # Both keys share the budget's hash tag, so this works on Redis Cluster too.
    pipe = client.pipeline(transaction=True)
    if on:
        pipe.set(k, str(int(time.time())))
    else:
        pipe.delete(k)
    pipe.set(keys.suspension_known(budget), "1")
    await pipe.execute()
    await client.publish(keys.channel(), _event(budget, on))


async def get_suspended(client: Any, namespace: str, budget: str) -> bool:
    return bool(await client.exists(RedisKeys(namespace).suspended(budget)))


async def assert_suspensions(client: Any, namespace: str, wanted: Mapping[str, bool]) -> list[str]:
    """Write each budget's kill switch as its TokenBudget says, where Redis does not know it.

    Run by the operator on every pass over a namespace: after Redis restarted empty,
    this puts the flags back (and publishes them), which is what lets the sidecars
    drop a suspension they were keeping through the loss. Returns the budgets written.
    """
    keys = RedisKeys(namespace)
    written: list[str] = []
    for budget, on in sorted(wanted.items()):
        flag, known = keys.suspended(budget), keys.suspension_known(budget)
        if int(await client.eval(_ASSERT, 2, flag, known, "1" if on else "0", str(int(time.time())))):
            written.append(budget)
            await client.publish(keys.channel(), _event(budget, on))
    return written
