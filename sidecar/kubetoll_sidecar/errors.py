"""Errors in OpenAI's JSON shape, so the official SDKs raise their own exception types.

`{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use:
400 invalid_request_error, 403 permission_denied, 404 model not found, 413,
429 rate/budget limits (with Retry-After), 502/503/504 when every backend failed.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        if self.retry_after is not None:
            headers["Retry-After"] = retry_after_header(self.retry_after)
        return web.Response(
            status=self.status, body=orjson.dumps(self.body()), content_type="application/json", headers=headers
        )


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up: a client that waits exactly this long must succeed."""
    return str(max(1, math.ceil(seconds)))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


def not_found_model(model: str, known: list[str]) -> ApiError:
    listed = ", ".join(sorted(known)[:20]) or "none configured"
    return ApiError(
        404,
        f"The model `{model}` does not exist on this router. Routes available: {listed}.",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def store_unavailable(exc: Exception) -> ApiError:
    """503 for a budget the shared store could not decide (failClosed, or the failOpen allowance used up)."""
    return ApiError(
        503, f"budget store unavailable: {exc}", "service_unavailable", "budget_store_unavailable", retry_after=1.0
    )


def budget_suspended(exc: Exception) -> ApiError:
    """403 for a budget whose kill switch is on."""
    return ApiError(403, str(exc), "permission_denied", "budget_suspended")
