"""A small async client for the few API calls the operator makes itself.

kopf watches and indexes; writing the ConfigMap, the credentials Secret, the
statuses of other objects and Events is ours. The credentials are the ones kopf
logged in with (captured by the login handler), so there is one source of truth
and re-logins (token rotation) reach this client too.
"""

from __future__ import annotations

import base64
import ssl
from typing import Any

import aiohttp


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:300]}")
        self.status = status


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    """kopf's own: CA and client certificate from files or inline data (a person's kubeconfig
    carries `certificate-authority-data` base64 inline; a pod's service account, files)."""
    if not str(info.server).startswith("https"):
        return False
    context: ssl.SSLContext = info.as_ssl_context()
    return context


class KubeApi:
    def __init__(self, info: Any) -> None:
        self.info = info
        self._session: aiohttp.ClientSession | None = None

    def update(self, info: Any) -> None:
        self.info = info

    async def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=str(self.info.server).rstrip("/") + "/",
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self.info)),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.info.token:
            headers["Authorization"] = f"{self.info.scheme or 'Bearer'} {self.info.token}"
        elif self.info.username and self.info.password:
            raw = f"{self.info.username}:{self.info.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        return headers

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any] | None:
        """JSON in, JSON out. None for 404 on GET and DELETE."""
        session = await self._ensure()
        async with session.request(
            method, path.lstrip("/"), json=body, headers=self._headers(content_type if body is not None else None)
        ) as resp:
            text = await resp.text()
            if resp.status == 404 and method in ("GET", "DELETE"):
                return None
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, text)
            return await resp.json(content_type=None) if text else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        return await self.request("GET", path)

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self.request("POST", path, body, "application/json")

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        return await self.request("PATCH", path, body, "application/merge-patch+json")

    async def delete(self, path: str) -> dict[str, Any] | None:
        return await self.request("DELETE", path)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
