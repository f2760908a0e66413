"""Prices: resolved once per config load, applied per request in plain float arithmetic.

Hosted model prices come from the `genai-prices` catalogue (maintained by
Pydantic, updated with every provider price change); a backend may override them.
An in-cluster GPU backend gets a shadow price: its hourly cost spread over the
tokens it can serve in an hour, the same for input and output, so routing and
budgets compare it with hosted models like for like.

The catalogue's own `calc_price` costs ~130 µs a call (Decimal arithmetic and
unit registries), too much for the request path, so the rates are read out of the
catalogue entry at load and tests check that `ResolvedPrice.cost` agrees with
`calc_price` to the micro-dollar.

Batch API jobs (`resolve_batch_price`) are priced at the catalogue's batch
prices where it has them (its `processing: batch` price variants), else at the
provider's published batch discount, or at the backend's `pricing.batchDiscount`,
which overrides both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .enums import Provider
from .router_config import Backend
from .usage import Usage

PER_MTOK = 1_000_000

# genai-prices provider ids for our provider kinds (openai-compatible has none:
# an in-cluster server must be priced explicitly, a hosted one via catalogProvider).
_CATALOG_PROVIDER = {
    Provider.openai: "openai",
    Provider.azure_openai: "azure",
    Provider.anthropic: "anthropic",
}


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


def _per_token(v: float | Decimal | None) -> float | None:
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
        standard = _catalog_lookup(backend)
        batch = _catalog_lookup(backend, BATCH_PRICE_CONTEXT)
        # The catalogue answers a context it has no variant for with the standard rates.
        if batch.model_price != standard.model_price:
            return _resolved(backend, batch, f"catalog-batch:{batch.provider.id}/{batch.model.id}")
    if p.batch_discount is not None:
        discount, why = p.batch_discount, "pricing.batchDiscount"
    else:
        discount, why = PUBLISHED_BATCH_DISCOUNT.get(backend.provider, 0.0), f"{backend.provider.value} batch discount"
    standard_price = resolve_price(backend)
    if discount == 0.0:
        return standard_price
    return standard_price.scaled(1.0 - discount, f"{standard_price.source} less {discount:.0%} ({why})")


def _from_catalog(backend: Backend) -> ResolvedPrice:
    found = _catalog_lookup(backend)
    return _resolved(backend, found, f"catalog:{found.provider.id}/{found.model.id}")


def _catalog_lookup(backend: Backend, price_context: dict[str, str] | None = None) -> Any:
    """The catalogue's calculation for one token of each kind (its `model_price` holds the rates)."""
    from genai_prices import Usage as CatalogUsage
    from genai_prices import calc_price

    provider = backend.pricing.catalog_provider or _CATALOG_PROVIDER.get(backend.provider)
    model = backend.pricing.catalog_model or backend.model
    if provider is None:
        raise PricingError(
            f"backend {backend.name}: provider {backend.provider.value} has no price catalogue; "
            "set pricing (inputPerMTok/outputPerMTok, or gpuHourlyUSD with tokensPerSecond), "
            "or pricing.catalogProvider for a hosted OpenAI-compatible API"
        )
    try:
        return calc_price(
            CatalogUsage(input_tokens=1, output_tokens=1),
            model_ref=model,
            provider_id=provider,
            price_context=price_context,
        )
    except LookupError as exc:
        raise PricingError(
            f"backend {backend.name}: model {model!r} is not in the price catalogue for {provider} ({exc}); "
            "set pricing.catalogModel to a catalogue id or give prices explicitly"
        ) from exc


def _resolved(backend: Backend, found: Any, source: str) -> ResolvedPrice:
    from genai_prices.types import TieredPrices

    model = backend.pricing.catalog_model or backend.model
    mp = found.model_price

    def split(value: Decimal | TieredPrices | None) -> tuple[float | None, list[tuple[int, float]]]:
        if value is None:
            return None, []
        if isinstance(value, TieredPrices):
            return _per_token(value.base), [(t.start, float(t.price) / PER_MTOK) for t in value.tiers]
        return _per_token(value), []

    inp, inp_t = split(getattr(mp, "input_mtok", None))
    out, out_t = split(getattr(mp, "output_mtok", None))
    cr, cr_t = split(getattr(mp, "cache_read_mtok", None))
    cw, cw_t = split(getattr(mp, "cache_write_mtok", None))
    if inp is None:
        raise PricingError(f"backend {backend.name}: catalogue entry for {model!r} has no input token price")
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
