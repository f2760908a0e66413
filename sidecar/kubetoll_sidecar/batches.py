"""The Batch API through the sidecar: `/v1/files` and `/v1/batches` on OpenAI-family backends, inside the budget.

A team runs a bulk job at batch prices (half the standard rate at OpenAI) and it
still counts against its budgets, from the moment it is created:

1. **Upload** (`POST /v1/files`, `purpose=batch`): the sidecar reads every line
   (`batch_files.route_input`: the route each line's `model` names, the rule and
   backend, the prompt estimate and output reservation the pipeline would make),
   writes the lines again for that backend and uploads them there. It keeps which
   backend holds the file and the file's `InputSummary` (`batch_registry`).
2. **Create** (`POST /v1/batches`): the whole batch's estimate, at batch prices
   (`kubetoll_core.prices.resolve_batch_price`), is reserved on every calendar
   window the batch falls under (USD and token caps, the tenant tier's USD per
   day and month; tenant and tier from the create request's headers, as for any
   request), all or nothing, before the create goes upstream. A batch that does
   not fit is a 429 in OpenAI's format; one larger than a whole limit a 400.
   Per-minute buckets are not charged: the provider runs a batch's lines over
   hours at its own pace.
3. **Settle**: when the batch is `completed`, `failed`, `expired` or
   `cancelled` (seen by the poller, or by any call that returns the batch), its
   output file is read and the reservation is settled with the sum of each
   line's `usage` at the batch price it was created with; one ledger record per
   line, tagged with `batch_id`. What the output does not use (a cancelled or
   expired batch's remaining lines, failed lines) is released.

The reservation is held open, not charged at create: a store's reservation is
renewed for as long as this process lives (the Redis store keeps it in its lease
floor), and the pending batch is persisted, so the next process of the pod (or,
with Redis, another sidecar once this pod stops polling) reserves it again,
unenforced, before settling it. docs/sidecar.md ("Batches") states what that
means for the accounting. Everything else (listing, retrieving, file content,
delete, cancel) is passed through to the backend that holds the id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import astuple
from typing import IO, Any, TypeVar

import aiohttp
import orjson
from aiohttp import BodyPartReader, web

from kubetoll_core.enums import Provider
from kubetoll_core.periods import Clock
from kubetoll_core.prices import Rates, ResolvedPrice, resolve_batch_price
from kubetoll_core.router_config import Backend
from kubetoll_core.spend_record import SpendRecord

from .batch_files import (
    MAX_FILE_BYTES,
    OutputLine,
    OutputReader,
    RoutedInput,
    route_input,
    spool,
    upstream_line_url,
)
from .batch_registry import BatchRegistry, KnownObject, PendingBatch
from .budgets.admission import NeverFits, NoDowngradeBackends, Rejected, reserve_with_policy, tightest
from .budgets.store import BudgetStore, Hold, Meter, Reservation, StoreUnavailable, Suspended
from .budgets.suspensions import cancelling
from .credentials import CredentialStore, MissingCredential
from .errors import ApiError, bad_request, budget_suspended, store_unavailable
from .forwarder import BackendRuntime, translator_class
from .ledger import Ledger
from .metrics import Metrics
from .providers.openai import openai_error_object
from .request_parsing import expect_continue, read_body
from .state import RouterState

log = logging.getLogger("kubetoll.batches")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_PENDING_BATCHES = 1_000  # batches one sidecar holds reservations for at once
TRANSFER_TIMEOUT_SECONDS = 600.0  # an upload or a file's content, at the least
MAX_FIELD_BYTES = 64 * 1024  # a form field of an upload other than the file
MIN_OWNER_ALIVE_SECONDS = 120.0  # an owner that has not polled for this long (or 3 polls) is gone
WARN_EVERY_SECONDS = 600.0
CLOSE_WAIT_SECONDS = 5.0  # how long `close` waits, at most, for the poller and settlements to stop
_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_FAMILY = (Provider.openai, Provider.azure_openai, Provider.openai_compatible)

PromptEstimate = Callable[..., int]
T = TypeVar("T")


def price_to_json(p: ResolvedPrice) -> dict[str, Any]:
    return {"base": list(astuple(p.base)), "tiers": [[s, list(astuple(r))] for s, r in p.tiers], "source": p.source}


def price_from_json(doc: Mapping[str, Any]) -> ResolvedPrice:
    return ResolvedPrice(
        Rates(*map(float, doc["base"])),
        tuple((int(s), Rates(*map(float, r))) for s, r in doc.get("tiers") or ()),
        source=str(doc.get("source", "")),
    )


def owner_id(pod: str) -> str:
    """The owner name of this pod's batches: its pod name as a plain key part."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in pod)[:100]
    return cleaned or "sidecar"


