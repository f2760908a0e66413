"""Batch API files: an input file's lines routed, checked, estimated and rewritten; an output file read back.

An input file (`purpose=batch`, JSONL) holds one request per line:
`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`.
The app names a route as each body's `model`, as it would in a direct call. On
upload the sidecar reads every line as the pipeline reads a request
(`request_parsing.validate_body`), routes it (the route's rules, with the
uploading request's tenant, tier and headers), counts its prompt tokens and its
output reservation the way the pipeline does, and writes the line again for the
backend: the backend's model (an Azure deployment's name), the route's
`maxOutputTokens` applied, the path Azure expects. All lines must name one route
and select one backend that has a Batch API (`batch_backend`); anything else is
a 400 naming the line.

What is kept of an input file is its `InputSummary` (a few numbers), enough to
estimate the batch's cost when it is created. An output file is read back line
by line (`OutputReader`): each line's `custom_id` and the `usage` of its answer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import IO, Any

import orjson

from kubetoll_core.enums import Provider

from . import tokens
from .errors import ApiError
from .json_depth import MAX_JSON_DEPTH, nests_deeper_than
from .providers.base import Endpoint, Usage
from .providers.openai import parse_usage
from .request_parsing import ParsedRequest, validate_body
from .routing import CompiledRoute, RouteContext
from .state import RouterState
from .tenancy import Identity

# The batch endpoints a line may name, and the pipeline endpoint each one is.
LINE_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": Endpoint.chat,
    "/v1/completions": Endpoint.completions,
    "/v1/embeddings": Endpoint.embeddings,
}
# OpenAI's limits for one batch input file.
MAX_LINES = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
# An upload is held in memory up to this size, on disk beyond it.
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024
MAX_CUSTOM_ID_CHARS = 512

# Backends with a Batch API, best first: the hosted APIs that publish one, then servers
# that speak OpenAI's API and may serve /v1/batches too (vLLM's does not).
_BATCH_PROVIDERS = (Provider.openai, Provider.azure_openai, Provider.openai_compatible)

# (request, route, state, chain) -> tokens reserved for the output: the pipeline's reservation.
OutputReservation = Callable[[ParsedRequest, CompiledRoute, RouterState, tuple[str, ...]], int]
# (request, state, route) -> prompt tokens: the pipeline's estimate.
PromptEstimate = Callable[[ParsedRequest, RouterState, CompiledRoute], int]


def spool() -> IO[bytes]:
    """A temporary file for an upload: in memory while it is small, on disk past `SPOOL_IN_MEMORY_BYTES`."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # the caller closes it


@dataclass(slots=True)
class InputSummary:
    """What a batch input file asks for: the numbers its batch's reservation is estimated from."""

    route: str
    endpoint: str  # the lines' url, e.g. "/v1/chat/completions"
    lines: int
    prompt_tokens: int  # summed over the lines
    output_tokens: int  # output reservations, summed
    max_prompt_tokens: int  # the longest line's prompt (tiered prices apply per line)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> InputSummary:
        return cls(
            route=str(doc["route"]),
            endpoint=str(doc["endpoint"]),
            lines=int(doc["lines"]),
            prompt_tokens=int(doc["prompt_tokens"]),
            output_tokens=int(doc["output_tokens"]),
            max_prompt_tokens=int(doc["max_prompt_tokens"]),
        )


@dataclass(slots=True)
class RoutedInput:
    summary: InputSummary
    backend: str
    rewritten: IO[bytes]  # the lines as the backend gets them, positioned at the start
    size: int


def batch_backend(chain: tuple[str, ...], state: RouterState) -> str | None:
    """The backend of a chain a batch goes to: the first with a Batch API, by `_BATCH_PROVIDERS` order."""
    for provider in _BATCH_PROVIDERS:
        for name in chain:
            if state.backends[name].config.provider is provider:
                return name
    return None


def upstream_line_url(provider: Provider, url: str) -> str:
    """A line's `url` (and a batch's `endpoint`) as the provider names it: Azure drops the `/v1`."""
    return url.removeprefix("/v1") if provider is Provider.azure_openai else url


def _bad_line(n: int, message: str, code: str = "invalid_batch_file") -> ApiError:
    return ApiError(400, f"batch input line {n}: {message}", "invalid_request_error", code, "file")


def route_input(
    source: IO[bytes],
    state: RouterState,
    ident: Identity,
    headers: Mapping[str, str],
    estimate_prompt: PromptEstimate,
    output_reservation: OutputReservation,
) -> RoutedInput:
    """Read, check, route, estimate and rewrite an input file (blocking: run it in a thread).

    Raises ApiError (400) naming the first line that is wrong.
    """
    out = spool()
    try:
        return _route_input(source, out, state, ident, headers, estimate_prompt, output_reservation)
    except BaseException:
        out.close()
        raise


def _route_input(
    source: IO[bytes],
    out: IO[bytes],
    state: RouterState,
    ident: Identity,
    headers: Mapping[str, str],
    estimate_prompt: PromptEstimate,
    output_reservation: OutputReservation,
) -> RoutedInput:
    route: CompiledRoute | None = None
    backend: str | None = None
    url: str | None = None
    seen: set[str] = set()
    lines = prompt_sum = output_sum = max_prompt = size = 0
    for n, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        lines += 1
        if lines > MAX_LINES:
            raise _bad_line(n, f"a batch holds at most {MAX_LINES} requests")
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad_line(n, f"not valid JSON ({exc})") from None
        if nests_deeper_than(raw, MAX_JSON_DEPTH):
            raise _bad_line(n, f"nests JSON more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(line, dict):
            raise _bad_line(n, "must be a JSON object with custom_id, method, url and body")
        cid = line.get("custom_id")
        if not isinstance(cid, str) or not cid or len(cid) > MAX_CUSTOM_ID_CHARS:
            raise _bad_line(n, f"`custom_id` must be a string of 1-{MAX_CUSTOM_ID_CHARS} characters")
        if cid in seen:
            raise _bad_line(n, f"`custom_id` {cid!r} is used by an earlier line")
        seen.add(cid)
        if line.get("method") != "POST":
            raise _bad_line(n, "`method` must be POST")
        endpoint = LINE_ENDPOINTS.get(line.get("url"))  # type: ignore[arg-type]
        if endpoint is None:
            raise _bad_line(n, f"`url` must be one of {', '.join(LINE_ENDPOINTS)}")
        if url is None:
            url = line["url"]
        elif line["url"] != url:
            raise _bad_line(n, f"`url` is {line['url']}, an earlier line's is {url}: a batch runs one endpoint")
        body = line.get("body")
        try:
            req = validate_body(body, endpoint)
        except ApiError as exc:
            raise _bad_line(n, f"body: {exc.message}") from None
        if req.stream:
            raise _bad_line(n, "a batch request cannot stream (`stream` must be false or absent)")
        this_route = state.router.get(req.model)
        if this_route is None:
            raise _bad_line(
                n,
                f"the model `{req.model}` is not a route of this router (routes: {', '.join(state.router.names())})",
                "model_not_found",
            )
        if route is None:
            route = this_route
        elif this_route is not route:
            raise _bad_line(
                n,
                f"names route `{this_route.name}`, an earlier line names `{route.name}`: all lines of one batch must "
                "name one route (split the file)",
                "batch_routes_differ",
            )
        prompt = estimate_prompt(req, state, this_route)
        rule = this_route.select(
            RouteContext(prompt, ident.tenant, ident.tier, headers, partial(tokens.last_user_text, req.messages))
        )
        if rule is None:
            raise _bad_line(n, f"no rule of route `{this_route.name}` matches it", "no_matching_rule")
        # The rule's chain, or the caller's experiment arm; a batch runs no cascade (its last step serves it).
        chain = rule.target(ident.tenant, headers).backends
        chosen = batch_backend(chain, state)
        if chosen is None:
            raise _bad_line(
                n,
                f"route `{this_route.name}` (rule {rule.name}) has no OpenAI-family backend, and only those "
                f"(openai, azure-openai, openai-compatible) have a Batch API; its backends: {', '.join(chain)}",
                "batch_unsupported_by_route",
            )
        if backend is None:
            backend = chosen
        elif chosen != backend:
            raise _bad_line(
                n,
                f"selects backend {chosen} of route `{this_route.name}`, an earlier line selects {backend}: a batch "
                "runs on one backend (split the file by the route's rules)",
                "batch_backends_differ",
            )
        output = output_reservation(req, this_route, state, (chosen,))
        b = state.backends[chosen].config
        upstream_model = b.azure.deployment if b.azure is not None else b.model
        rewritten = {
            **line,
            "url": upstream_line_url(b.provider, line["url"]),
            "body": {**req.upstream_body, "model": upstream_model},
        }
        data = orjson.dumps(rewritten) + b"\n"
        out.write(data)
        size += len(data)
        prompt_sum += prompt
        output_sum += output
        max_prompt = max(max_prompt, prompt)
    if route is None or backend is None or url is None:
        raise ApiError(
            400, "the batch input file holds no requests", "invalid_request_error", "invalid_batch_file", "file"
        )
    out.seek(0)
    summary = InputSummary(route.name, url, lines, prompt_sum, output_sum, max_prompt)
    return RoutedInput(summary, backend, out, size)


@dataclass(slots=True)
class OutputLine:
    custom_id: str
    status: int  # the upstream answer's HTTP status (0 when the line carries none)
    usage: Usage | None  # its `usage`, when it reported one


class OutputReader:
    """Reads a batch output file as it arrives in chunks: one `OutputLine` per line. Malformed lines are counted."""

    MAX_LINE_BYTES = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._buf = b""
        self.malformed = 0

    def feed(self, chunk: bytes) -> Iterator[OutputLine]:
        self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        if len(self._buf) > self.MAX_LINE_BYTES:
            self._buf = b""
            self.malformed += 1
        for raw in complete:
            line = self._line(raw)
            if line is not None:
                yield line

    def close(self) -> Iterator[OutputLine]:
        rest, self._buf = self._buf, b""
        line = self._line(rest)
        if line is not None:
            yield line

    def _line(self, raw: bytes) -> OutputLine | None:
        if not raw.strip():
            return None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return None
        if not isinstance(doc, dict):
            self.malformed += 1
            return None
        resp = doc.get("response")
        resp = resp if isinstance(resp, dict) else {}
        body = resp.get("body")
        status = resp.get("status_code")
        try:
            usage = parse_usage(body.get("usage")) if isinstance(body, dict) else None
        except (TypeError, ValueError):  # token counts that are not numbers: the line is not billable as sent
            self.malformed += 1
            usage = None
        return OutputLine(
            custom_id=str(doc.get("custom_id") or ""), status=status if isinstance(status, int) else 0, usage=usage
        )
