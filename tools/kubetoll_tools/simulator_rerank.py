"""Simulated verifier backends for the semantic cache: a rerank server and a yes/no judge.

`RerankServer` answers the three rerank wire formats on 127.0.0.1, as the servers
that serve cross-encoders do:

* TEI: `POST /rerank {"query", "texts", "raw_scores"}` -> `[{"index", "score"}]` (no usage);
* vLLM, Infinity, Cohere: `POST /rerank` or `/v1/rerank {"model", "query", "documents"}` ->
  `{"id", "model", "results": [{"index", "relevance_score"}], "usage": {"total_tokens"}}`
  (the body says which: `texts` is TEI's, `documents` Cohere's);
* vLLM: `POST /score` or `/v1/score {"model", "text_1", "text_2"}` ->
  `{"id", "object": "list", "data": [{"index", "object": "score", "score"}], "usage"}`.

`JudgeServer` is an OpenAI-compatible `POST /v1/chat/completions` that reads the two
questions of the judge prompt (each between `<question>` tags, as
`kubetoll_sidecar.cache.verifiers.judge_messages` writes them) and answers `yes`
or `no`, with usage.

The score and the verdict are functions of the two texts (`score`, `decide`),
word overlap by default, so a test sets exactly what the "model" thinks. Both
servers count their calls, keep the bodies they got, check a bearer key when
given one, and fail on demand: `fail` (HTTP 500), `hang` (seconds before
answering), `malformed` (a 200 whose body has no usable answer: see
`MALFORMED`).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from kubetoll_sidecar.http_server import LocalServer

__all__ = ["JudgeServer", "MALFORMED", "RerankServer", "word_overlap"]

# What `malformed` may be set to: rerank "no_results", "not_json", "nan", "string_score", "wrong_index";
# judge "no_choices", "not_json", "maybe" (an answer that is neither yes nor no: a no, not a failure).
MALFORMED = ("no_results", "not_json", "nan", "string_score", "wrong_index", "no_choices", "maybe")

_WORD = re.compile(r"[a-z0-9]+")
_QUESTION = re.compile(r"<question>\n(.*?)\n</question>", re.S)


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two word sets: 1.0 for the same words, lower as they differ."""
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


