"""The `genai-prices` catalogue: read where a RouterConfig is compiled, never in the sidecar.

The catalogue package costs a process tens of MB once its data is loaded, and a
sidecar runs in every application pod. So the operator (and `kubetoll run`, which
compiles with the operator's compiler) looks each catalogue-priced backend up
here and writes what it found into the backend's `catalogPrices`; the sidecar
prices from that alone (`prices.py`). The sidecar image does not install the
catalogue at all.

A hand-written RouterConfig without `catalogPrices`, loaded where the catalogue
is installed (the `kubetoll` CLI, tests), is looked up here at load instead.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .enums import Provider
from .prices import BATCH_PRICE_CONTEXT, PricingError
from .router_config import Backend, CatalogPrice, CatalogPrices, CatalogRate, PriceTier

# genai-prices provider ids for our provider kinds (openai-compatible has none:
# an in-cluster server must be priced explicitly, a hosted one via catalogProvider).
_CATALOG_PROVIDER = {
    Provider.openai: "openai",
    Provider.azure_openai: "azure",
    Provider.anthropic: "anthropic",
}


def with_catalog_prices(backend: Backend) -> Backend:
    """`backend` with its `catalogPrices` filled when it is priced from the catalogue.

    A backend with explicit pricing (or a GPU shadow price) comes back unchanged.
    Raises PricingError when the catalogue has no price for it.
    """
    if backend.pricing.is_override:
        return backend
    return backend.model_copy(update={"catalog_prices": lookup(backend)})


def lookup(backend: Backend) -> CatalogPrices:
    """The catalogue's standard prices for the backend's model, and its batch prices when it has them."""
    standard = _calc(backend)
    batch = _calc(backend, BATCH_PRICE_CONTEXT)
    # The catalogue answers a context it has no variant for with the standard rates.
    has_batch = batch.model_price != standard.model_price
    return CatalogPrices(standard=_entry(backend, standard), batch=_entry(backend, batch) if has_batch else None)


def _calc(backend: Backend, price_context: dict[str, str] | None = None) -> Any:
    """The catalogue's calculation for one token of each kind (its `model_price` holds the rates)."""
    try:
        from genai_prices import Usage as CatalogUsage
        from genai_prices import calc_price
    except ImportError:
        # The sidecar image: its configs come from the operator, with catalogPrices.
        raise PricingError(
            f"backend {backend.name}: priced from the catalogue, but the RouterConfig carries no catalogPrices "
            "for it and this installation has no price catalogue (genai-prices); compile the config with the "
            "operator (or `kubetoll compile` / `kubetoll run`), or set pricing explicitly"
        ) from None
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


def _entry(backend: Backend, found: Any) -> CatalogPrice:
    from genai_prices.types import TieredPrices

    mp = found.model_price

    def rate(value: Decimal | TieredPrices | None) -> CatalogRate | None:
        # float(Decimal) here and the division by a million in prices.py give the same
        # per-token float as dividing the catalogue's value directly: nothing is rounded.
        if value is None:
            return None
        if isinstance(value, TieredPrices):
            return CatalogRate(
                per_mtok=float(value.base),
                tiers=[PriceTier(start=t.start, per_mtok=float(t.price)) for t in value.tiers],
            )
        return CatalogRate(per_mtok=float(value))

    inp = rate(getattr(mp, "input_mtok", None))
    if inp is None:
        model = backend.pricing.catalog_model or backend.model
        raise PricingError(f"backend {backend.name}: catalogue entry for {model!r} has no input token price")
    return CatalogPrice(
        provider=found.provider.id,
        model=found.model.id,
        input=inp,
        output=rate(getattr(mp, "output_mtok", None)),
        cached_input=rate(getattr(mp, "cache_read_mtok", None)),
        cache_write=rate(getattr(mp, "cache_write_mtok", None)),
    )
