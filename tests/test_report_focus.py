"""`kubetoll report --format focus`: FOCUS 1.2 rows from a Redis ledger, against the specification and the ledger."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from kubetoll_core.spend_record import SpendRecord
from kubetoll_tools import report_focus
from kubetoll_tools.estimate import catalog_price
from test_report_pivot import T0, ledger, run_report, window  # noqa: F401  (ledger is a fixture)

# FOCUS 1.2, written out from the specification's column pages ("Feature level: Mandatory"), not from the
# module under test, so a column dropped there fails here.
FOCUS_1_2_MANDATORY = {
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
}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# FOCUS Numeric Format: an integer, a decimal or "mEn" (no "+", no thousands separators).
NUMBER = re.compile(r"^-?\d+(\.\d+)?(E-?\d+)?$")


def _utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


async def _focus(redis_url: str, ns: str) -> tuple[list[str], list[dict[str, str]]]:
    text = await run_report(*window(redis_url, ns), "--format", "focus")
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


async def test_focus_columns_costs_and_dates(ledger) -> None:  # noqa: F811
    redis_url, ns, recs = ledger
    header, rows = await _focus(redis_url, ns)
    assert FOCUS_1_2_MANDATORY <= set(header)
    custom = [c for c in header if not re.fullmatch(r"[A-Z][A-Za-z]+", c)]
    assert all(c.startswith("x_") for c in custom)  # FOCUS: custom columns carry the x_ prefix

    # The rows' cost sums to the ledger's total for the period, in every cost column.
    total = sum(r.cost_usd for r in recs)
    for column in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost"):
        assert sum(float(row[column]) for row in rows) == pytest.approx(total, abs=1e-12), column

    for row in rows:
        for column in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd"):
            assert ISO_UTC.match(row[column]), (column, row[column])
        start, end = _utc(row["ChargePeriodStart"]), _utc(row["ChargePeriodEnd"])
        assert end - start == 86400 and datetime.fromtimestamp(start, UTC).hour == 0  # a UTC day
        assert _utc(row["BillingPeriodStart"]) <= start < end <= _utc(row["BillingPeriodEnd"])
        assert row["BillingPeriodStart"].endswith("-01T00:00:00Z")
        assert row["ChargeCategory"] == "Usage" and row["ChargeClass"] == "" and row["BillingCurrency"] == "USD"
        for column in ("BilledCost", "ListCost", "PricingQuantity", "ConsumedQuantity", "ListUnitPrice"):
            assert NUMBER.match(row[column]), (column, row[column])
        # Unit price × pricing quantity is the cost, as FOCUS requires.
        assert float(row["ListUnitPrice"]) * float(row["PricingQuantity"]) == pytest.approx(float(row["ListCost"]))
        assert float(row["ContractedUnitPrice"]) * float(row["PricingQuantity"]) == pytest.approx(
            float(row["ContractedCost"])
        )
        assert float(row["PricingQuantity"]) * 1_000_000 == pytest.approx(float(row["ConsumedQuantity"]))
        assert row["PricingUnit"] == "1000000 Tokens" and row["ConsumedUnit"] == "Tokens"
        assert row["SubAccountId"] == ns and row["ResourceId"] == f"{ns}/{row['ResourceName']}"
        for column in FOCUS_1_2_MANDATORY - {"ChargeClass"}:
            assert row[column] != "", column  # nullable only where the row is not a correction

    # Each record's charge lies in its row's charge period, under its namespace, backend and tags.
    by_row: dict[tuple[str, str, str], float] = defaultdict(float)
    for row in rows:
        by_row[(row["ChargePeriodStart"], row["ResourceName"], row["Tags"])] += float(row["BilledCost"])
    want: dict[tuple[str, str, str], float] = defaultdict(float)
    for r in recs:
        if r.backend or r.cost_usd:
            day = datetime.fromtimestamp(r.time, UTC).strftime("%Y-%m-%dT00:00:00Z")
            tags = {**r.tag_map, "kubetoll/tenant": r.tenant, "kubetoll/route": r.route, "kubetoll/tier": r.tier}
            if r.workload:
                tags["kubetoll/workload"] = r.workload
            want[(day, r.backend, json.dumps(tags, sort_keys=True, separators=(",", ":")))] += r.cost_usd
    assert set(by_row) == set(want)
    for key, cost in want.items():
        assert by_row[key] == pytest.approx(cost, abs=1e-12), key


async def test_input_and_output_tokens_are_separate_skus(ledger) -> None:  # noqa: F811
    redis_url, ns, recs = ledger
    _, rows = await _focus(redis_url, ns)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        tokens[(row["SkuId"].rsplit("/", 1)[0], row["SkuMeter"])] += int(row["ConsumedQuantity"])
        assert row["SkuId"] == f"{row['SkuId'].rsplit('/', 1)[0]}/{row['SkuMeter'].split()[0].lower()}"
        assert row["SkuPriceId"] == f"{row['ResourceName']}/{row['SkuId']}"
    billed = [r for r in recs if r.backend]
    mini = [r for r in billed if r.model == "gpt-4o-mini"]
    # A catalogue model: input and output tokens apart.
    assert tokens[("gpt-4o-mini", "Input Tokens")] == sum(r.prompt_tokens for r in mini)
    assert tokens[("gpt-4o-mini", "Output Tokens")] == sum(r.completion_tokens for r in mini)
    # A model the catalogue does not know, and a record without a model: one SKU for all tokens.
    for model, name in (("llama", "llama"), ("", "(unknown)")):
        mine = [r for r in billed if r.model == model]
        assert tokens[(name, "Tokens")] == sum(r.prompt_tokens + r.completion_tokens for r in mine)
        assert (name, "Input Tokens") not in tokens
    # Cache hits and outcome records are no charge: no row names the cache.
    assert all(row["ResourceName"] != "(cache)" for row in rows)


def test_split_follows_catalogue_prices_and_adds_up() -> None:
    r = SpendRecord(T0, "shop", "chat", "cheap", "acme", "free", 1000, 100, 400, 0.000321, model="gpt-4o-mini")
    parts = report_focus.split_cost(r)
    assert [(d, n) for d, n, _ in parts] == [("input", 1000), ("output", 100)]
    assert sum(c for _, _, c in parts) == r.cost_usd
    rates = catalog_price("gpt-4o-mini").base
    weight_in, weight_out = 600 * rates.input + 400 * rates.cached_input, 100 * rates.output
    assert parts[0][2] == pytest.approx(r.cost_usd * weight_in / (weight_in + weight_out))