class _Server(LocalServer):
    """What both servers share: faults, a bearer key, the calls received (start/stop: `LocalServer`)."""

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        super().__init__(port)
        self.api_key = api_key
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.traceparents: list[str | None] = []  # the W3C header of each call (traces)
        self.fail = False
        self.hang = 0.0
        self.malformed = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        raise NotImplementedError

    async def _admit(self, request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
        """The request's body, or the error response to send instead."""
        self.calls += 1
        self.paths.append(request.path)
        self.traceparents.append(request.headers.get("traceparent"))
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return None, web.json_response({"error": {"message": "invalid api key", "type": "auth"}}, status=401)
        if self.fail:
            return None, web.json_response(
                {"error": {"message": "simulated failure", "type": "server_error"}}, status=500
            )
        try:
            body = await request.json()
        except ValueError:
            return None, web.json_response(
                {"error": {"message": "body is not JSON", "type": "invalid_request"}}, status=400
            )
        if not isinstance(body, dict):
            return None, web.json_response({"error": {"message": "body is not an object"}}, status=400)
        self.bodies.append(body)
        return body, None

    @staticmethod
    def _json(payload: Any) -> web.Response:
        return web.Response(body=orjson.dumps(payload), content_type="application/json")


class RerankServer(_Server):
    """A cross-encoder behind TEI's, Cohere's (vLLM, Infinity) and vLLM's score APIs."""

    def __init__(
        self,
        score: Callable[[str, str], float] = word_overlap,
        model: str = "cross-encoder-sim",
        api_key: str | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(api_key, port)
        self.score = score
        self.model = model

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/rerank", "/v1/rerank"):
            app.router.add_post(path, self._rerank)
        for path in ("/score", "/v1/score"):
            app.router.add_post(path, self._score)
        return app

    def _value(self, query: str, text: str) -> Any:
        if self.malformed == "nan":
            return float("nan")
        if self.malformed == "string_score":
            return "high"
        return round(float(self.score(query, text)), 6)

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._admit(request)
        if error is not None:
            return error
        assert body is not None
        query = body.get("query")
        tei = "texts" in body
        docs = body.get("texts") if tei else body.get("documents")
        if not isinstance(query, str) or not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            return web.json_response({"error": {"message": "query and texts/documents are required"}}, status=422)
        if self.malformed == "not_json":
            return web.Response(body=b"<html>bad gateway</html>", content_type="text/html")
        index = (lambda i: i + 1) if self.malformed == "wrong_index" else (lambda i: i)
        tokens = len(query.split()) + sum(len(d.split()) for d in docs)
        if tei:
            items = (
                []
                if self.malformed == "no_results"
                else [{"index": index(i), "score": self._value(query, d)} for i, d in enumerate(docs)]
            )
            return self._json(items)
        results = (
            []
            if self.malformed == "no_results"
            else [{"index": index(i), "relevance_score": self._value(query, d)} for i, d in enumerate(docs)]
        )
        return self._json(
            {
                "id": f"rerank-{uuid.uuid4().hex[:12]}",
                "model": body.get("model") or self.model,
                "results": results,
                "usage": {"total_tokens": tokens},
            }
        )

    async def _score(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._admit(request)
        if error is not None:
            return error
        assert body is not None
        a, b = body.get("text_1"), body.get("text_2")
        if not isinstance(a, str) or not isinstance(b, str):
            return web.json_response({"error": {"message": "text_1 and text_2 are required"}}, status=422)
        if self.malformed == "not_json":
            return web.Response(body=b"<html>bad gateway</html>", content_type="text/html")
        tokens = len(a.split()) + len(b.split())
        index = 1 if self.malformed == "wrong_index" else 0
        data = (
            [] if self.malformed == "no_results" else [{"index": index, "object": "score", "score": self._value(a, b)}]
        )
        return self._json(
            {
                "id": f"score-{uuid.uuid4().hex[:12]}",
                "object": "list",
                "model": body.get("model") or self.model,
                "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def same_words(a: str, b: str) -> bool:
    return words(a) == words(b)


class JudgeServer(_Server):
    """An OpenAI-compatible chat endpoint that judges the two questions of the judge prompt."""

    def __init__(
        self,
        decide: Callable[[str, str], bool] = same_words,
        model: str = "judge-sim",
        api_key: str | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(api_key, port)
        self.decide = decide
        self.model = model
        self.answer_yes, self.answer_no = "yes", "no"  # what it says (a test may make it chatty: "Yes.")
        self.questions: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._admit(request)
        if error is not None:
            return error
        assert body is not None
        raw_messages = body.get("messages")
        messages: list[Any] = raw_messages if isinstance(raw_messages, list) else []
        user = next(
            (m.get("content") for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
            None,
        )
        found = _QUESTION.findall(user) if isinstance(user, str) else []
        if len(found) != 2:
            return web.json_response({"error": {"message": "expected two <question> blocks"}}, status=400)
        a, b = found
        self.questions.append((a, b))
        if self.malformed == "not_json":
            return web.Response(body=b"upstream reset", content_type="text/plain")
        prompt: int = sum(len(str(m.get("content") or "").split()) for m in messages if isinstance(m, dict))
        completion: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model") or self.model,
            "usage": {"prompt_tokens": prompt, "completion_tokens": 1, "total_tokens": prompt + 1},
        }
        if self.malformed == "no_choices":
            return self._json(completion)
        text = "maybe" if self.malformed == "maybe" else (self.answer_yes if self.decide(a, b) else self.answer_no)
        completion["choices"] = [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ]
        return self._json(completion)
