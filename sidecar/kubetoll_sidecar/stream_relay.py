"""Stage 8, streaming: relay the upstream's SSE stream to the client chunk by chunk, and bill it.

The translator turns each upstream event into OpenAI chunks (or, for an
inbound API, that API's events); they are written as they come, in the API's
framing (`ChatFraming`, or the inbound API's: named events, no `[DONE]`), and an
assembler keeps a copy when the answer may be cached. A
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

from . import drain, inbound
from .cache.replay import Assembler, assembler_for
from .cache.stage import CacheStage
from .context import RequestContext
from .forwarder import Forwarded
from .metrics import Metrics
from .sse import DONE, StreamFraming, encode_event

# Settles a finished (or cut) stream's usage, one per upstream call (n when `n` was fanned out),
# records it, and returns its cost.
SettleStream = Callable[[RequestContext, Forwarded, list[Usage]], Awaitable[float]]


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
        framing = inbound.stream_framing(req.endpoint) or CHAT_FRAMING
        # The answer is assembled as it streams, to be cached if it ends cleanly.
        assembler = assembler_for(req.endpoint) if ctx.cache is not None and ctx.cache.wants_answer else None
        try:
            await resp.prepare(ctx.request)
            ctx.added_before_first_byte = time.perf_counter() - ctx.started - ctx.upstream_seconds
            self.metrics.ttft.labels(ctx.backend).observe(st.first_chunk_at - st.started)
            await _write_chunks(resp, st.pending, assembler, framing)
            while not st.done:
                chunks = await st.next_chunks()
                if chunks is None:  # the upstream ended its body
                    break
                await _write_chunks(resp, chunks, assembler, framing)
                if st.error() is not None:
                    break
            err = st.error()
            if err is not None or not st.done:
                outcome = "cut_stream"
                msg = err.message if err else "the upstream stream ended early"
                await resp.write(framing.error_event(f"{ctx.backend}: {msg}", "server_error", "upstream_stream_cut"))
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
                    await resp.write(framing.error_event(drain.DRAIN_CUT_MESSAGE, "service_unavailable", "draining"))
                except (ConnectionResetError, RuntimeError):
                    outcome = "client_disconnected"
        except (TimeoutError, OSError, Exception) as exc:  # upstream read failed mid-stream
            outcome = "cut_stream"
            try:
                message = f"{ctx.backend}: upstream stream failed: {type(exc).__name__}"
                await resp.write(framing.error_event(message, "server_error", "upstream_stream_cut"))
            except (ConnectionResetError, RuntimeError):
                outcome = "client_disconnected"
        cost = await self.finish(ctx, fwd, outcome)
        if outcome == "ok" and assembler is not None and self.cache is not None and ctx.cache is not None:
            body = assembler.body()  # None unless every choice finished
            if body is not None:
                self.cache.store_soon(ctx.cache, body, ctx.usage, cost)
        if outcome != "client_disconnected":
            try:
                # An SSE comment: SDKs ignore it, curl users and tests see the final cost. It, the
                # framing's end and the body's end go out in one write.
                comment = f": kubetoll cost_usd={cost:.9f} backend={ctx.backend}\n\n".encode()
                await resp.write_eof(comment + framing.done if framing.done else comment)
            except (ConnectionResetError, RuntimeError):
                ctx.outcome = "client_disconnected"
        return resp

    async def finish(self, ctx: RequestContext, fwd: Forwarded, outcome: str) -> float:
        """Close the upstream, bill what was streamed (once), and return its cost."""
        if ctx.settled:
            return ctx.cost
        st = fwd.stream
        assert st is not None
        st.close()
        ctx.outcome = outcome
        # The provider's usage of each complete stream; else what was sent, counted (forwarder.stream_usage).
        return await self.settle_stream(ctx, fwd, st.usages(fwd.backend.config.model, ctx.prompt_tokens))


class ChatFraming:
    """OpenAI's chat (and legacy) completions streams: `data:` lines, `[DONE]`, errors as `{"error": ...}`."""

    __slots__ = ()

    done = DONE

    def encode(self, chunk: dict[str, Any] | bytes) -> bytes:
        return b"data: " + chunk + b"\n\n" if isinstance(chunk, bytes) else encode_event(chunk)

    def error_event(self, message: str, type: str, code: str) -> bytes:
        return encode_event({"error": {"message": message, "type": type, "param": None, "code": code}})


CHAT_FRAMING: StreamFraming = ChatFraming()


async def _write_chunks(
    resp: web.StreamResponse, chunks: list[Any], assembler: Assembler | None, framing: StreamFraming
) -> None:
    if not chunks:
        return
    parts = []
    for c in chunks:
        if assembler is not None:
            assembler.feed(c)
        parts.append(framing.encode(c))
    await resp.write(b"".join(parts))
