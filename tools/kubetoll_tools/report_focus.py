"""`kubetoll report --format focus`: spend as FOCUS 1.2 rows (the FinOps Open Cost and Usage Specification).

A CSV whose header is FOCUS column IDs, so a period's LLM spend loads into the cost tools finance
teams already feed with cloud bills. Rows are usage charges aggregated per:

* charge period: a UTC day (`ChargePeriodStart` 00:00:00Z to the next day's, exclusive); the billing
  period is that day's UTC calendar month. Days keep a month's file small while still showing
  daily trends; a record's time is its settlement;
* namespace (`SubAccountId`/`SubAccountName`), backend (`ResourceId` "<namespace>/<backend>",
  `ResourceName`) and model (`SkuId`);
* token direction: input and output tokens are separate SKUs (`SkuMeter` "Input Tokens" / "Output
  Tokens"), priced per `PricingUnit` "1000000 Tokens" as providers list them, `ConsumedUnit` "Tokens".
  A record bills input and output together, so its cost is split in the ratio of the model's
  catalogue prices (cached input at its cached rate); the parts add up to the record's cost
  exactly. A model the catalogue does not know gets one SKU for all its tokens (`SkuMeter` "Tokens");
* attribution: `Tags` is a JSON object of the request's accepted tags as they are (user-defined,
  unprefixed: their keys are lowercase with no "/") and Kubetoll's own dimensions prefixed
  "kubetoll/": tenant, route, tier and workload (when known).

Cost columns: `BilledCost` = `EffectiveCost` = `ListCost` = `ContractedCost` = the ledger's cost
(what the backend's configured prices say the tokens cost). Kubetoll knows no negotiated discounts or
commitments beyond those prices, so the four agree; the unit prices are each row's cost over its
`PricingQuantity`, so unit price × quantity equals the cost as FOCUS requires.

Kubetoll measured these figures; it does not invoice them, and a record names its backend and
model but not the company behind them, so `ProviderName`, `PublisherName` and `InvoiceIssuerName`
are "Kubetoll" and `BillingAccountId` is "kubetoll". Reconcile against the providers' own invoices.

Records without a backend and without cost (cache hits, outcome records) are no charge and get no
row; everything else does, so the `BilledCost` column sums to the ledger's total for the period.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from kubetoll_core.prices import Rates
from kubetoll_core.spend_record import SpendRecord

from .estimate import EstimateError, catalog_price
from .spend import CACHE_BACKEND

# FOCUS 1.2, section "Columns": every column whose "Content constraints" table says Feature level
# Mandatory.
MANDATORY_COLUMNS = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
)
# The same section's Conditional and Recommended columns whose condition holds for metered token usage
# (usage is measured, unit prices exist, tags are supported, namespaces are sub accounts). Region,
# availability zone, commitment discount and capacity reservation columns do not apply and are left out.
APPLICABLE_COLUMNS = (
    "ChargeFrequency",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedUnitPrice",
    "ListUnitPrice",
    "PricingCategory",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
)
# FOCUS columns first, in the specification's (alphabetical) order.
COLUMNS = tuple(sorted(MANDATORY_COLUMNS + APPLICABLE_COLUMNS))

ISSUER = "Kubetoll"
BILLING_ACCOUNT_ID = "kubetoll"
TOKENS_PER_PRICING_UNIT = 1_000_000
PRICING_UNIT = "1000000 Tokens"
_METERS = {"input": "Input Tokens", "output": "Output Tokens", "tokens": "Tokens"}
_TAG_PREFIX = "kubetoll/"  # FOCUS: provider-defined tag keys carry a prefix user-defined ones cannot have


@lru_cache(maxsize=256)
def _catalog_rates(model: str) -> Rates | None:
    """The catalogue's base rates for a model name, None when the catalogue does not know it."""
    if not model:
        return None
    try:
        return catalog_price(model).base
    except (EstimateError, ValueError):
        return None


def split_cost(r: SpendRecord) -> list[tuple[str, int, float]]:
    """(direction, tokens, cost) parts of a record: input and output, or all "tokens" without catalogue rates."""
    rates = _catalog_rates(r.model)
    tokens = r.prompt_tokens + r.completion_tokens
    if rates is None:
        return [("tokens", tokens, r.cost_usd)]
    cached = min(max(r.cached_tokens, 0), r.prompt_tokens)
    weight_in = (r.prompt_tokens - cached) * rates.input + cached * rates.cached_input
    weight_out = r.completion_tokens * rates.output
    if weight_in + weight_out <= 0:
        return [("tokens", tokens, r.cost_usd)]
    cost_in = r.cost_usd * weight_in / (weight_in + weight_out)
    # The output part is the rest, so the two add up to the record's cost whatever the rounding.
    return [("input", r.prompt_tokens, cost_in), ("output", r.completion_tokens, r.cost_usd - cost_in)]


