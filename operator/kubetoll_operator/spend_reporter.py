"""The spend reporter: what the sidecars spent, written back into the statuses.

A task per namespace with budgets runs every `spend_interval_seconds`. With a Redis
budget store (`--redis-url`) it reads what the sidecars wrote (totals, and the ledger's
cache hits and refusal records) and fills the TokenBudget spend fields and CachePolicy
counters (and each policy's Degraded condition, from the sidecars' reports of a lost
semantic tier), posts one Event per alert threshold per period, sets the SpendKnown and
ThresholdReached conditions, and writes each budget's kill switch from `spec.suspended`
where Redis lost it; without one it writes each budget's limits from the spec and
SpendKnown=False (NoSharedStore). spend.py has the arithmetic.

Apart from handlers.py because it runs on its own clock and reads Redis rather than the
custom resources: the compile (`handlers.Reconciler`, which owns the reporter) hands it
each namespace's RouterConfig and it reports against that until the next compile. Both
write the same statuses, whose `status.conditions` a merge patch replaces whole, so the
reporter writes through the Reconciler's status cache and per-namespace lock, handed to
it explicitly, and keeps the compile's conditions as they are.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from kubetoll_core.burn_rate import BurnRates

from . import cache_health, metrics, spend
from .resources import TokenBudgetSpec
from .status import status_differs

if TYPE_CHECKING:
    from .handlers import OperatorOptions

log = logging.getLogger("kubetoll.operator")

DEFAULT_THRESHOLDS: list[int] = TokenBudgetSpec.model_fields["alert_thresholds"].get_default(call_default_factory=True)


class SpendReporter:
    """One task per namespace that has budgets or cache policies.

    Not a kopf timer: a timer is per object and makes kopf put a finalizer on every
    TokenBudget (a budget could then not be deleted while no operator runs), its interval
    is fixed when the handler is registered, and one reading per namespace fetches every
    budget's meters and reads the ledger once for all of its cache policies.
    """

    def __init__(
        self,
        options: OperatorOptions,
        *,
        resources: Callable[[str], list[dict[str, Any]]],
        lock: Callable[[str], asyncio.Lock],
        current_status: Callable[[dict[str, Any]], dict[str, Any]],
        write_status: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], Awaitable[bool]],
        create_event: Callable[[str, str, str, str | None, str, str, str], Awaitable[None]],
        redis_auth: Callable[[], Any],
    ) -> None:
        self.options = options
        self.resources = resources  # the namespace's objects, from the Reconciler's kopf indexes
        self._lock = lock
        self._current_status = current_status
        self._write_status = write_status
        self._create_event = create_event
        self._redis_auth = redis_auth  # the mounted budget-store Secret (redis_auth.py), or None
        self.configs: dict[str, Any] = {}  # ns → the RouterConfig last compiled (so the API is logged in)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.alert_marks: dict[tuple[str, str, str, int], float] = {}  # (ns, budget, meter, threshold) → period end
        self.cache_counters: dict[str, spend.CacheCounter] = {}
        self.refusal_logs: dict[str, spend.RefusalLog] = {}  # ns → refusals read from the ledger
        self.burn_rates: dict[str, BurnRates] = {}  # ns → each cap's spend rate (projectedExhaustion)
        self.spend_ok: dict[str, bool] = {}  # ns → last reading succeeded (logs transitions only)
        self.spend_reports = 0
        self.redis: Any = None

    def compiled(self, namespace: str, config: Any) -> None:
        """A compile wrote `config` for the namespace: report against it from now on."""
        self.configs[namespace] = config
        # Without Redis the reporter still writes each budget's limits and SpendKnown=False (NoSharedStore).
        self._set_task(namespace, bool(config.budgets or (self.options.redis_url and config.cache_policies)))

    def forget(self, namespace: str) -> None:
        """The namespace has no kubetoll resources left."""
        self.configs.pop(namespace, None)
        self._set_task(namespace, False)

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.aclose(), self.options.redis_timeout_seconds)
            except Exception:  # closing: nothing left to do about it
                pass
            self.redis = None

    def _set_task(self, namespace: str, wanted: bool) -> None:
        task = self.tasks.get(namespace)
        if wanted and task is None:
            self.tasks[namespace] = asyncio.create_task(self._spend_loop(namespace), name=f"kubetoll-spend-{namespace}")
        elif not wanted and task is not None:
            task.cancel()
            del self.tasks[namespace]
            self.cache_counters.pop(namespace, None)
            self.refusal_logs.pop(namespace, None)
            self.burn_rates.pop(namespace, None)
            self.spend_ok.pop(namespace, None)

    async def _spend_loop(self, namespace: str) -> None:
        while True:
            try:
                await self.report_spend(namespace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a Kubernetes write failed, or a bug: try again next tick
                metrics.record_reconcile("spend", "failed")
                log.error(
                    "namespace %s: spend report failed, retrying in %gs: %s",
                    namespace,
                    self.options.spend_interval_seconds,
                    exc,
                )
            await asyncio.sleep(self.options.spend_interval_seconds)

    def _redis(self) -> Any:
        if self.redis is None:
            from kubetoll_core.redis_connect import RedisCredentials, connect_redis
            from kubetoll_core.router_config import BudgetStoreSettings

            # The operator's own credentials (its flags and environment), never a namespace's files.
            o = self.options
            creds = RedisCredentials(
                Path(o.redis_username_file) if o.redis_username_file else None,
                Path(o.redis_password_file) if o.redis_password_file else None,
                o.redis_password,
            )
            auth = self._redis_auth()
            if not creds.configured and auth is not None:  # its own keys of the mounted Secret
                creds = auth.operator_credentials()
            self.redis = connect_redis(
                BudgetStoreSettings(url=o.redis_url),
                creds,
                io_timeout=o.redis_timeout_seconds,
                client_name="kubetoll-operator",
            )
        return self.redis

    async def report_spend(self, namespace: str) -> None:
        """Read a namespace's spend from Redis once and write what changed."""
        from kubetoll_core.ledger_stream import period_totals
        from kubetoll_core.redis_keys import RETENTION_AFTER_PERIOD

        config = self.configs.get(namespace)
        if config is None:
            return
        objects = {
            (o.get("kind"), o["metadata"]["name"]): {**o, "metadata": {**o["metadata"], "namespace": namespace}}
            for o in self.resources(namespace)
        }
        budgets = [b for b in config.budgets if ("TokenBudget", b.name) in objects]
        policies = [p for p in config.cache_policies if ("CachePolicy", p.name) in objects]
        if not self.options.redis_url:
            await self._report_local(budgets, objects)
            return
        client = self._redis()
        now = time.time()
        timeout = self.options.redis_timeout_seconds
        self.spend_reports += 1

        totals: dict[str, list[Any]] = {}
        failure: Exception | None = None
        try:
            async with asyncio.timeout(timeout):
                for b in budgets:
                    # Day windows of past days and idle buckets expire sooner than this: not fetched.
                    totals[b.name] = await period_totals(
                        client, namespace, b.name, min_expiry=now + RETENTION_AFTER_PERIOD["day"]
                    )
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            failure = exc
        self._log_spend_transition(namespace, failure)
        if failure is None:  # else Redis is away, which the transition log says once
            await self._assert_suspensions(namespace, objects)
            # Before the budgets: the refusal records tell which meters admission refuses on.
            await self._read_ledger(namespace, now)
        refusals = self.refusal_logs.get(namespace) or spend.RefusalLog(self.options.refusal_window_seconds)
        rates = self.burn_rates.setdefault(namespace, BurnRates())
        rates.prune(now)

        for b in budgets:
            obj = objects[("TokenBudget", b.name)]
            thresholds = list((obj.get("spec") or {}).get("alertThresholds", DEFAULT_THRESHOLDS))
            if failure is not None:
                await self._write_spend_status(obj, {}, [spend.spend_known(False, type(failure).__name__)])
                continue
            report = spend.budget_report(
                b,
                totals[b.name],
                thresholds,
                now,
                self.options.tenants_over_budget,
                refused=refusals.recent(b.name, now),
                rates=rates,
            )
            await self._write_spend_status(obj, report.status, [spend.spend_known(True), report.threshold])
            for cap, threshold in report.alerts(thresholds):
                await self._post_alert(namespace, obj, cap, threshold)
        self.alert_marks = {k: end for k, end in self.alert_marks.items() if end > now}

        if policies and failure is None:
            await self._report_cache(namespace, config, policies, objects, now)
        metrics.record_reconcile("spend", "ok" if failure is None else "store_unavailable", time.time() - now)

    async def _assert_suspensions(self, namespace: str, objects: dict[tuple[Any, str], dict[str, Any]]) -> None:
        """Write each TokenBudget's `spec.suspended` into its kill switch where Redis does not know the switch.

        After Redis lost its data the sidecars keep the suspensions they knew until the switch
        is written again (kubetoll_core.kill_switch); this pass is what writes it.
        """
        from kubetoll_core.kill_switch import assert_suspensions
        from kubetoll_core.names import NAME_PATTERN

        wanted = {
            name: bool((obj.get("spec") or {}).get("suspended"))
            for (kind, name), obj in objects.items()
            if kind == "TokenBudget" and re.match(NAME_PATTERN, name)  # else no key can name it (nor compile it)
        }
        try:
            async with asyncio.timeout(self.options.redis_timeout_seconds):
                written = await assert_suspensions(self._redis(), namespace, wanted)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "namespace %s: kill switches not re-asserted in Redis, trying again next pass: %s: %s",
                namespace,
                type(exc).__name__,
                exc,
            )
            return
        if written:
            log.warning(
                "namespace %s: kill switch written from spec.suspended for %s: Redis had lost it (restarted empty?) "
                "or the budget was never switched before",
                namespace,
                ", ".join(f"{b} ({'suspended' if wanted[b] else 'not suspended'})" for b in written),
            )

    def _log_spend_transition(self, namespace: str, failure: Exception | None) -> None:
        ok = failure is None
        if self.spend_ok.get(namespace) == ok:
            return
        self.spend_ok[namespace] = ok
        if ok:
            log.info("namespace %s: reading spend from Redis", namespace)
        else:  # the URL carries no credentials (BudgetStoreSettings refuses them); the password is never in a message
            log.warning(
                "namespace %s: cannot read spend from Redis (%s: %s); statuses keep their last reading",
                namespace,
                type(failure).__name__,
                failure,
            )

    async def _write_spend_status(
        self, obj: dict[str, Any], fields: dict[str, Any], conditions: list[dict[str, Any]]
    ) -> None:
        async with self._lock(obj["metadata"]["namespace"]):
            current = self._current_status(obj)
            have = current.get("conditions") or []
            # The compile's conditions first, then the reporter's in a fixed order; one not given keeps its last value.
            given = {c["type"]: c for c in conditions}
            kept = {c.get("type"): c for c in have if c.get("type") in spend.SPEND_CONDITIONS}
            ours = [given.get(t) or kept[t] for t in spend.SPEND_CONDITIONS if t in given or t in kept]
            desired = {k: v for k, v in fields.items() if v is not None}
            desired["conditions"] = [c for c in have if c.get("type") not in spend.SPEND_CONDITIONS] + ours
            cleared = {k: None for k, v in fields.items() if v is None and k in current}
            if not cleared and not status_differs(desired, current):
                return
            await self._write_status(obj, {**desired, **cleared}, current)

    async def _post_alert(self, namespace: str, obj: dict[str, Any], cap: spend.MeterReading, threshold: int) -> None:
        """One Event per threshold, meter and period, whichever replica or restart gets there first.

        The mark is a Redis key set with SET NX (docs/redis-layout.md, `alert`): atomic
        between two replicas, kept across restarts, named after the meter (which ends with
        its period id, so a new period starts unmarked), expiring a day after the period.
        """
        from kubetoll_core.redis_keys import RedisKeys

        budget = obj["metadata"]["name"]
        mark = (namespace, budget, cap.meter, threshold)
        if mark in self.alert_marks:
            return
        client = self._redis()
        try:
            key = RedisKeys(namespace).alert_posted(budget, cap.meter, threshold)
        except ValueError:  # a tenant id no key can hold: its limit shows in the status, without an Event
            self.alert_marks[mark] = cap.period.end
            return
        timeout = self.options.redis_timeout_seconds
        try:
            claimed = await asyncio.wait_for(
                client.set(
                    key, f"{socket.gethostname()} {int(time.time())}", nx=True, exat=int(cap.period.end) + 86_400
                ),
                timeout,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "namespace %s: TokenBudget %s: alert %d%% not marked in Redis, trying again next time: %s",
                namespace,
                budget,
                threshold,
                type(exc).__name__,
            )
            return
        if claimed:
            try:
                await self._create_event(
                    namespace,
                    "TokenBudget",
                    budget,
                    obj["metadata"].get("uid"),
                    spend.alert_event_type(threshold),
                    "BudgetThresholdCrossed",
                    cap.alert_message(threshold),
                )
            except BaseException:
                # Not posted: drop the mark so this (or the other) replica posts it next time.
                try:
                    await asyncio.wait_for(client.delete(key), timeout)
                except Exception:
                    pass
                raise
            log.info("namespace %s: TokenBudget %s: %s", namespace, budget, cap.alert_message(threshold))
        self.alert_marks[mark] = cap.period.end

    async def _report_local(self, budgets: list[Any], objects: dict[tuple[Any, str], dict[str, Any]]) -> None:
        """No shared store: each budget's limits and periods from the spec, and SpendKnown=False (NoSharedStore)."""
        self.spend_reports += 1
        now = time.time()
        for b in budgets:
            obj = objects[("TokenBudget", b.name)]
            conditions = list(spend.NO_SHARED_STORE_CONDITIONS)
            await self._write_spend_status(obj, spend.local_budget_report(b, now), conditions)

    async def _read_ledger(self, namespace: str, now: float) -> None:
        """Read the ledger on from the namespace's cursor: cache hits and refusal records, each entry once."""
        from kubetoll_core.ledger_stream import read_ledger_page

        counter = self.cache_counters.setdefault(namespace, spend.CacheCounter())
        refusals = self.refusal_logs.setdefault(namespace, spend.RefusalLog(self.options.refusal_window_seconds))
        counter.roll(now)
        refusals.prune(now)
        client = self._redis()
        read = 0
        try:
            async with asyncio.timeout(self.options.redis_timeout_seconds):
                while read < self.options.cache_ledger_records_per_tick:
                    records, cursor, n = await read_ledger_page(client, namespace, counter.cursor, 1000)
                    counter.add(records)  # page by page: a tick cut short keeps what it read
                    refusals.add(records)
                    counter.cursor = cursor
                    read += n
                    if n < 1000:
                        break
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            log.debug("namespace %s: ledger read stopped after %d entries: %s", namespace, read, type(exc).__name__)

    async def _report_cache(
        self, namespace: str, config: Any, policies: list[Any], objects: dict[tuple[Any, str], Any], now: float
    ) -> None:
        counter = self.cache_counters.setdefault(namespace, spend.CacheCounter())
        routes = spend.policy_routes(config)
        health = await self._read_cache_health(namespace, policies, now)
        control = await self._read_error_control(namespace, policies, now)
        for p in policies:
            obj = objects[("CachePolicy", p.name)]
            # A policy whose reports could not be read keeps its last Degraded condition.
            conditions = [cache_health.degraded_condition(p, health[p.name])] if p.name in health else []
            fields = counter.status(routes.get(p.name, []))
            if p.name in control:  # else (unread) the last errorControl stays
                fields["errorControl"] = control[p.name]
            await self._write_spend_status(obj, fields, conditions)

    async def _read_error_control(self, namespace: str, policies: list[Any], now: float) -> dict[str, Any]:
        """Policy name -> its pooled `status.errorControl` (None without targetErrorRate: cleared)."""
        from kubetoll_core.cache_health import pooled_control_status, read_control_reports

        out: dict[str, Any] = {}
        try:
            async with asyncio.timeout(self.options.redis_timeout_seconds):
                for p in policies:
                    target = p.semantic.target_error_rate if p.semantic.enabled else None
                    if target is None:
                        out[p.name] = None
                        continue
                    reports = await read_control_reports(self._redis(), namespace, p.name, now)
                    out[p.name] = pooled_control_status(reports, target)
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            log.debug("namespace %s: error-control read stopped: %s", namespace, type(exc).__name__)
        return out

    async def _read_cache_health(self, namespace: str, policies: list[Any], now: float) -> dict[str, list[Any]]:
        """Policy name -> the live reports of a degraded semantic tier the sidecars wrote (cache_health.py)."""
        from kubetoll_core.cache_health import read_degraded

        out: dict[str, list[Any]] = {}
        try:
            async with asyncio.timeout(self.options.redis_timeout_seconds):
                for p in policies:
                    out[p.name] = (
                        await read_degraded(self._redis(), namespace, p.name, now) if p.semantic.enabled else []
                    )
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            log.debug("namespace %s: cache health read stopped: %s", namespace, type(exc).__name__)
        return out
