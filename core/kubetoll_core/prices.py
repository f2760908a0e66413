"""Prices: resolved once per config load, applied per request in plain float arithmetic.

Hosted model prices come from the `genai-prices` catalogue (maintained by
Pydantic, updated with every provider price change); a backend may override them.
An in-cluster GPU backend gets a shadow price: its hourly cost spread over the
tokens it can serve in an hour, the same for input and output, so routing and
budgets compare it with hosted models like for like.

The catalogue is read where the RouterConfig is compiled (`price_catalog.py`):
the operator writes each catalogue-priced backend's entry into its
`catalogPrices`, and the sidecar prices from that alone, without the catalogue
package (tens of MB a pod). The catalogue's own `calc_price` costs ~130 µs a call
(Decimal arithmetic and unit registries), too much for the request path anyway,
so the rates are read out of the entry once and tests check that
`ResolvedPrice.cost` agrees with `calc_price` to the micro-dollar.

Batch API jobs (`resolve_batch_price`) are priced at the catalogue's batch
prices where it has them (its `processing: batch` price variants), else at the
provider's published batch discount, or at the backend's `pricing.batchDiscount`,
which overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .enums import Provider
from .router_config import Backend, CatalogPrice, CatalogPrices, CatalogRate
from .usage import Usage

PER_MTOK = 1_000_000

# The catalogue's request context for Batch API prices (genai-prices price variants).
BATCH_PRICE_CONTEXT = {"processing": "batch"}
# What a provider publishes as its Batch API discount, for a model the catalogue has no
# batch prices for (and for explicit prices): OpenAI and Azure OpenAI's Global Batch
# both bill half the standard rates. An OpenAI-compatible server has no published one.
PUBLISHED_BATCH_DISCOUNT = {
    Provider.openai: 0.5,
    Provider.azure_openai: 0.5,
}


class PricingError(ValueError):
    """A backend whose price cannot be known. Raised at config load, never per request."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per token."""

    input: float
    output: float
    cached_input: float
    cache_write: float


