"""The operator's API client trusts the CA however a kubeconfig carries it.

A person's kubeconfig holds `certificate-authority-data` base64-encoded inline; a
pod's service account gives a file. Both reach a real HTTPS server, and a CA
that did not sign the server's certificate is refused.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiohttp
import kopf
import pytest
import trustme
from aiohttp import web

from kubetoll_operator.kube import KubeApi
from support.ports import listening_socket


async def namespace(request: web.Request) -> web.Response:
    return web.json_response({"kind": "Namespace"})


async def serve_https(ca: trustme.CA) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_get("/api/v1/namespaces/x", namespace)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock, ssl_context=server_ctx).start()
    return runner, sock.getsockname()[1]


@pytest.mark.parametrize("how", ["inline base64", "inline PEM", "file"])
async def test_the_ca_is_trusted_however_it_is_given(tmp_path: Path, how: str) -> None:
    ca = trustme.CA()
    runner, port = await serve_https(ca)
    pem = ca.cert_pem.bytes()
    if how == "file":
        (tmp_path / "ca.crt").write_bytes(pem)
        info = kopf.ConnectionInfo(server=f"https://127.0.0.1:{port}", ca_path=str(tmp_path / "ca.crt"))
    else:
        data = base64.b64encode(pem) if how == "inline base64" else pem
        info = kopf.ConnectionInfo(server=f"https://127.0.0.1:{port}", ca_data=data)
    api = KubeApi(info)
    try:
        assert (await api.get("/api/v1/namespaces/x")) == {"kind": "Namespace"}
    finally:
        await api.close()
        await runner.cleanup()


async def test_a_ca_that_did_not_sign_the_server_is_refused() -> None:
    runner, port = await serve_https(trustme.CA())
    other = trustme.CA()
    api = KubeApi(kopf.ConnectionInfo(server=f"https://127.0.0.1:{port}", ca_data=other.cert_pem.bytes()))
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await api.get("/api/v1/namespaces/x")
    finally:
        await api.close()
        await runner.cleanup()
