"""Seeded demo traffic: tenants on free and premium tiers asking a support bot.

The plan is made up front from the seed (arrival times, tenants, questions), so
two runs with the same seed send the same requests in the same order and their
reports compare. What comes back (a 429 burst, a fallback, a rejection) depends on
timing and is whatever the sidecar did.

The mix is what a support bot sees: most questions are a few popular ones, asked
word for word again and again or paraphrased; some are one-offs (an order
number); some paste a long log or document (those route to the in-cluster GPU).
One free tenant is a bulk integration that runs through its daily budget.

Requests go through the sidecar's real HTTP API with aiohttp, concurrently with
a bound on requests in flight, each with its own `x-request-id` so the ledger's
records can be joined with what was asked.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import orjson

SYSTEM_PROMPT = (
    "You are the support assistant of Parcelly, a parcel shipping service for small online shops. "
    "Answer in at most three short paragraphs, in a friendly and precise tone. If the question is about "
    "a specific order, ask for the order number unless it is given. Never invent prices or delivery dates; "
    "point to parcelly.example/help when unsure."
)

# Intents: the first phrasing is the common one (asked word for word again and
# again); the others are paraphrases a semantic cache could match.
QUESTIONS: tuple[tuple[str, ...], ...] = (
    (
        "How do I reset my password?",
        "I forgot my password, how can I get back into my account?",
        "password reset link not arriving, what do I do",
    ),
    (
        "Where is my parcel?",
        "How can I track my shipment?",
        "my package hasn't arrived yet, how do I check where it is?",
    ),
    ("How do I cancel my subscription?", "I want to stop my monthly plan, how?", "cancel plan please"),
    (
        "How long does international delivery take?",
        "What are the delivery times for shipping abroad?",
        "how many days to ship to Canada?",
    ),
    ("Which payment methods do you accept?", "Can I pay with PayPal?", "do you take credit cards and bank transfer?"),
    ("How do I download my invoices?", "Where can I find my invoices?", "I need a PDF of last month's invoice"),
    (
        "How do I change my shipping address?",
        "Can I update the delivery address of an order?",
        "wrong address on my label, how to fix",
    ),
    ("How do I get a return label?", "How can my customer return a parcel?", "create a return shipping label"),
    (
        "How do I enable two-factor authentication?",
        "Can I turn on 2FA for my account?",
        "set up an authenticator app for login",
    ),
    (
        "What happens if a parcel arrives damaged?",
        "My parcel was damaged in transit, what now?",
        "box arrived crushed, can I claim insurance?",
    ),
    (
        "How do I add a team member?",
        "Can I invite a colleague to my account?",
        "give my employee access to the dashboard",
    ),
    (
        "How do I upgrade to the Business plan?",
        "What does the Business plan include and how do I switch?",
        "upgrade my plan",
    ),
    (
        "Do you offer discounts for high volumes?",
        "Is there a cheaper rate if I ship more than 500 parcels a month?",
        "volume pricing?",
    ),
    ("How do I connect my Shopify store?", "Is there a Shopify integration?", "sync orders from shopify"),
    ("What are the size and weight limits for a parcel?", "How big can a package be?", "max weight per parcel"),
    ("How do I delete my account?", "I want to close my account and remove my data.", "delete account and all data"),
    ("Why was my card declined?", "My payment failed, why?", "card declined at checkout"),
    (
        "Can I schedule a pickup?",
        "How do I book a courier to collect parcels from my shop?",
        "arrange pickup tomorrow morning",
    ),
    ("How do I export my shipment history?", "Can I download all my shipments as CSV?", "export data to excel"),
    (
        "What are your API rate limits?",
        "How many API calls can I make per minute?",
        "API returns 429, what is the limit?",
    ),
)

UNIQUE_TEMPLATES = (
    "Where is order #{n}? It was supposed to arrive on November {d}.",
    "Order #{n} shows 'label created' for {d} days now. Is it lost?",
    "Can you change the delivery date of order #{n} to the {d}th?",
    "Please refund the shipping cost of order #{n}, it arrived {d} days late.",
)

_LOG_SERVICES = ("label-api", "tracking-sync", "billing-worker", "pickup-scheduler", "webhook-relay")
_LOG_EVENTS = (
    "processed batch {b} in {ms} ms",
    "retrying carrier request {b} after timeout ({ms} ms)",
    "carrier responded 503 for shipment {b}, backing off {ms} ms",
    "webhook delivery {b} failed with connection reset after {ms} ms",
    "queue depth {b} exceeds threshold, scaling workers",
)


@dataclass(frozen=True)
class TenantProfile:
    name: str
    tier: str
    rate: float  # requests per second, on average
    long_share: float = 0.0  # share of requests that paste a long log (routed to the GPU)
    unique_share: float = 0.15  # one-off questions (an order number)
    stream_share: float = 0.5
    start: float = 0.0  # seconds into the run before the first request


# Shares of the total rate. Names are made up; tiers are what the budgets define.
DEFAULT_TENANTS: tuple[TenantProfile, ...] = (
    TenantProfile("acme-corp", "premium", 0.30, long_share=0.04),
    TenantProfile("globex", "premium", 0.12, long_share=0.10),
    TenantProfile("bulk-importer", "free", 0.30, unique_share=0.05, stream_share=0.0, start=1.0),
    TenantProfile("tinyshop", "free", 0.08, long_share=0.05),
    TenantProfile("student-jo", "free", 0.07),
    TenantProfile("pet-blog", "free", 0.07, long_share=0.05),
    TenantProfile("hobby-maker", "free", 0.06),
)


@dataclass(frozen=True)
class PlannedRequest:
    at: float  # seconds from the start of the run
    index: int
    request_id: str
    tenant: str
    tier: str
    kind: str  # "faq" (the common phrasing), "paraphrase", "unique", "long"
    intent: int  # index into QUESTIONS; -1 for unique and long
    messages: tuple[dict[str, str], ...]
    stream: bool
    # A request of a side route (`side_routes`): its route, its extra headers and max_tokens.
    route: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    max_tokens: int | None = None

    def body(self, route: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.route or route, "messages": list(self.messages), "temperature": 0}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    @property
    def prompt_key(self) -> str:
        """What an exact cache keys on: the messages and sampling settings (tenant scope is added by callers)."""
        return hashlib.sha256(orjson.dumps([list(self.messages), 0], option=orjson.OPT_SORT_KEYS)).hexdigest()[:24]


@dataclass(frozen=True)
class SideRoute:
    """A share of the traffic sent to another route than the main one (the demo's cascade and spill-over)."""

    route: str
    share: float  # of all requests
    kind: str  # "extract": a structured task replaces the question (PlannedRequest.kind "extract"); "chat": kept
    headers: tuple[tuple[str, str], ...] = ()
    max_tokens: tuple[int, ...] = ()  # chosen from, one per request; () leaves it out


EXTRACT_TEMPLATES = (
    "Extract the order number, the date and the amount from this email as JSON: "
    "'Hi, order {n} from the {d}th was charged twice, 49.90 EUR each.'",
    "From this note, give me the customer id and the product as JSON: 'Customer C-{n} wants to return the {d}-inch "
    "monitor.'",
)


def side_routes(requests: list[PlannedRequest], routes: tuple[SideRoute, ...], seed: int) -> list[PlannedRequest]:
    """The plan with a share of its requests (long documents excepted) moved to each side route; deterministic."""
    rng = random.Random(f"{seed}:side-routes")
    out = []
    for req in requests:
        roll, moved = rng.random(), req
        for side in routes:
            if req.kind != "long" and roll < side.share:
                messages = req.messages
                if side.kind == "extract":
                    q = rng.choice(EXTRACT_TEMPLATES).format(n=rng.randint(100_000, 999_999), d=rng.randint(10, 28))
                    messages = ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q})
                max_tokens = rng.choice(side.max_tokens) if side.max_tokens else None
                moved = replace(
                    req,
                    kind="extract" if side.kind == "extract" else req.kind,
                    intent=-1 if side.kind == "extract" else req.intent,
                    messages=messages,
                    route=side.route,
                    headers=side.headers,
                    max_tokens=max_tokens,
                    stream=False if side.kind == "extract" else req.stream,
                )
                break
            roll -= side.share
        out.append(moved)
    return out


