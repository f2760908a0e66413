"""Embedding calls for the semantic cache, and a small embedding model for tests and demos.

The cache takes an `EmbedFn`: `await embed(texts) -> (vectors, usage, cost_usd)`.
The sidecar builds one per embedding backend with `embedder_for_backend`, which
speaks the backend's own API through the provider translator (OpenAI, Azure
OpenAI, any OpenAI-compatible server) on the backend's keep-alive session, and
prices the call with the backend's resolved price, so the pipeline can bill it
like any call.

`HashedEmbedder` is a deterministic bag of words, word pairs and character
trigrams hashed into a fixed number of dimensions: paraphrases that share words
score high, and questions that differ in one word (the hard negatives) score
below 1 — so tests exercise both the similarity threshold and the strict check
without a neural model. `EmbeddingServer` serves any encoder as an
OpenAI-compatible `/v1/embeddings` endpoint on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .. import tracing
from ..http_server import LocalServer
from ..providers.base import Usage

EmbedResult = tuple[Sequence[Sequence[float]], Usage, float]
EmbedFn = Callable[[list[str]], Awaitable[EmbedResult]]


class EmbeddingFailed(Exception):
    """The embedding backend did not answer usably: the semantic lookup is a miss."""


async def call_through_translator(
    runtime: Any,
    credentials: Any,
    translator: Any,
    endpoint: Any,
    body: dict[str, Any],
    timeout: float,
    failed: type[Exception],
    purpose: str,
) -> tuple[Any, Any]:
    """One call a request makes to a backend on its own account (the embedding, the judge, a summary)
    through its provider's translator, bounded by `timeout` seconds: the parsed body and its usage, or
    `failed` saying why. Traced as a CLIENT span of the request, `purpose` its `kubetoll.call`."""
    backend = runtime.config
    span: tracing.CallTrace | None = None
    status: int | None = None
    try:
        key = credentials.get(backend.credentials)
        req = translator.build_request(backend, endpoint, body, key, False)
        operation = "embeddings" if endpoint == "embeddings" else "chat"
        span = tracing.call(backend, operation, purpose, req.url, req.headers)
        async with runtime.session.request(
            req.method, req.url, data=req.body, headers=req.headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await resp.read()
            status = resp.status
            if resp.status >= 400:
                raise failed(f"{backend.name}: HTTP {resp.status}")
        data, usage = translator.parse_response(endpoint, raw, backend.model)
    except failed:
        _end(span, status, tracing.failure_kind(status))
        raise
    except asyncio.CancelledError:
        _end(span, status, "cancelled")
        raise
    except TimeoutError:
        _end(span, status, "timeout")
        raise failed(f"{backend.name}: no answer within {timeout * 1000:.0f} ms") from None
    except Exception as exc:  # connection, credentials, an unsupported provider, a body the translator cannot read
        _end(span, status, type(exc).__name__)
        raise failed(f"{backend.name}: {type(exc).__name__}: {exc}") from None
    if span is not None:
        span.end(status, usage, None)
    return data, usage


def _end(span: tracing.CallTrace | None, status: int | None, error: str) -> None:
    if span is not None:
        span.end(status, None, error)


def embedder_for_backend(runtime: Any, credentials: Any, timeout: float = 2.0) -> EmbedFn:
    """An EmbedFn calling `runtime` (a forwarder.BackendRuntime) on its own session.

    `credentials` is the sidecar's CredentialStore. The call is bounded by
    `timeout` seconds (it sits in front of every cacheable miss).
    """
    from ..forwarder import translator_for
    from ..providers.base import Endpoint

    backend = runtime.config
    translator = translator_for(backend.provider)

    async def embed(texts: list[str]) -> EmbedResult:
        body = {"model": backend.model, "input": texts}
        data, usage = await call_through_translator(
            runtime,
            credentials,
            translator,
            Endpoint.embeddings,
            body,
            timeout,
            EmbeddingFailed,
            tracing.CACHE_EMBEDDING,
        )
        vectors = parse_vectors(data, len(texts))
        return vectors, usage, runtime.price.cost(usage)

    return embed


def http_embedder(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    api_key: str | None = None,
    usd_per_mtok: float = 0.0,
    timeout: float = 2.0,
) -> EmbedFn:
    """A plain OpenAI-compatible `/v1/embeddings` client (tests, benchmarks, tools)."""
    url = base_url.rstrip("/") + "/embeddings"
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"

    async def embed(texts: list[str]) -> EmbedResult:
        try:
            async with session.post(
                url,
                data=orjson.dumps({"model": model, "input": texts}),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise EmbeddingFailed(f"HTTP {resp.status}")
            data = orjson.loads(raw)
        except EmbeddingFailed:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            raise EmbeddingFailed(f"{type(exc).__name__}: {exc}") from None
        u = data.get("usage") or {}
        usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=0, reported=bool(u))
        return parse_vectors(data, len(texts)), usage, usage.prompt_tokens * usd_per_mtok / 1e6

    return embed


def parse_vectors(data: Any, expected: int) -> list[list[float]]:
    import base64
    import struct

    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != expected:
        raise EmbeddingFailed("embedding response has no data for every input")
    out: list[list[float] | None] = [None] * expected
    for pos, item in enumerate(items):
        vec = item.get("embedding") if isinstance(item, dict) else None
        idx = item.get("index", pos) if isinstance(item, dict) else pos
        if isinstance(vec, str):  # encoding_format=base64
            raw = base64.b64decode(vec)
            vec = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if not isinstance(vec, list) or not vec or not isinstance(idx, int) or not 0 <= idx < expected:
            raise EmbeddingFailed("embedding response item without a vector")
        out[idx] = vec
    if any(v is None for v in out):
        raise EmbeddingFailed("embedding response is missing an index")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- a deterministic embedder

_TOKEN = re.compile(r"[a-z0-9]+")


class HashedEmbedder:
    """Hashed bag of words + word pairs + character trigrams, L2-normalised."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def _slot(self, feature: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        return h % self.dim, (1.0 if (h >> 63) & 1 else -1.0)

    def encode_one(self, text: str) -> list[float]:
        words = _TOKEN.findall(text.lower().replace("'", ""))
        vec = [0.0] * self.dim
        feats: list[tuple[str, float]] = [("w:" + w, 1.0) for w in words]
        feats += [("b:" + a + "_" + b, 0.5) for a, b in zip(words, words[1:])]
        for w in words:
            padded = f"#{w}#"
            feats += [("c:" + padded[i : i + 3], 0.25) for i in range(len(padded) - 2)]
        for f, weight in feats:
            slot, sign = self._slot(f)
            vec[slot] += sign * weight
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def encode(self, texts: Sequence[str]) -> list[list[float]]:
        return [self.encode_one(t) for t in texts]