@dataclass(frozen=True, slots=True)
class ResolvedPrice:
    base: Rates
    # (threshold on total input tokens, rates): a request whose input crosses a
    # threshold pays that tier's rates on all its tokens (the "cliff" providers use).
    tiers: tuple[tuple[int, Rates], ...] = ()
    source: str = "override"  # "catalog:<provider>/<model>", "override", "gpu-shadow"
    notes: tuple[str, ...] = field(default=())

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for start, tier in self.tiers:
            if prompt_tokens > start:
                rates = tier
        return rates

    def cost(self, usage: Usage) -> float:
        r = self.rates_for(usage.prompt_tokens)
        uncached = max(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
        return (
            uncached * r.input
            + usage.cached_tokens * r.cached_input
            + usage.cache_write_tokens * r.cache_write
            + usage.completion_tokens * r.output
        )

    def estimate(self, prompt_tokens: int, output_tokens: int) -> float:
        """Upper bound for a reservation: no cache discount assumed."""
        r = self.rates_for(prompt_tokens)
        return prompt_tokens * r.input + output_tokens * r.output

    def scaled(self, factor: float, source: str) -> ResolvedPrice:
        """Every rate times `factor` (a batch discount), under a new source."""

        def times(r: Rates) -> Rates:
            return Rates(r.input * factor, r.output * factor, r.cached_input * factor, r.cache_write * factor)

        return ResolvedPrice(times(self.base), tuple((s, times(r)) for s, r in self.tiers), source, self.notes)

    def per_mtok(self) -> dict[str, float]:
        """For status and docs: the base rates per million tokens."""
        b = self.base
        return {
            "inputPerMTok": round(b.input * PER_MTOK, 6),
            "outputPerMTok": round(b.output * PER_MTOK, 6),
            "cachedInputPerMTok": round(b.cached_input * PER_MTOK, 6),
            "cacheWritePerMTok": round(b.cache_write * PER_MTOK, 6),
        }


def _per_token(v: float | None) -> float | None:
    return None if v is None else float(v) / PER_MTOK


def resolve_price(backend: Backend) -> ResolvedPrice:
    p = backend.pricing
    if p.gpu_hourly_usd is not None and p.tokens_per_second is not None:
        per_token = p.gpu_hourly_usd / (p.tokens_per_second * 3600.0)
        rates = Rates(per_token, per_token, per_token, per_token)
        return ResolvedPrice(rates, source="gpu-shadow")
    if p.input_per_mtok is not None and p.output_per_mtok is not None:
        inp = p.input_per_mtok / PER_MTOK
        cached = _per_token(p.cached_input_per_mtok)
        write = _per_token(p.cache_write_per_mtok)
        return ResolvedPrice(
            Rates(
                inp, p.output_per_mtok / PER_MTOK, inp if cached is None else cached, inp if write is None else write
            ),
            source="override",
        )
    return _from_catalog(backend)


def resolve_batch_price(backend: Backend) -> ResolvedPrice:
    """The price of one request run through the backend's Batch API.

    `pricing.batchDiscount` when set (off whatever `resolve_price` gives); else the
    catalogue's batch prices for a catalogued model that has them; else the
    provider's published discount (`PUBLISHED_BATCH_DISCOUNT`; none for a provider
    that publishes none).
    """
    p = backend.pricing
    if p.batch_discount is None and not p.is_override:
        batch = _catalog_entry(backend).batch
        if batch is not None:
            return _resolved(batch, f"catalog-batch:{batch.provider}/{batch.model}")
    if p.batch_discount is not None:
        discount, why = p.batch_discount, "pricing.batchDiscount"
    else:
        discount, why = PUBLISHED_BATCH_DISCOUNT.get(backend.provider, 0.0), f"{backend.provider.value} batch discount"
    standard_price = resolve_price(backend)
    if discount == 0.0:
        return standard_price
    return standard_price.scaled(1.0 - discount, f"{standard_price.source} less {discount:.0%} ({why})")


def _from_catalog(backend: Backend) -> ResolvedPrice:
    found = _catalog_entry(backend).standard
    return _resolved(found, f"catalog:{found.provider}/{found.model}")


def _catalog_entry(backend: Backend) -> CatalogPrices:
    """The backend's catalogue prices: compiled into the RouterConfig, else looked up now.

    The operator's configs always carry them, so a sidecar never imports the
    catalogue (`price_catalog.py` says why); a hand-written config is looked up
    where the catalogue is installed, and refused with a clear message where not.
    """
    if backend.catalog_prices is not None:
        return backend.catalog_prices
    from .price_catalog import lookup

    return lookup(backend)


def _resolved(found: CatalogPrice, source: str) -> ResolvedPrice:
    def split(rate: CatalogRate | None) -> tuple[float | None, list[tuple[int, float]]]:
        if rate is None:
            return None, []
        return rate.per_mtok / PER_MTOK, [(t.start, t.per_mtok / PER_MTOK) for t in rate.tiers]

    inp, (_, inp_t) = found.input.per_mtok / PER_MTOK, split(found.input)  # input is always priced
    out, out_t = split(found.output)
    cr, cr_t = split(found.cached_input)
    cw, cw_t = split(found.cache_write)
    if out is None:
        out = 0.0  # embedding models: input only
    base = Rates(inp, out, inp if cr is None else cr, inp if cw is None else cw)
    starts = sorted({s for s, _ in inp_t + out_t + cr_t + cw_t})
    tiers = []
    for start in starts:

        def at(tiered: list[tuple[int, float]], default: float, start: int = start) -> float:
            price = default
            for s, v in tiered:
                if s <= start:
                    price = v
            return price

        tiers.append(
            (
                start,
                Rates(
                    at(inp_t, base.input),
                    at(out_t, base.output),
                    at(cr_t, base.cached_input),
                    at(cw_t, base.cache_write),
                ),
            )
        )
    return ResolvedPrice(base, tuple(tiers), source=source)