# The feature a request belongs to, by what it asks (its `x-kubetoll-tags: feature=...`).
FEATURES = {"faq": "faq", "paraphrase": "faq", "unique": "orders", "long": "log-triage", "extract": "extraction"}
TURNS_PER_CONVERSATION = 4
RESOLVED_SHARE = 0.7  # of finished conversations; the rest are escalated to a person


def conversations(requests: list[PlannedRequest], seed: int) -> list[PlannedRequest]:
    """The plan with attribution, as a support bot would send it: each request tagged with its feature,
    each tenant's requests grouped into conversations of TURNS_PER_CONVERSATION (`x-kubetoll-session`), and
    the last turn of each carrying its outcome (`x-kubetoll-outcome`: resolved or escalated). Deterministic."""
    rng = random.Random(f"{seed}:conversations")
    turns: dict[str, int] = defaultdict(int)
    out = []
    for req in requests:
        n = turns[req.tenant]
        turns[req.tenant] = n + 1
        session = f"{req.tenant}-c{n // TURNS_PER_CONVERSATION}"
        headers = [*req.headers, ("x-kubetoll-tags", f"feature={FEATURES.get(req.kind, 'faq')}")]
        headers.append(("x-kubetoll-session", session))
        if n % TURNS_PER_CONVERSATION == TURNS_PER_CONVERSATION - 1:
            headers.append(("x-kubetoll-outcome", "resolved" if rng.random() < RESOLVED_SHARE else "escalated"))
        out.append(replace(req, headers=tuple(headers)))
    return out


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def _long_log(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        svc = rng.choice(_LOG_SERVICES)
        ev = rng.choice(_LOG_EVENTS).format(b=rng.randint(10_000, 99_999), ms=rng.randint(20, 9_000))
        out.append(
            f"2026-11-{rng.randint(1, 28):02d}"
            f"T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z {svc} {ev}"
        )
    return "\n".join(out)


def plan(
    seed: int, duration: float, rate: float, tenants: tuple[TenantProfile, ...] = DEFAULT_TENANTS
) -> list[PlannedRequest]:
    """Every request of a run, in order of arrival. Same seed, same plan."""
    rng = random.Random(seed)
    weights = _zipf_weights(len(QUESTIONS))
    items: list[tuple[float, str, TenantProfile, str, int, tuple[dict[str, str], ...], bool]] = []
    for prof in tenants:
        trng = random.Random(f"{seed}:{prof.name}")
        t = prof.start
        lam = max(prof.rate * rate, 1e-9)
        while True:
            t += trng.expovariate(lam)
            if t >= duration:
                break
            roll = trng.random()
            if roll < prof.long_share:
                doc = _long_log(trng, trng.randint(95, 130))
                q = (
                    "Here is today's log from our shipping integration. "
                    "What is going wrong, and what should we fix first?\n\n" + doc
                )
                kind, intent = "long", -1
            elif roll < prof.long_share + prof.unique_share:
                q = trng.choice(UNIQUE_TEMPLATES).format(n=trng.randint(100_000, 999_999), d=trng.randint(2, 28))
                kind, intent = "unique", -1
            else:
                intent = trng.choices(range(len(QUESTIONS)), weights)[0]
                phrasings = QUESTIONS[intent]
                j = 0 if trng.random() < 0.6 else trng.randint(1, len(phrasings) - 1)
                q = phrasings[j]
                kind = "faq" if j == 0 else "paraphrase"
            messages = ({"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q})
            items.append((t, prof.name, prof, kind, intent, messages, trng.random() < prof.stream_share))
    items.sort(key=lambda x: (x[0], x[1]))
    run_tag = f"{seed:x}-{rng.getrandbits(24):06x}"
    return [
        PlannedRequest(at, i, f"demo-{run_tag}-{i:05d}", name, prof.tier, kind, intent, messages, stream)
        for i, (at, name, prof, kind, intent, messages, stream) in enumerate(items)
    ]


# --------------------------------------------------------------------------- what came back


@dataclass
class Result:
    request: PlannedRequest
    status: int = 0
    backend: str = ""
    cost_usd: float | None = None  # from x-kubetoll-cost-usd, or the stream's closing comment
    downgraded: bool = False
    fallbacks: int = 0
    error_code: str = ""
    latency_s: float = 0.0
    sent_at: float = 0.0  # epoch seconds


@dataclass
class TrafficStats:
    planned: int = 0
    sent: int = 0
    in_flight: int = 0
    done: int = 0
    results: list[Result] = field(default_factory=list)
    by_request_id: dict[str, PlannedRequest] = field(default_factory=dict)
    status_by_tenant: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    interrupted: bool = False

    def record(self, res: Result) -> None:
        self.results.append(res)
        self.done += 1
        c = self.status_by_tenant[res.request.tenant]
        if res.status == 200:
            c["ok"] += 1
        elif res.status == 429:
            c["rejected"] += 1
        else:
            c["failed"] += 1
        if res.downgraded:
            c["downgraded"] += 1

    def rejected_by_code(self) -> Counter[str]:
        return Counter(r.error_code or str(r.status) for r in self.results if r.status not in (200,))


def _parse_stream_cost(text: str) -> tuple[float | None, str]:
    marker = ": kubetoll cost_usd="
    i = text.rfind(marker)
    if i < 0:
        return None, ""
    rest = text[i + len(marker) :].split("\n", 1)[0]
    cost, _, backend = rest.partition(" backend=")
    try:
        return float(cost), backend.strip()
    except ValueError:
        return None, ""


async def send_one(
    session: aiohttp.ClientSession, base_url: str, route: str, tenancy: tuple[str, str], req: PlannedRequest
) -> Result:
    tenant_header, tier_header = tenancy
    headers = {tenant_header: req.tenant, tier_header: req.tier, "x-request-id": req.request_id, **dict(req.headers)}
    res = Result(req, sent_at=time.time())
    t0 = time.perf_counter()
    try:
        async with session.post(f"{base_url}/v1/chat/completions", json=req.body(route), headers=headers) as resp:
            res.status = resp.status
            res.backend = resp.headers.get("x-kubetoll-backend", "")
            res.downgraded = resp.headers.get("x-kubetoll-downgraded") == "true"
            try:
                res.fallbacks = int(resp.headers.get("x-kubetoll-fallbacks", "0") or 0)
            except ValueError:
                res.fallbacks = 0
            if "x-kubetoll-cost-usd" in resp.headers:
                res.cost_usd = float(resp.headers["x-kubetoll-cost-usd"])
            raw = await resp.read()
            if resp.status != 200:
                try:
                    err = orjson.loads(raw).get("error") or {}
                    res.error_code = str(err.get("code") or err.get("type") or resp.status)
                except (orjson.JSONDecodeError, AttributeError):
                    res.error_code = str(resp.status)
            elif req.stream:
                cost, backend = _parse_stream_cost(raw.decode("utf-8", "replace"))
                res.cost_usd = cost
                res.backend = backend or res.backend
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        res.status, res.error_code = 0, type(exc).__name__
    res.latency_s = time.perf_counter() - t0
    return res


async def run_traffic(
    base_url: str,
    route: str,
    tenancy: tuple[str, str],
    requests: list[PlannedRequest],
    stats: TrafficStats,
    stop: asyncio.Event,
    *,
    concurrency: int = 32,
    drain_seconds: float = 15.0,
    on_result: Callable[[Result], None] | None = None,
) -> None:
    """Sends the plan on its schedule until it ends or `stop` is set, then waits for requests in flight.

    A request not finished within `drain_seconds` after the end is cancelled.
    """
    stats.planned = len(requests)
    for r in requests:
        stats.by_request_id[r.request_id] = r
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(req: PlannedRequest) -> None:
            try:
                res = await send_one(session, base_url, route, tenancy, req)
                stats.record(res)
                if on_result:
                    on_result(res)
            finally:
                stats.in_flight -= 1
                sem.release()

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for req in requests:
            delay = t0 + req.at - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    pass
            if stop.is_set():
                stats.interrupted = True
                break
            await sem.acquire()  # bounded: a slow backend slows the generator, never piles up requests
            if stop.is_set():
                sem.release()
                stats.interrupted = True
                break
            stats.sent += 1
            stats.in_flight += 1
            task = asyncio.create_task(one(req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=drain_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)


def repeat_analysis(records: Iterable[Any], planned: Mapping[str, PlannedRequest]) -> dict[str, Any]:
    """What a tenant-scoped cache could have answered, from the ledger joined with the plan.

    An exact repeat asks a tenant's already-answered prompt again, word for word; a
    paraphrase asks an already-answered question (intent) in other words. Costs are
    the ledger's: what those requests were billed.
    """
    answered_prompts: set[tuple[str, str]] = set()
    answered_intents: set[tuple[str, int]] = set()
    out = {"exact_repeats": 0, "exact_repeat_usd": 0.0, "paraphrases": 0, "paraphrase_usd": 0.0}
    for r in sorted(records, key=lambda r: r.time):
        req = planned.get(r.request_id)
        if req is None:
            continue
        pk = (r.tenant, req.prompt_key)
        ik = (r.tenant, req.intent)
        if pk in answered_prompts:
            out["exact_repeats"] += 1
            out["exact_repeat_usd"] += r.cost_usd
        elif req.intent >= 0 and ik in answered_intents:
            out["paraphrases"] += 1
            out["paraphrase_usd"] += r.cost_usd
        if r.outcome == "ok":
            answered_prompts.add(pk)
            if req.intent >= 0:
                answered_intents.add(ik)
    return out