def count_words(text: str) -> int:
    return max(1, len(text.split()))


class EmbeddingServer(LocalServer):
    """An OpenAI-compatible `/v1/embeddings` server on 127.0.0.1 for any encoder.

    `fail` makes it answer 500 (or hang for `hang` seconds) to test failure paths.
    """

    def __init__(
        self, encode: Callable[[list[str]], Sequence[Sequence[float]]], model: str = "hashed-embedder", port: int = 0
    ) -> None:
        super().__init__(port)
        self.encode = encode
        self.model = model
        self.calls = 0
        self.inputs: list[str] = []
        self.traceparents: list[str | None] = []  # the W3C header of each call (traces)
        self.fail = False
        self.hang = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._embeddings)
        return app

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        self.traceparents.append(request.headers.get("traceparent"))
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail:
            return web.json_response(
                {"error": {"message": "simulated failure", "type": "server_error", "param": None, "code": None}},
                status=500,
            )
        body = await request.json()
        inp = body.get("input")
        texts = [inp] if isinstance(inp, str) else list(inp or [])
        if not texts or not all(isinstance(t, str) and t for t in texts):
            return web.json_response(
                {
                    "error": {
                        "message": "'$.input' is invalid",
                        "type": "invalid_request_error",
                        "param": "input",
                        "code": None,
                    }
                },
                status=400,
            )
        self.inputs.extend(texts)
        vectors = self.encode(texts)
        tokens = sum(count_words(t) for t in texts)
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [float(x) for x in v]}
                    for i, v in enumerate(vectors)
                ],
                "model": body.get("model") or self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )
