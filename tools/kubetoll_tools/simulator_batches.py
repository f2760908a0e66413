"""OpenAI's Files and Batch APIs, simulated on a `SimulatedUpstream` (and Azure OpenAI's, under `/openai`).

* OpenAI: `POST /v1/files` (multipart: `purpose`, `file`), `GET /v1/files`,
  `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`;
  `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
  `POST /v1/batches/{id}/cancel`.
* Azure OpenAI: the same under `/openai/files` and `/openai/batches`, with
  `api-version` and the `api-key` header; lines name `/chat/completions`.

A batch behaves as OpenAI's does: `validating`, then `in_progress`, then
`completed` (`SimSettings.batch_seconds` after it was created; `None` holds it in
progress until `finish`), with an output file of one line per request that
succeeded (`response.status_code` 200, `response.body` the endpoint's answer
with its `usage`) and an error file for the ones that failed. Each line is
answered by the simulator's own endpoint (`SimulatedUpstream.answer`), so usage
is what a direct call would report. Cancel moves it to `cancelling`, and to
`cancelled` at the next read, with the output of the lines done before;
`expire` ends it as `expired`, the rest of its lines in the error file with
`batch_expired`. A file whose lines are not valid fails the batch (`failed`,
`errors` naming the line). Tests steer progress with `advance`, `finish` and
`expire`; status is worked out on each read, so nothing runs in the background.

Not simulated: `/v1/responses` and `/v1/moderations` lines, output expiry, the
50,000-line and 200 MB limits, uploads in parts (`/v1/uploads`).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

if TYPE_CHECKING:
    from .simulator import SimulatedUpstream

_OPENAI, _AZURE = "openai", "azure"
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_DAY = 86_400


def _id(prefix: str) -> str:
    return prefix + f"{random.getrandbits(96):024x}"


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


@dataclass
class SimFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class _Line:
    custom_id: str
    status: int
    body: Any  # the endpoint's JSON answer (an error object when status is not 200)


@dataclass
class SimBatch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: Any
    created_at: int
    created_mono: float
    results: list[_Line]
    errors: list[dict[str, Any]] = field(default_factory=list)  # validation errors: the batch fails
    status: str = "validating"
    done: int = 0  # lines answered so far (the first `done` of `results`)
    seen: bool = False  # read at least once since created: leaves `validating` when held
    seen_cancelling: bool = False  # read once while cancelling: the next read finds it cancelled
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    output_file_id: str | None = None
    error_file_id: str | None = None
    finished: bool = False


class SimulatedBatches:
    """The Files and Batch APIs of one `SimulatedUpstream` (its settings, its API key, its endpoints)."""

    def __init__(self, upstream: SimulatedUpstream) -> None:
        self.upstream = upstream
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}

    # ----- routes

    def add_routes(self, app: web.Application) -> None:
        Handler = Callable[[str, web.Request], Awaitable[web.StreamResponse]]
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/files", self._upload),
            ("GET", "/files", self._list_files),
            ("GET", "/files/{file_id}", self._get_file),
            ("GET", "/files/{file_id}/content", self._file_content),
            ("DELETE", "/files/{file_id}", self._delete_file),
            ("POST", "/batches", self._create),
            ("GET", "/batches", self._list_batches),
            ("GET", "/batches/{batch_id}", self._get_batch),
            ("POST", "/batches/{batch_id}/cancel", self._cancel),
        ]
        for method, path, handler in routes:
            for provider, prefix in ((_OPENAI, "/v1"), (_AZURE, "/openai")):
                app.router.add_route(method, prefix + path, functools.partial(self._entry, provider, handler))

    async def _entry(self, provider: str, handler: Any, request: web.Request) -> web.StreamResponse:
        denied = self._auth(provider, request)
        if denied is not None:
            return denied
        return await handler(provider, request)

    def _auth(self, provider: str, request: web.Request) -> web.Response | None:
        key = self.upstream.settings.api_key
        if provider == _AZURE:
            if key is not None and request.headers.get("api-key") != key:
                return _error(401, "Access denied due to invalid subscription key or wrong API endpoint.")
            if not request.query.get("api-version"):
                return _error(400, "Missing required query parameter: api-version")
            return None
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    def _record(self, provider: str, request: web.Request, body: Any) -> None:
        from .simulator import RecordedRequest

        if self.upstream.settings.max_recorded_requests <= 0:
            return
        self.upstream.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                time=time.time(),
                provider=provider,
                api_version=request.query.get("api-version"),
            )
        )

    # ----- files

    async def _upload(self, provider: str, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return _error(400, "Expected a multipart/form-data body with `purpose` and `file`.")
        fields: dict[str, str] = {}
        content: bytes | None = None
        filename = "upload"
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                content = await part.read()
                filename = part.filename or filename
            else:
                fields[part.name] = (await part.read()).decode()
        self._record(provider, request, {**fields, "file": filename, "bytes": len(content or b"")})
        purpose = fields.get("purpose")
        if not purpose:
            return _error(400, "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
        if purpose not in _PURPOSES:
            return _error(400, f"'{purpose}' is not one of {list(_PURPOSES)} - 'purpose'", "purpose")
        if content is None:
            return _error(400, "Missing required parameter: 'file'.", "file", "missing_required_parameter")
        f = SimFile(_id("file-"), filename, purpose, content, int(time.time()))
        self.files[f.id] = f
        return _json(f.object())

    def _file_or_404(self, request: web.Request) -> SimFile | web.Response:
        file_id = request.match_info["file_id"]
        f = self.files.get(file_id)
        if f is None:
            return _error(404, f"No such File object: {file_id}", "id")
        return f

    async def _list_files(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        purpose = request.query.get("purpose")
        items = [f for f in self.files.values() if purpose is None or f.purpose == purpose]
        return self._page(request, [f.object() for f in items], default_limit=10_000)

    async def _get_file(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        f = self._file_or_404(request)
        return f if isinstance(f, web.Response) else _json(f.object())

    async def _file_content(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        f = self._file_or_404(request)
        if isinstance(f, web.Response):
            return f
        return web.Response(body=f.content, content_type="application/octet-stream")

    async def _delete_file(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        f = self._file_or_404(request)
        if isinstance(f, web.Response):
            return f
        del self.files[f.id]
        return _json({"id": f.id, "object": "file", "deleted": True})

    def _page(self, request: web.Request, items: list[dict[str, Any]], default_limit: int) -> web.Response:
        """A cursor page as OpenAI lists: newest first (files: `order=asc` for oldest), `after` an id."""
        asc = request.query.get("order") == "asc"
        items.sort(key=lambda o: (o["created_at"], o["id"]), reverse=not asc)
        after = request.query.get("after")
        if after:
            ids = [o["id"] for o in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        try:
            limit = int(request.query.get("limit", default_limit))
        except ValueError:
            return _error(400, "Invalid 'limit': expected an integer.", "limit")
        page, more = items[:limit], len(items) > limit
        return _json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": more,
            }
        )

    # ----- batches

    async def _create(self, provider: str, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            body = None
        self._record(provider, request, body)
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        endpoint = body.get("endpoint")
        allowed = _ENDPOINTS if provider == _OPENAI else tuple(e.removeprefix("/v1") for e in _ENDPOINTS)
        if endpoint not in allowed:
            return _error(
                400, f"Invalid value for 'endpoint': {endpoint!r}. Expected one of {list(allowed)}.", "endpoint"
            )
        if body.get("completion_window") != "24h":
            return _error(400, "Invalid value for 'completion_window': expected '24h'.", "completion_window")
        input_id = body.get("input_file_id")
        f = self.files.get(input_id) if isinstance(input_id, str) else None
        if f is None:
            return _error(404, f"No such File object: {input_id}", "input_file_id")
        if f.purpose != "batch":
            return _error(400, f"File {input_id} has purpose {f.purpose!r}; a batch needs purpose 'batch'.")
        lines, errors = self._parse_lines(f.content, endpoint)
        results = [] if errors else [await self._answer(provider, request, endpoint, line) for line in lines]
        now = int(time.time())
        b = SimBatch(_id("batch_"), endpoint, f.id, "24h", body.get("metadata"), now, time.monotonic(), results, errors)
        self.batches[b.id] = b
        return _json(self._object(b))

    def _parse_lines(self, content: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        lines: list[dict[str, Any]] = []
        seen: set[str] = set()
        for n, raw in enumerate(content.splitlines(), start=1):
            if not raw.strip():
                continue

            def invalid(message: str, param: str | None = None, n: int = n) -> dict[str, Any]:
                return {"code": "invalid_request", "message": message, "param": param, "line": n}

            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return [], [invalid("This line is not parseable as valid JSON.")]
            if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
                return [], [invalid("Missing required parameter: 'custom_id'.", "custom_id")]
            if line["custom_id"] in seen:
                return [], [invalid("The custom_id for this request is a duplicate of another request.", "custom_id")]
            seen.add(line["custom_id"])
            if line.get("method") != "POST":
                return [], [invalid("Only POST requests are supported.", "method")]
            if line.get("url") != endpoint:
                return [], [invalid(f"The url for this request does not match the batch endpoint {endpoint}.", "url")]
            if not isinstance(line.get("body"), dict):
                return [], [invalid("Missing required parameter: 'body'.", "body")]
            lines.append(line)
        if not lines:
            return [], [{"code": "empty_file", "message": "The input file is empty.", "param": None, "line": None}]
        return lines, []

    async def _answer(self, provider: str, request: web.Request, endpoint: str, line: dict[str, Any]) -> _Line:
        body = {k: v for k, v in line["body"].items() if k not in ("stream", "stream_options")}
        status, payload = await self.upstream.answer(provider, endpoint.removeprefix("/v1"), body, request)
        return _Line(line["custom_id"], status, payload)

    def _batch_or_404(self, request: web.Request) -> SimBatch | web.Response:
        batch_id = request.match_info["batch_id"]
        b = self.batches.get(batch_id)
        if b is None:
            return _error(404, f"No batch found with id '{batch_id}'.", "batch_id")
        return b

    async def _get_batch(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        b = self._batch_or_404(request)
        return b if isinstance(b, web.Response) else _json(self._object(self._advance_clock(b)))

    async def _list_batches(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        items = [self._object(self._advance_clock(b)) for b in self.batches.values()]
        return self._page(request, items, default_limit=20)

    async def _cancel(self, provider: str, request: web.Request) -> web.StreamResponse:
        self._record(provider, request, None)
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        self._advance_clock(b)
        if b.finished:
            return _error(409, f"Cannot cancel a batch with status '{b.status}'.")
        if b.status != "cancelling":
            b.status = "cancelling"
            b.times["cancelling_at"] = int(time.time())
        return _json(self._object(b))

    # ----- progress

    def _advance_clock(self, b: SimBatch) -> SimBatch:
        """Where the batch is now: each read moves it on as time (or the test's steering) says."""
        if b.finished:
            return b
        if b.status == "cancelling":
            if b.seen_cancelling:
                self._end(b, "cancelled")
            b.seen_cancelling = True
            return b
        if b.errors:
            if b.seen:
                self._end(b, "failed")
            b.seen = True
            return b
        duration = self.upstream.settings.batch_seconds
        if duration is None:
            if b.seen and b.status == "validating":
                self._start(b)
            b.seen = True
            return b
        elapsed = time.monotonic() - b.created_mono
        if elapsed >= duration:
            self._start(b)
            b.done = len(b.results)
            self._end(b, "completed")
        elif elapsed >= duration / 10:
            self._start(b)
            b.done = max(b.done, int(len(b.results) * elapsed / duration))
        return b

    def _start(self, b: SimBatch) -> None:
        if b.status == "validating":
            b.status = "in_progress"
            b.times["in_progress_at"] = int(time.time())

    def _end(self, b: SimBatch, status: str) -> None:
        now = int(time.time())
        b.status, b.finished = status, True
        b.times[f"{status}_at"] = now
        if status == "failed":
            return
        b.times.setdefault("finalizing_at", now)
        done = b.results[: b.done]
        ok = [r for r in done if r.status == 200]
        failed = [r for r in done if r.status != 200]
        out = [self._output_line(r) for r in ok]
        err = [self._output_line(r) for r in failed]
        if status == "expired":
            err += [
                orjson.dumps(
                    {
                        "id": _id("batch_req_"),
                        "custom_id": r.custom_id,
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    }
                )
                for r in b.results[b.done :]
            ]
        if out:
            b.output_file_id = self._store_output(out, f"{b.id}_output.jsonl")
        if err:
            b.error_file_id = self._store_output(err, f"{b.id}_error.jsonl")

    @staticmethod
    def _output_line(r: _Line) -> bytes:
        return orjson.dumps(
            {
                "id": _id("batch_req_"),
                "custom_id": r.custom_id,
                "response": {"status_code": r.status, "request_id": _id("req_"), "body": r.body},
                "error": None,
            }
        )

    def _store_output(self, lines: list[bytes], filename: str) -> str:
        f = SimFile(_id("file-"), filename, "batch_output", b"\n".join(lines) + b"\n", int(time.time()))
        self.files[f.id] = f
        return f.id

    def _object(self, b: SimBatch) -> dict[str, Any]:
        done = b.results[: b.done]
        t = b.times
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id,
            "completion_window": b.completion_window,
            "status": b.status,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "created_at": b.created_at,
            "in_progress_at": t.get("in_progress_at"),
            "expires_at": b.created_at + _DAY,
            "finalizing_at": t.get("finalizing_at"),
            "completed_at": t.get("completed_at"),
            "failed_at": t.get("failed_at"),
            "expired_at": t.get("expired_at"),
            "cancelling_at": t.get("cancelling_at"),
            "cancelled_at": t.get("cancelled_at"),
            "request_counts": {
                "total": len(b.results),
                "completed": sum(1 for r in done if r.status == 200),
                "failed": sum(1 for r in done if r.status != 200),
            },
            "metadata": b.metadata,
        }

    # ----- steering, for tests

    def advance(self, batch_id: str, lines: int) -> None:
        """Answer `lines` more lines of a batch held in progress (`batch_seconds=None`)."""
        b = self.batches[batch_id]
        if b.status == "validating":
            self._start(b)
        b.done = min(len(b.results), b.done + lines)

    def finish(self, batch_id: str) -> None:
        """Complete a batch now: every line answered, the output file written."""
        b = self.batches[batch_id]
        if b.finished:
            return
        if b.errors:
            self._end(b, "failed")
            return
        self._start(b)
        b.done = len(b.results)
        self._end(b, "completed")

    def expire(self, batch_id: str) -> None:
        """End a batch as its completion window would: `expired`, with what was done."""
        b = self.batches[batch_id]
        if not b.finished:
            self._start(b)
            self._end(b, "expired")
