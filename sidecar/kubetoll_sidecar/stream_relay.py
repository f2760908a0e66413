"""Stage 8, streaming: relay the upstream's SSE stream to the client chunk by chunk, and bill it.

The translator turns each upstream event into OpenAI chunks; they are written
as they come (an assembler keeps a copy when the answer may be cached). A
stream the upstream cuts short ends with an error event the SDKs raise, and so
does one cut at the drain deadline (code `draining`, drain.py); a client that
goes away is billed for what was sent. Every way the spend is settled exactly
once, through the pipeline's `settle_stream` callback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kubetoll_core.usage import Usage

from . import drain, tokens
from .cache.replay import StreamAssembler
from .cache.stage import CacheStage
from .context import RequestContext
from .forwarder import Forwarded, OpenStream
from .metrics import Metrics
from .providers.base import StreamTranslator
from .sse import DONE, encode_event

# Settles a finished (or cut) stream's usage, records it, and returns its cost.
SettleStream = Callable[[RequestContext, Forwarded, Usage], Awaitable[float]]


class StreamRelay:
    def __init__(self, metrics: Metrics, cache: CacheStage | None, settle_stream: SettleStream) -> None:
        self.metrics = metrics
        self.cache = cache
        self.settle_stream = settle_stream

    async def respond(self, ctx: RequestContext, fwd: Forwarded, headers: dict[str, str]) -> web.StreamResponse:
        st = fwd.stream
        req = ctx.req
        assert st is not None and req is not None
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers})
        outcome = "ok"
        # The answer is assembled as it streams, to be cached if it ends cleanly.
        assembler = StreamAssembler(req.endpoint) if ctx.cache is not None and ctx.cache.should_store else None
        try:
            await resp.prepare(ctx.request)
            ctx.added_before_first_byte = time.perf_counter() - ctx.started - ctx.upstream_seconds
            self.metrics.ttft.labels(ctx.backend).observe(st.first_chunk_at - st.started)
            await _write_chunks(resp, st.pending, assembler)
            translator = st.translator
            while not translator.done:
                chunk = await st.response.content.readany()
                if not chunk:
                    for ev, data in st.decoder.flush():
                        await _write_chunks(resp, translator.feed(ev, data), assembler)
                    break
                for ev, data in st.decoder.feed(chunk):
                    await _write_chunks(resp, translator.feed(ev, data), assembler)
                if translator.error() is not None:
                    break
            err = translator.error()
            if err is not None or not translator.done:
                outcome = "cut_stream"
                msg = err.message if err else "the upstream stream ended early"
                await resp.write(_cut_event(f"{ctx.backend}: {msg}"))
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            outcome = "client_disconnected"
            if isinstance(exc, asyncio.CancelledError):
                if not drain.resume_if_cut():
                    await self.finish(ctx, fwd, outcome)
                    raise
                # Cut at the drain deadline, not by the client: bill what was sent first, then end
                # the stream the way an upstream cut ends it, with an error event.
                outcome = "drain_cut"
                await self.finish(ctx, fwd, outcome)
                try:
                    await resp.write(drain.DRAINING_EVENT)
                except (ConnectionResetError, RuntimeError):
                    outcome = "client_disconnected"
        except (TimeoutError, OSError, Exception) as exc:  # upstream read failed mid-stream
            outcome = "cut_stream"
            try:
                await resp.write(_cut_event(f"{ctx.backend}: upstream stream failed: {type(exc).__name__}"))
            except (ConnectionResetError, RuntimeError):
                outcome = "client_disconnected"
        cost = await self.finish(ctx, fwd, outcome)
        if outcome == "ok" and assembler is not None and self.cache is not None and ctx.cache is not None:
            body = assembler.body()  # None unless every choice finished
            if body is not None:
                self.cache.store_soon(ctx.cache, body, ctx.usage, cost)
        if outcome != "client_disconnected":
            try:
                # An SSE comment: SDKs ignore it, curl users and tests see the final cost.
                await resp.write(f": kubetoll cost_usd={cost:.9f} backend={ctx.backend}\n\n".encode())
                await resp.write(DONE)
                await resp.write_eof()
            except (ConnectionResetError, RuntimeError):
                ctx.outcome = "client_disconnected"
        return resp

    async def finish(self, ctx: RequestContext, fwd: Forwarded, outcome: str) -> float:
        """Close the upstream, bill what was streamed (once), and return its cost."""
        if ctx.settled:
            return ctx.cost
        st = fwd.stream
        assert st is not None
        st.response.close()
        ctx.outcome = outcome
        return await self.settle_stream(ctx, fwd, streamed_usage(st, fwd.backend.config.model, ctx.prompt_tokens))


def streamed_usage(st: OpenStream, model: str, prompt_tokens: int) -> Usage:
    """The provider's usage of a complete stream; else what was sent, counted."""
    translator: StreamTranslator = st.translator
    usage = translator.usage
    if usage is not None and translator.done:
        return usage
    # No usage from the provider, or a stream cut short: bill for what was sent.
    counted = tokens.count_text("".join(translator.text), model) if translator.text else 0
    prompt = usage.prompt_tokens if usage and usage.prompt_tokens else prompt_tokens
    cached = usage.cached_tokens if usage else 0
    return Usage(prompt, max(counted, usage.completion_tokens if usage else 0), cached, reported=False)


def _cut_event(message: str) -> bytes:
    return encode_event(
        {"error": {"message": message, "type": "server_error", "param": None, "code": "upstream_stream_cut"}}
    )


async def _write_chunks(resp: web.StreamResponse, chunks: list[Any], assembler: StreamAssembler | None = None) -> None:
    if not chunks:
        return
    parts = []
    for c in chunks:
        if assembler is not None:
            assembler.feed(c)
        parts.append(b"data: " + c + b"\n\n" if isinstance(c, bytes) else encode_event(c))
    await resp.write(b"".join(parts))