@dataclass(frozen=True, slots=True)
class _Key:
    day: str
    namespace: str
    backend: str
    model: str
    direction: str
    route: str
    tags: str  # the Tags column's JSON text


def _tags(r: SpendRecord) -> str:
    tags: dict[str, str] = dict(r.tag_map)
    tags[_TAG_PREFIX + "tenant"] = r.tenant
    tags[_TAG_PREFIX + "route"] = r.route
    tags[_TAG_PREFIX + "tier"] = r.tier
    if r.workload:
        tags[_TAG_PREFIX + "workload"] = r.workload
    return json.dumps(tags, sort_keys=True, separators=(",", ":"))


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(day: datetime) -> tuple[datetime, datetime]:
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def _number(v: float) -> str:
    """The shortest text that reads back as `v`, in FOCUS's Numeric Format (E notation "mEn", no "+")."""
    text = repr(float(v))
    if "e" not in text:
        return text.removesuffix(".0")
    mantissa, exponent = text.split("e")
    return f"{mantissa}E{int(exponent)}"


def focus_rows(records: Iterable[SpendRecord], namespace: str = "") -> list[dict[str, str]]:
    """The FOCUS rows (column ID → text, "" for null) of the records, by charge day then dearest first."""
    sums: dict[_Key, list[float]] = {}
    for r in records:
        if not r.backend and not r.cost_usd:
            continue
        day = datetime.fromtimestamp(r.time, UTC).strftime("%Y-%m-%d")
        tags = _tags(r)
        for direction, tokens, cost in split_cost(r):
            key = _Key(day, r.namespace or namespace, r.backend or CACHE_BACKEND, r.model, direction, r.route, tags)
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += tokens
            acc[1] += cost
    ordered = sorted(sums.items(), key=lambda kv: (kv[0].day, -kv[1][1], kv[0].tags, kv[0].direction))
    return [_row(key, int(tokens), cost) for key, (tokens, cost) in ordered]


def _row(key: _Key, tokens: int, cost: float) -> dict[str, str]:
    day = datetime.strptime(key.day, "%Y-%m-%d").replace(tzinfo=UTC)
    month_start, month_end = _month(day)
    model = key.model or "(unknown)"
    meter = _METERS[key.direction]
    quantity = tokens / TOKENS_PER_PRICING_UNIT
    unit_price = _number(cost / quantity) if quantity else ""
    sku = f"{model}/{key.direction}"
    return {
        "BilledCost": _number(cost),
        "BillingAccountId": BILLING_ACCOUNT_ID,
        "BillingAccountName": ISSUER,
        "BillingCurrency": "USD",
        "BillingPeriodEnd": _iso(month_end),
        "BillingPeriodStart": _iso(month_start),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "ChargeDescription": f"{meter} of {model} on backend {key.backend} (route {key.route})",
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _iso(day + timedelta(days=1)),
        "ChargePeriodStart": _iso(day),
        "ConsumedQuantity": str(tokens),
        "ConsumedUnit": "Tokens",
        "ContractedCost": _number(cost),
        "ContractedUnitPrice": unit_price,
        "EffectiveCost": _number(cost),
        "InvoiceIssuerName": ISSUER,
        "ListCost": _number(cost),
        "ListUnitPrice": unit_price,
        "PricingCategory": "Standard",
        "PricingQuantity": _number(quantity),
        "PricingUnit": PRICING_UNIT,
        "ProviderName": ISSUER,
        "PublisherName": ISSUER,
        "ResourceId": f"{key.namespace}/{key.backend}",
        "ResourceName": key.backend,
        "ResourceType": "LLM Backend",
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": "LLM Inference",
        "ServiceSubcategory": "Generative AI",
        "SkuId": sku,
        "SkuMeter": meter,
        "SkuPriceId": f"{key.backend}/{sku}",
        "SubAccountId": key.namespace,
        "SubAccountName": key.namespace,
        "Tags": key.tags,
    }


def format_focus(records: Sequence[SpendRecord], namespace: str = "") -> str:
    """The FOCUS CSV: the header (`COLUMNS`), then `focus_rows`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(focus_rows(records, namespace))
    return buf.getvalue()