def _json(obj: Any, backend: str = "", status: int = 200, extra: Mapping[str, str] | None = None) -> web.Response:
    headers = {"x-kubetoll-backend": backend} if backend else {}
    headers.update(extra or {})
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json", headers=headers)


def _not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, f"No such {kind} object: {object_id}", "invalid_request_error", None, "id")


class BatchManager:
    """The files and batches routes, the reservations of pending batches, and the poller that settles them."""

    def __init__(
        self,
        get_state: Callable[[], RouterState],
        store: BudgetStore,
        ledger: Ledger,
        metrics: Metrics,
        clock: Clock,
        credentials: CredentialStore,
        registry: BatchRegistry,
        estimate_prompt: PromptEstimate,
        output_reservation: Callable[..., int],
        workload: str = "",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._get_state = get_state
        self.store = store
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.credentials = credentials
        self.registry = registry
        # The pipeline's own prompt estimate and output reservation, so a batch line is
        # estimated exactly as the same request sent directly would be.
        self._estimate_prompt = estimate_prompt
        self._output_reservation = output_reservation
        self.workload = workload
        self._mono = monotonic
        self.pending: dict[str, PendingBatch] = {}  # batches this sidecar settles
        self._held: dict[str, Reservation | None] = {}  # their reservations (None: none could be taken)
        self._unsaved: set[str] = set()  # pending batches the registry has not taken yet
        self._settling: set[str] = set()
        self._committing: set[asyncio.Future[Any]] = set()  # creates and settlements that must not stop half-way
        self._warned: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._poll_lock = asyncio.Lock()
        self.settled_total = 0  # batches settled by this process (tests and diagnostics)

    # ------------------------------------------------------------------ lifecycle

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self.upload_file, expect_handler=self._expect_upload)
        router.add_get("/v1/files", self.list_files)
        router.add_get("/v1/files/{file_id}", self.get_file)
        router.add_get("/v1/files/{file_id}/content", self.file_content)
        router.add_delete("/v1/files/{file_id}", self.delete_file)
        router.add_post("/v1/batches", self.create_batch)
        router.add_get("/v1/batches", self.list_batches)
        router.add_get("/v1/batches/{batch_id}", self.get_batch)
        router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)

    async def start(self) -> None:
        """Hold the reservations of the batches a previous process left pending, then start the poller."""
        try:
            async with asyncio.timeout(5.0):
                # Alive before anything else: another sidecar must not adopt what this one holds.
                await self.registry.heartbeat(self._alive_seconds())
                await self._claim()
        except Exception as exc:  # Redis away at start: the poller claims them when it answers
            log.warning("pending batches could not be read at start (%s); the poller tries again", _why(exc))
        self._task = asyncio.create_task(self._poll_forever(), name="kubetoll-batch-poll")
        if self.pending:
            self._wake.set()  # a batch that ended while no sidecar ran settles now, not a poll later

    async def close(self, timeout: float = CLOSE_WAIT_SECONDS) -> None:
        """Stop polling, and let creates and settlements under way finish (before the store closes),
        within about `timeout` seconds (the shutdown's share). Pending batches stay in the registry for
        the next process; the store returns the leases.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self._closing = True
        if self._task is not None:
            # The flag as well as the cancel: a library that swallows a CancelledError would
            # otherwise leave the poller running (and this wait with it).
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=max(end - loop.time(), 0.0))
            if not done:
                log.warning("the batch poller did not stop within %g s", timeout)
            self._task = None
        if self._committing:
            _, left = await asyncio.wait(set(self._committing), timeout=max(end - loop.time(), 0.01))
            if left:
                log.warning("%d batch creates or settlements were still running at shutdown", len(left))

    def poke(self) -> None:
        """Poll now (tests; a reload)."""
        self._wake.set()

    # ------------------------------------------------------------------ files

    async def _expect_upload(self, request: web.Request) -> web.StreamResponse | None:
        return await expect_continue(request, MAX_FILE_BYTES + MAX_FIELD_BYTES)

    async def upload_file(self, request: web.Request) -> web.StreamResponse:
        state = self._get_state()
        ident = state.tenants.identify(request.headers, {})
        if not request.content_type.startswith("multipart/form-data"):
            raise bad_request(
                "expected a multipart/form-data body with `purpose` and `file` (what client.files.create sends)"
            )
        try:
            async with asyncio.timeout(max(state.config.server.body_timeout_seconds, TRANSFER_TIMEOUT_SECONDS)):
                fields, source, filename = await self._read_upload(request)
        except TimeoutError:
            raise ApiError(
                408, "the upload did not arrive in time", "invalid_request_error", "request_timeout"
            ) from None
        try:
            if fields.get("purpose") != "batch":
                raise bad_request(
                    f"this router takes files with purpose `batch` only (got {fields.get('purpose')!r}): "
                    "they are routed and budgeted by their lines",
                    param="purpose",
                )
            if source is None:
                raise bad_request("the upload has no `file` part", param="file")
            routed: RoutedInput = await asyncio.to_thread(
                route_input,
                source,
                state,
                ident,
                request.headers,
                self._estimate_prompt,
                self._output_reservation,
            )
        finally:
            if source is not None:
                source.close()
        rt = state.backends[routed.backend]
        try:
            form = aiohttp.FormData()
            for name, value in fields.items():  # purpose, and what else the SDK sent (expires_after[...])
                form.add_field(name, value)
            form.add_field("file", routed.rewritten, filename=filename, content_type="application/jsonl")
            obj = await self._json_call(rt, "POST", "/files", data=form, transfer=True)
        finally:
            routed.rewritten.close()
        file_id = obj.get("id")
        if isinstance(file_id, str):
            await self._remember(file_id, KnownObject("file", rt.config.name, self.clock.time(), routed.summary))
        s = routed.summary
        log.info(
            "batch input %s uploaded to backend %s: route %s, %d lines, %d prompt tokens, %d output tokens reserved",
            file_id,
            rt.config.name,
            s.route,
            s.lines,
            s.prompt_tokens,
            s.output_tokens,
        )
        return _json(obj, rt.config.name)

    async def _read_upload(self, request: web.Request) -> tuple[dict[str, str], IO[bytes] | None, str]:
        fields: dict[str, str] = {}
        source: IO[bytes] | None = None
        filename = "batch.jsonl"
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or not part.name:
                    continue
                if part.name == "file":
                    if source is not None:
                        source.close()
                    source = spool()
                    filename = part.filename or filename
                    await _copy_part(part, source, MAX_FILE_BYTES, "the file")
                    source.seek(0)
                else:
                    buf = spool()
                    try:
                        await _copy_part(part, buf, MAX_FIELD_BYTES, f"form field `{part.name}`")
                        buf.seek(0)
                        fields[part.name] = buf.read().decode("utf-8", "replace")
                    finally:
                        buf.close()
        except BaseException as exc:  # the spooled file goes whatever stopped the upload (a timeout, a 413)
            if source is not None:
                source.close()
            if isinstance(exc, (ValueError, aiohttp.ClientError, web.HTTPException)):
                raise bad_request(
                    f"the multipart body is malformed ({type(exc).__name__})", code="malformed_body"
                ) from None
            raise
        return fields, source, filename

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, "/files", "files")

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        rt = await self._backend_for(file_id, "File")
        obj = await self._json_call(rt, "GET", f"/files/{file_id}")
        return _json(obj, rt.config.name)

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        rt = await self._backend_for(file_id, "File")
        obj = await self._json_call(rt, "DELETE", f"/files/{file_id}")
        return _json(obj, rt.config.name)

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        rt = await self._backend_for(file_id, "File")
        resp = await self._request(rt, "GET", f"/files/{file_id}/content", transfer=True)
        try:
            out = web.StreamResponse(
                headers={
                    "content-type": resp.headers.get("content-type", "application/octet-stream"),
                    "x-kubetoll-backend": rt.config.name,
                }
            )
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_chunked(65536):
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            resp.release()

    # ------------------------------------------------------------------ batches

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        state = self._get_state()
        raw = await read_body(request, state.config.server.max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        ident = state.tenants.identify(request.headers, body)
        input_id = body.get("input_file_id")
        if not isinstance(input_id, str) or not _ID.match(input_id):
            raise bad_request("`input_file_id` must be the id of an uploaded file", param="input_file_id")
        known = await self._lookup(input_id)
        if known is None or known.input is None:
            raise ApiError(
                400,
                f"file {input_id} was not uploaded through this router: upload the batch input with POST /v1/files "
                "(purpose batch) here, so its lines are routed to a backend and its cost is budgeted",
                "invalid_request_error",
                "batch_input_unknown",
                "input_file_id",
            )
        summary = known.input
        if body.get("endpoint") != summary.endpoint:
            raise bad_request(
                f"`endpoint` must be {summary.endpoint}, the url of the input file's lines", param="endpoint"
            )
        route = state.router.get(summary.route)
        rt = state.backends.get(known.backend)
        if route is None or rt is None:
            missing = f"route `{summary.route}`" if route is None else f"backend {known.backend}"
            raise ApiError(
                400,
                f"file {input_id} was uploaded for {missing}, which this router no longer serves: upload it again",
                "invalid_request_error",
                "batch_input_stale",
                "input_file_id",
            )
        self._check_budgets(state, route.name)
        if len(self.pending) >= MAX_PENDING_BATCHES:
            raise ApiError(
                429,
                f"this sidecar holds {len(self.pending)} batches in flight, its limit: wait for one to end",
                "rate_limit_error",
                "too_many_batches",
                retry_after=60.0,
            )
        now = self.clock.time()
        price = resolve_batch_price(rt.config)
        r = price.rates_for(summary.max_prompt_tokens)
        usd = summary.prompt_tokens * r.input + summary.output_tokens * r.output
        est_tokens = float(summary.prompt_tokens + summary.output_tokens)
        windows = self._windows(state, route.name, ident.tenant, ident.tier, now)
        holds = [Hold(m, est_tokens if m.unit == "tokens" else usd) for m in windows]
        reservation = await self._reserve(route.name, holds, now) if holds else None
        upstream = {**body, "endpoint": upstream_line_url(rt.config.provider, summary.endpoint)}
        # Once the create is sent, it and its bookkeeping finish even if the client leaves: the
        # batch would run upstream with its reservation released otherwise.
        draft = PendingBatch(
            id="",
            backend=rt.config.name,
            route=route.name,
            tenant=ident.tenant,
            tier=ident.tier,
            created=now,
            input_file_id=input_id,
            lines=summary.lines,
            usd=usd,
            tokens=est_tokens,
            price=price_to_json(price),
        )
        obj = await asyncio.shield(self._to_the_end(self._open(rt, upstream, draft, reservation)))
        log.info(
            "batch %s created on backend %s: route %s, %d lines, $%.6f reserved at batch prices (%s)",
            obj["id"],
            rt.config.name,
            route.name,
            summary.lines,
            usd,
            price.source,
        )
        headers = {"x-kubetoll-reserved-usd": f"{usd:.9f}"}
        t = tightest(self.store, windows, now)
        if t is not None:
            m, st = t
            headers["x-kubetoll-budget-remaining"] = (
                f"{max(st.remaining, 0):.6f} {m.unit}; scope={m.label}; used={st.percent:.1f}%"
            )
        await self._observe(rt.config.name, obj)
        return _json(obj, rt.config.name, extra=headers)

    async def _open(
        self, rt: BackendRuntime, upstream: dict[str, Any], entry: PendingBatch, reservation: Reservation | None
    ) -> dict[str, Any]:
        """Create the batch upstream and hold it pending here; release the reservation if it was not created."""
        try:
            obj = await self._json_call(rt, "POST", "/batches", json_body=upstream)
            batch_id = obj.get("id")
            if not isinstance(batch_id, str) or not batch_id:
                raise ApiError(502, f"backend {rt.config.name} answered a batch without an id", "server_error")
        except BaseException:
            if reservation is not None:
                self.store.settle(reservation, {}, self.clock.time())
            raise
        entry.id = batch_id
        self.pending[batch_id] = entry
        self._held[batch_id] = reservation
        self._unsaved.add(batch_id)  # until the registry has it (a poll meanwhile must not let go of it)
        await self._remember(batch_id, KnownObject("batch", rt.config.name, entry.created))
        try:
            await self.registry.add_pending(entry)
            self._unsaved.discard(batch_id)
        except Exception as exc:  # Redis away: held here, written by the next poll
            log.warning("pending batch %s could not be persisted (%s); the poller tries again", batch_id, _why(exc))
        return obj

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        rt = await self._backend_for(batch_id, "Batch")
        obj = await self._json_call(rt, "GET", f"/batches/{batch_id}")
        await self._observe(rt.config.name, obj)  # a batch that ended settles before its caller sees it ended
        return _json(obj, rt.config.name)

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        rt = await self._backend_for(batch_id, "Batch")
        obj = await self._json_call(rt, "POST", f"/batches/{batch_id}/cancel")
        await self._observe(rt.config.name, obj)
        self._wake.set()  # `cancelling` turns `cancelled` soon: look again without waiting a whole poll
        return _json(obj, rt.config.name)

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        return await self._list(request, "/batches", "batches")

    # ------------------------------------------------------------------ budgets

    def _check_budgets(self, state: RouterState, route: str) -> None:
        """As the pipeline: a route whose budget did not compile is refused; a suspended budget refuses."""
        for b in state.config.unavailable_budgets:
            if b.covers(route):
                raise ApiError(
                    503,
                    f"TokenBudget {b.name!r} covering route `{route}` could not be compiled ({b.reason}); "
                    "the route is refused until the budget is fixed",
                    "budget_unavailable",
                    "budget_unavailable",
                )
        for bud in state.meters.budgets:
            if bud.covers(route) and (bud.name in state.suspended_budgets or self.store.is_suspended(bud.name)):
                raise budget_suspended(Suspended(bud.name))

    @staticmethod
    def _windows(state: RouterState, route: str, tenant: str, tier: str, at: float) -> list[Meter]:
        """The calendar windows a batch counts against: its periods are those of `at`, its creation."""
        ms = state.meters.for_request(route, tenant, tier, at)
        return [m for m in ms.tokens + ms.usd if m.kind == "window"]

    async def _reserve(self, route: str, holds: list[Hold], now: float) -> Reservation:
        try:
            admitted = await reserve_with_policy(self.store, holds, now, can_downgrade=False)
        except Rejected as exc:
            self.metrics.rejections.labels(route, exc.reason).inc()
            raise ApiError(
                429,
                f"budget limit reached: {exc.exhausted}; this batch's estimate at batch prices does not fit. "
                "Retry later or split the batch.",
                "insufficient_quota",
                "budget_exhausted",
                retry_after=exc.retry_after,
            ) from None
        except NeverFits as exc:
            self.metrics.rejections.labels(route, "never_fits").inc()
            m = exc.meter
            raise ApiError(
                400,
                f"this batch needs an estimated {exc.needed:.6g} {m.unit} of budget level `{m.label}`, which allows "
                f"{m.limit:.6g} {m.unit} in all: it could not be admitted even with nothing spent. Split the batch.",
                "invalid_request_error",
                "exceeds_budget_limit",
                "input_file_id",
            ) from None
        except NoDowngradeBackends as exc:
            self.metrics.rejections.labels(route, "no_downgrade_backends").inc()
            raise ApiError(
                429,
                f"{exc.exhausted}; its onExhausted is downgrade, and a batch cannot be downgraded",
                "insufficient_quota",
                "budget_exhausted",
                retry_after=exc.exhausted.retry_after or 60.0,
            ) from None
        except StoreUnavailable as exc:
            raise store_unavailable(exc) from None
        except Suspended as exc:
            raise budget_suspended(exc) from None
        return admitted.reservation

    # ------------------------------------------------------------------ pending batches and settlement

    async def _claim(self) -> None:
        """Take over what the registry says this sidecar settles; let go of what another sidecar took."""
        claimed = await self.registry.claim()
        ids = {b.id for b in claimed}
        for entry in claimed:
            if entry.id not in self.pending:
                await self._take_over(entry)
        if self.registry.kind == "redis":
            for batch_id in [b for b in self.pending if b not in ids and b not in self._unsaved]:
                if batch_id in self._settling:
                    continue
                self.pending.pop(batch_id, None)
                res = self._held.pop(batch_id, None)
                if res is not None:
                    self.store.settle(res, {}, self.clock.time())
                log.warning("batch %s is settled by another sidecar now: its reservation here is released", batch_id)

    async def _take_over(self, entry: PendingBatch) -> None:
        """Reserve a pending batch again (unenforced: it was admitted when created)."""
        state = self._get_state()
        self.pending[entry.id] = entry
        windows = self._windows(state, entry.route, entry.tenant, entry.tier, entry.created)
        holds = [Hold(m, entry.tokens if m.unit == "tokens" else entry.usd, enforce=False) for m in windows]
        res: Reservation | None = None
        if holds:
            try:
                res = await self.store.reserve(holds, self.clock.time())
            except (StoreUnavailable, Suspended) as exc:
                log.warning(
                    "batch %s: its reservation cannot be held again (%s); it is settled all the same", entry.id, exc
                )
        self._held[entry.id] = res
        log.info("batch %s of route %s: holding its reservation of $%.6f again", entry.id, entry.route, entry.usd)

    async def _observe(self, backend: str, obj: Any) -> None:
        """A batch object the backend returned: note the ids it names; settle it when it has ended."""
        if not isinstance(obj, dict) or obj.get("object") != "batch":
            return
        batch_id = obj.get("id")
        if not isinstance(batch_id, str):
            return
        now = self.clock.time()
        for key in ("output_file_id", "error_file_id"):
            fid = obj.get(key)
            if isinstance(fid, str) and fid:
                await self._remember(fid, KnownObject("file", backend, now), replace=False)
        if obj.get("status") in TERMINAL and batch_id in self.pending:
            try:
                await self._settle(batch_id, obj)
            except Exception as exc:  # the output could not be read, or Redis is away: the poller tries again
                self._warn(batch_id, f"batch {batch_id} ended but is not settled yet ({_why(exc)}); trying again")

    async def _settle(self, batch_id: str, obj: Mapping[str, Any]) -> bool:
        if batch_id in self._settling or batch_id not in self.pending:
            return False
        self._settling.add(batch_id)
        try:
            return await self._settle_now(batch_id, obj)
        finally:
            self._settling.discard(batch_id)

    async def _settle_now(self, batch_id: str, obj: Mapping[str, Any]) -> bool:
        entry = self.pending[batch_id]
        state = self._get_state()
        lines: list[OutputLine] = []
        malformed = 0
        out_id = obj.get("output_file_id")
        if isinstance(out_id, str) and out_id:
            rt = state.backends.get(entry.backend)
            if rt is None:
                self._warn(batch_id, f"batch {batch_id} ended, but its backend {entry.backend} is not in the config")
                return False
            lines, malformed = await self._read_output(rt, out_id)
        # From the commit point on, nothing may stop half-way (a client that leaves, the poller
        # stopped at shutdown): the rest runs as a task of its own, which `close` waits for.
        return await asyncio.shield(
            self._to_the_end(self._commit(batch_id, entry, lines, malformed, str(obj.get("status"))))
        )

    def _to_the_end(self, work: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run `work` as a task of its own that its caller's cancellation does not stop; `close` waits for it."""
        task = asyncio.ensure_future(work)
        self._committing.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self._committing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller reports it, or (gone) the next poll tries again

    async def _commit(
        self, batch_id: str, entry: PendingBatch, lines: list[OutputLine], malformed: int, status: str
    ) -> bool:
        state = self._get_state()
        unsaved = batch_id in self._unsaved
        # The commit point. A batch whose persisting failed may still have reached Redis (the
        # reply was lost): it is removed there too; if it is not there, nobody else has it.
        committed = await self.registry.finish(batch_id) or unsaved
        self._unsaved.discard(batch_id)
        self.pending.pop(batch_id, None)
        res = self._held.pop(batch_id, None)
        now = self.clock.time()
        if not committed:
            if res is not None:
                self.store.settle(res, {}, now)
            log.info("batch %s was settled by another sidecar: its reservation here is released", batch_id)
            return False
        price = price_from_json(entry.price)
        records: list[SpendRecord] = []
        prompt = completion = cached = 0
        cost = 0.0
        for line in lines:
            u = line.usage
            if u is None:
                continue
            c = price.cost(u)
            cost += c
            prompt += u.prompt_tokens
            completion += u.completion_tokens
            cached += u.cached_tokens
            records.append(
                SpendRecord(
                    time=now,
                    namespace=state.config.namespace,
                    route=entry.route,
                    backend=entry.backend,
                    model=state.model_of(entry.backend),
                    tenant=entry.tenant,
                    tier=entry.tier,
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens,
                    cost_usd=c,
                    outcome="ok",
                    request_id=line.custom_id[:256],
                    workload=self.workload,
                    batch_id=batch_id,
                )
            )
        if res is None:  # no reservation could be held (the store was away): the spend counts all the same
            windows = self._windows(state, entry.route, entry.tenant, entry.tier, entry.created)
            res = Reservation(f"batch:{batch_id}", [Hold(m, 0.0, enforce=False) for m in windows])
        used_tokens = float(prompt + completion)
        actual = {h.meter.key: used_tokens if h.meter.unit == "tokens" else cost for h in res.holds}
        self._settle_and_record(res, actual, now, records)
        self.settled_total += 1
        m = self.metrics
        m.cost.labels(entry.route, entry.backend, entry.tier, self.workload).inc(cost)
        m.tokens.labels(entry.route, entry.backend, "input").inc(prompt)
        m.tokens.labels(entry.route, entry.backend, "output").inc(completion)
        if cached:
            m.tokens.labels(entry.route, entry.backend, "cached_input").inc(cached)
        log.info(
            "batch %s %s: %d of %d lines billed, $%.6f at batch prices (reserved $%.6f, $%.6f released)%s",
            batch_id,
            status,
            len(records),
            entry.lines,
            cost,
            entry.usd,
            max(entry.usd - cost, 0.0),
            f"; {malformed} output lines could not be read" if malformed else "",
        )
        return True

    def _settle_and_record(
        self, res: Reservation, actual: dict[str, float], now: float, records: list[SpendRecord]
    ) -> None:
        # Settle and append with no suspension between them, as the pipeline does, so a shared
        # store writes the spend and its records in the same flush.
        self.store.settle(res, actual, now)
        for r in records:
            self.ledger.append(r)

    async def _read_output(self, rt: BackendRuntime, file_id: str) -> tuple[list[OutputLine], int]:
        reader = OutputReader()
        lines: list[OutputLine] = []
        resp = await self._request(rt, "GET", f"/files/{file_id}/content", transfer=True)
        try:
            async for chunk in resp.content.iter_chunked(65536):
                lines.extend(reader.feed(chunk))
        finally:
            resp.release()
        lines.extend(reader.close())
        return lines, reader.malformed

    # ------------------------------------------------------------------ the poller

    async def _poll_forever(self) -> None:
        while not self._closing:
            interval = self._get_state().config.server.batch_poll_seconds
            try:
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop settling for good
                log.exception("batch poll failed")
            if cancelling():  # cancelled, but a library on the way swallowed the CancelledError
                raise asyncio.CancelledError

    async def poll_once(self) -> None:
        """Say this owner is alive, take over what it should settle, and ask the backends about each batch."""
        async with self._poll_lock:  # one at a time: a claim must see what the one before it took over
            await self._poll_once()

    async def _poll_once(self) -> None:
        try:
            await self.registry.heartbeat(self._alive_seconds())
            await self._claim()
            for batch_id in list(self._unsaved):
                entry = self.pending.get(batch_id)
                if entry is not None:
                    await self.registry.add_pending(entry)
                self._unsaved.discard(batch_id)
        except Exception as exc:
            self._warn(
                "registry", f"the pending batches' registry ({self.registry.kind}) is not answering: {_why(exc)}"
            )
        state = self._get_state()
        for batch_id, entry in list(self.pending.items()):
            if self._closing:
                return
            rt = state.backends.get(entry.backend)
            if rt is None:
                self._warn(batch_id, f"batch {batch_id}: its backend {entry.backend} is not in the config")
                continue
            try:
                obj = await self._json_call(rt, "GET", f"/batches/{batch_id}")
            except ApiError as exc:
                self._warn(batch_id, f"batch {batch_id}: backend {entry.backend} answered {exc.status} ({exc.message})")
                continue
            await self._observe(rt.config.name, obj)

    def _alive_seconds(self) -> float:
        return max(3 * self._get_state().config.server.batch_poll_seconds, MIN_OWNER_ALIVE_SECONDS)

    def _warn(self, key: str, message: str) -> None:
        mono = self._mono()
        if mono - self._warned.get(key, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._warned[key] = mono
            if len(self._warned) > 4 * MAX_PENDING_BATCHES:
                self._warned.clear()
            log.warning("%s", message)

    # ------------------------------------------------------------------ ids and backends

    async def _remember(self, object_id: str, obj: KnownObject, replace: bool = True) -> None:
        try:
            await self.registry.remember(object_id, obj, replace=replace)
        except Exception as exc:
            self._warn("remember", f"which backend holds {object_id} could not be persisted: {_why(exc)}")

    async def _lookup(self, object_id: str) -> KnownObject | None:
        try:
            return await self.registry.lookup(object_id)
        except Exception as exc:
            self._warn("lookup", f"the batch registry could not be read: {_why(exc)}")
            return None

    @staticmethod
    def _accounts(state: RouterState) -> list[BackendRuntime]:
        """One backend per upstream account (endpoint and credential) of the OpenAI family."""
        seen: dict[tuple[Any, ...], BackendRuntime] = {}
        for rt in state.backends.values():
            b = rt.config
            if b.provider not in _FAMILY:
                continue
            cred = b.credentials.model_dump_json() if b.credentials is not None else ""
            key = (b.provider, b.endpoint, cred, b.azure.api_version if b.azure else "")
            seen.setdefault(key, rt)
        return list(seen.values())

    async def _backend_for(self, object_id: str, kind: str) -> BackendRuntime:
        """The backend holding an id: the one the registry names, else the only account there is."""
        if not _ID.match(object_id):
            raise _not_found(kind, object_id)
        state = self._get_state()
        known = await self._lookup(object_id)
        if known is not None:
            rt = state.backends.get(known.backend)
            if rt is None:
                raise ApiError(
                    404,
                    f"{kind} {object_id} is held by backend {known.backend}, which this router no longer serves",
                    "invalid_request_error",
                    None,
                    "id",
                )
            return rt
        accounts = self._accounts(state)
        if len(accounts) == 1:
            return accounts[0]
        raise _not_found(kind, object_id)

    async def _list(self, request: web.Request, path: str, what: str) -> web.StreamResponse:
        state = self._get_state()
        accounts = self._accounts(state)
        params = dict(request.query)
        after = params.get("after")
        if after and len(accounts) > 1:
            known = await self._lookup(after)
            if known is not None and known.backend in state.backends:
                accounts = [state.backends[known.backend]]  # a cursor continues on its own account
        pages: list[tuple[str, dict[str, Any]]] = []
        for rt in accounts:
            pages.append((rt.config.name, await self._json_call(rt, "GET", path, params=params)))
        for backend, page in pages:
            for item in page.get("data") or ():
                if isinstance(item, dict) and item.get("id") in self.pending:
                    await self._observe(backend, item)
        if len(pages) == 1:
            return _json(pages[0][1], pages[0][0])
        # Several accounts: one page, newest first (oldest with order=asc), at most `limit` items.
        items = [i for _, p in pages for i in (p.get("data") or ()) if isinstance(i, dict)]
        asc = params.get("order") == "asc"
        items.sort(key=lambda i: (i.get("created_at") or 0, str(i.get("id"))), reverse=not asc)
        try:
            limit = int(params["limit"]) if "limit" in params else len(items)
        except ValueError:
            raise bad_request("`limit` must be an integer", param="limit") from None
        page_items = items[: max(limit, 0)]
        merged = {
            "object": "list",
            "data": page_items,
            "first_id": page_items[0].get("id") if page_items else None,
            "last_id": page_items[-1].get("id") if page_items else None,
            "has_more": len(items) > len(page_items) or any(p.get("has_more") for _, p in pages),
        }
        return _json(merged)

    # ------------------------------------------------------------------ upstream calls

    @staticmethod
    def _url(b: Backend, path: str) -> tuple[str, dict[str, str]]:
        if b.provider is Provider.azure_openai:
            assert b.azure is not None  # enforced by the config model
            return f"{b.endpoint}/openai{path}", {"api-version": b.azure.api_version}
        return b.endpoint + path, {}

    async def _request(
        self,
        rt: BackendRuntime,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        transfer: bool = False,
    ) -> aiohttp.ClientResponse:
        """One call to the backend; an error status comes back as the backend's own error (ApiError)."""
        b = rt.config
        try:
            key = self.credentials.get(b.credentials)
        except MissingCredential as exc:
            raise ApiError(503, f"backend {b.name}: {exc}", "service_unavailable", "credentials_unavailable") from None
        url, query = self._url(b, path)
        headers = {**b.headers, **translator_class(b.provider)().auth_headers(key)}
        t = b.timeouts
        total = max(t.total, TRANSFER_TIMEOUT_SECONDS) if transfer else t.total
        kwargs: dict[str, Any] = {
            "params": {**(params or {}), **query},
            "headers": headers,
            "timeout": aiohttp.ClientTimeout(total=total, sock_connect=t.connect),
        }
        if json_body is not None:
            headers["content-type"] = "application/json"
            kwargs["data"] = orjson.dumps(json_body)
        elif data is not None:
            kwargs["data"] = data
        try:
            resp = await rt.session.request(method, url, **kwargs)
        except TimeoutError:
            raise ApiError(
                504, f"backend {b.name} did not answer within {total:g} s", "server_error", "upstream_timeout"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                502,
                f"backend {b.name} could not be reached ({type(exc).__name__})",
                "server_error",
                "upstream_unreachable",
            ) from None
        if resp.status >= 400:
            try:
                raw = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                raw = b""
            finally:
                resp.release()
            e = openai_error_object(raw, resp.status)
            raise ApiError(
                resp.status,
                str(e["message"]),
                str(e.get("type") or "upstream_error"),
                e.get("code"),
                e.get("param"),
                headers={"x-kubetoll-backend": b.name},
            )
        return resp

    async def _json_call(
        self,
        rt: BackendRuntime,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        data: Any = None,
        transfer: bool = False,
    ) -> dict[str, Any]:
        resp = await self._request(rt, method, path, params=params, json_body=json_body, data=data, transfer=transfer)
        try:
            raw = await resp.read()
        except TimeoutError:
            raise ApiError(
                504, f"backend {rt.config.name} did not finish its answer in time", "server_error", "upstream_timeout"
            ) from None
        except aiohttp.ClientError as exc:
            raise ApiError(
                502, f"backend {rt.config.name} cut its answer ({type(exc).__name__})", "server_error", "upstream_error"
            ) from None
        finally:
            resp.release()
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise ApiError(
                502, f"backend {rt.config.name} answered something that is not a JSON object", "server_error"
            )
        return obj


async def _copy_part(part: BodyPartReader, out: IO[bytes], limit: int, what: str) -> None:
    size = 0
    while chunk := await part.read_chunk(65536):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over {limit} bytes", "invalid_request_error", "request_too_large")
        out.write(chunk)


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
