"""OpenAI's Responses API on a `SimulatedUpstream`: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

It answers as the chat endpoint does (the same deterministic text, tool calls
built from the function's schema, usage counted the same way) in the Responses
API's shape: `message` and `function_call` output items, `status` `incomplete`
(`max_output_tokens`) when `max_output_tokens` cuts the answer, and the typed
event stream (`response.created` ... `response.completed`, each event named and
numbered). Requests go through the simulator's common path, so authentication,
recording and faults apply (`cut;after=N` counts these events, and never
reaches `response.completed`; `stream_error` sends an `error` event).

State: a response is stored unless `store` is false, with its conversation, so
`previous_response_id` continues it (its input tokens count the whole
conversation again, as OpenAI bills them) and `GET`/`DELETE` find it; an unknown
id is a 404 (a 400 as `previous_response_id`).

Not simulated: built-in tools, `conversation`, `background`, reasoning items,
`include`, `text.format`, `truncation`.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .simulator import SimulatedUpstream, _Ctx, _Reply


def _usage(prompt: int, output: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(cached, prompt)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _messages(inp: Any) -> list[dict[str, Any]]:
    """A Responses API input as chat messages, for counting and for the answer's seed text."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out: list[dict[str, Any]] = []
    for item in inp if isinstance(inp, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type") or "message"
        if kind == "message":
            out.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "function_call":
            call = {"function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "content": output if isinstance(output, str) else ""})
    return out


class SimulatedResponses:
    """The Responses API of one simulator, with the responses it stored."""

    def __init__(self, sim: SimulatedUpstream) -> None:
        self.sim = sim
        self.stored: dict[str, dict[str, Any]] = {}
        self._conversations: dict[str, list[dict[str, Any]]] = {}  # id -> the turns up to and with its answer

    def add_routes(self, app: web.Application) -> None:
        from .simulator import OPENAI

        for method, path, handler in (
            ("POST", "/v1/responses", self._create),
            ("GET", "/v1/responses/{response_id}", self._get),
            ("DELETE", "/v1/responses/{response_id}", self._delete),
        ):
            app.router.add_route(method, path, functools.partial(self.sim._entry, OPENAI, handler))

    # ----- handlers

    async def _create(self, ctx: _Ctx) -> web.StreamResponse:
        from .simulator import (
            _ends_with_tool_result,
            _last_user_text,
            _pick_tool,
            _random_id,
            _Tool,
            openai_prompt_tokens,
        )

        sim, body = self.sim, ctx.body
        model = str(body.get("model") or "")
        if not model:
            return sim._invalid(ctx, "Missing required parameter: 'model'.", "model", "missing_required_parameter")
        history: list[dict[str, Any]] = []
        prev = body.get("previous_response_id")
        if prev is not None:
            if prev not in self._conversations:
                return sim._invalid(
                    ctx,
                    f"Previous response with id '{prev}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            history = list(self._conversations[prev])
        if body.get("input") is None and prev is None:
            return sim._invalid(ctx, "Missing required parameter: 'input'.", "input", "missing_required_parameter")
        turns = history + _messages(body.get("input"))
        instructions = body.get("instructions")
        counted = ([{"role": "system", "content": instructions}] if isinstance(instructions, str) else []) + turns
        prompt = openai_prompt_tokens(counted, model)
        if prompt > sim._context_window(ctx):
            return sim._context_length_error(ctx, prompt)
        tools = [
            _Tool(str(t["name"]), str(t.get("description") or ""), t.get("parameters") or {})
            for t in body.get("tools") or ()
            if isinstance(t, dict) and t.get("type") == "function" and t.get("name")
        ]
        raw_choice = body.get("tool_choice", "auto")
        choice: Any = raw_choice if raw_choice in ("none", "auto", "required") else "auto"
        if isinstance(raw_choice, dict) and raw_choice.get("name"):
            choice = ("named", str(raw_choice["name"]))
        tool = _pick_tool(tools, choice, _last_user_text(turns), _ends_with_tool_result(turns))
        reply = self._reply(tool, model, body)
        rid = _random_id("resp_", 48)
        response = self._response(ctx, rid, body, reply, prompt)
        if body.get("store") is not False:
            self.stored[rid] = response
            answer = {"role": "assistant", "content": reply.text} if reply.tool is None else {"role": "assistant"}
            self._conversations[rid] = [*turns, answer]
        if ctx.stream:
            events, closing = self._events(response, reply)
            return await sim._write_stream(ctx, events, closing, self._stream_error(ctx, len(events)))
        return await sim._send_json(ctx, response)

    async def _get(self, ctx: _Ctx) -> web.StreamResponse:
        rid = ctx.request.match_info["response_id"]
        if rid not in self.stored:
            return self._not_found(ctx, rid)
        return await self.sim._send_json(ctx, self.stored[rid])

    async def _delete(self, ctx: _Ctx) -> web.StreamResponse:
        rid = ctx.request.match_info["response_id"]
        if self.stored.pop(rid, None) is None:
            return self._not_found(ctx, rid)
        self._conversations.pop(rid, None)
        return await self.sim._send_json(ctx, {"id": rid, "object": "response", "deleted": True})

    # ----- the answer

    def _reply(self, tool: Any, model: str, body: dict[str, Any]) -> _Reply:
        from .simulator import _last_user_text, _text_reply, _tool_reply

        if tool is not None:
            return _tool_reply(tool, model, "call_")
        cap = body.get("max_output_tokens")
        seed = _last_user_text(_messages(body.get("input")))
        return _text_reply(seed, self.sim.settings, int(cap) if isinstance(cap, int) else None, 0)

    def _response(self, ctx: _Ctx, rid: str, body: dict[str, Any], reply: _Reply, prompt: int) -> dict[str, Any]:
        status = "incomplete" if reply.finish == "length" else "completed"
        if reply.tool is not None:
            item: dict[str, Any] = {
                "id": "fc_" + rid[5:],
                "type": "function_call",
                "status": "completed",
                "call_id": reply.tool_id,
                "name": reply.tool.name,
                "arguments": reply.arguments,
            }
        else:
            part = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
            item = {"id": "msg_" + rid[5:], "type": "message", "status": status, "role": "assistant", "content": [part]}
        usage = _usage(prompt, reply.tokens, self.sim.settings.cached_prompt_tokens)
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model"),
            "output": [item],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "store": body.get("store") is not False,
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": usage if self.sim._wants_usage(ctx) else None,
            "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    def _events(self, response: dict[str, Any], reply: _Reply) -> tuple[list[tuple[bytes, bool]], int]:
        """The typed events of `response`, and the index of its terminal event (what a cut never reaches)."""
        from .simulator import _split_chars, _sse_named

        seq = iter(range(1 << 30))

        def ev(kind: str, paced: bool = False, **fields: Any) -> tuple[bytes, bool]:
            return _sse_named(kind, {"type": kind, "sequence_number": next(seq), **fields}), paced

        shell = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
        events = [ev("response.created", response=shell), ev("response.in_progress", response=shell)]
        item = response["output"][0]
        if item["type"] == "function_call":
            events.append(
                ev(
                    "response.output_item.added",
                    output_index=0,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
            )
            for piece in _split_chars(item["arguments"], 4 * max(1, self.sim.settings.tokens_per_chunk)):
                events.append(
                    ev("response.function_call_arguments.delta", True, item_id=item["id"], output_index=0, delta=piece)
                )
            events.append(
                ev(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=0,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
            empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                ev("response.output_item.added", output_index=0, item={**item, "content": [], "status": "in_progress"})
            )
            events.append(ev("response.content_part.added", **at, part=empty))
            for text in reply.chunks(self.sim.settings.tokens_per_chunk):
                if text:
                    events.append(ev("response.output_text.delta", True, **at, delta=text, logprobs=[]))
            events.append(ev("response.output_text.done", **at, text=reply.text, logprobs=[]))
            events.append(ev("response.content_part.done", **at, part=item["content"][0]))
        events.append(ev("response.output_item.done", output_index=0, item=item))
        closing = len(events)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        events.append(ev(kind, response=response))
        return events, closing

    def _stream_error(self, ctx: _Ctx, seq: int) -> bytes | None:
        from .simulator import _OPENAI_STATUS, _sse_named

        fault = ctx.fault
        if fault is None or fault.kind != "stream_error":
            return None
        status = fault.status or 500
        type_, code, message = _OPENAI_STATUS.get(status, ("server_error", None, "The server had an error."))
        error = {"type": type_, "code": code, "message": message, "param": None}
        return _sse_named("error", {"type": "error", "sequence_number": seq, "error": error})

    def _not_found(self, ctx: _Ctx, rid: str) -> web.Response:
        from .simulator import openai_error_body

        return self.sim._error(
            ctx, 404, openai_error_body(f"Response with id '{rid}' not found.", "invalid_request_error", None, None)
        )
