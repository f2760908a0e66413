"""A hosted API over HTTPS, through a running sidecar: verified TLS with SNI, plain and streamed,
and a certificate the sidecar does not trust failing over to the next backend without leaking the key."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme

from kubetoll_sidecar import upstream_client
from kubetoll_tools.simulator import SimSettings, SimulatedUpstream
from support.harness import two_backend_config


@pytest.fixture
async def tls_sim(ca: trustme.CA) -> AsyncIterator[SimulatedUpstream]:
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    async with SimulatedUpstream(
        SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"]), host="localhost", ssl_context=server_ctx
    ) as s:
        yield s


def trusting(monkeypatch: pytest.MonkeyPatch, ca: trustme.CA) -> None:
    # The sidecar verifies against the system's CA store; the test CA joins it for this test.
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    monkeypatch.setattr(upstream_client, "_default_ssl", ctx)


async def test_chat_over_https_plain_and_streamed(tls_sim, sim2, start_sidecar, monkeypatch, ca):
    trusting(monkeypatch, ca)
    assert tls_sim.url.startswith("https://localhost:")  # a name, so SNI and the name check are exercised
    sc = await start_sidecar(two_backend_config(tls_sim, sim2))
    client = sc.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.headers["x-kubetoll-backend"] == "primary"
    assert raw.parse().choices[0].message.content
    stream = await client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    assert len(tls_sim.requests) == 2 and not sim2.requests
    assert tls_sim.requests[0].headers["authorization"] == "Bearer " + os.environ["KT_TEST_OPENAI_KEY"]


async def test_an_untrusted_certificate_falls_back_and_names_tls_without_the_key(tls_sim, sim2, start_sidecar):
    cfg = two_backend_config(tls_sim, sim2)
    cfg["routes"][0]["rules"][0]["backends"] = ["primary"]  # no fallback: the error reaches the client
    sc = await start_sidecar(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            sc.url + "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        ) as r:
            status, text = r.status, await r.text()
    assert status == 502
    assert "TLS" in text and "certificate" in text
    assert os.environ["KT_TEST_OPENAI_KEY"] not in text
    assert not tls_sim.requests

    sc2 = await start_sidecar(two_backend_config(tls_sim, sim2))  # with the fallback
    raw = await sc2.openai().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.headers["x-kubetoll-backend"] == "secondary"


async def test_streams_reuse_one_tls_connection(tls_sim, sim2, start_sidecar, monkeypatch, ca):
    # A stream that ended hands its connection back: three streams, one TLS handshake.
    trusting(monkeypatch, ca)
    sc = await start_sidecar(two_backend_config(tls_sim, sim2))
    client = sc.openai()
    for _ in range(3):
        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    pool = sc.sidecar.state.backends["primary"].client
    assert (pool.open_connections, pool.idle_connections) == (1, 1)


def test_the_default_context_verifies_and_is_the_one_aiohttp_loaded(monkeypatch):
    # One CA store in the process (~2.3 MiB), not one for aiohttp and one for the upstream client.
    from aiohttp import connector

    monkeypatch.setattr(upstream_client, "_default_ssl", None)
    ctx = upstream_client._default_ssl_context()
    assert ctx is connector._SSL_CONTEXT_VERIFIED
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert upstream_client._default_ssl_context() is ctx


async def test_roots_from_a_hashed_directory_verify_on_demand(tls_sim, ca, tmp_path, monkeypatch):
    # The sidecar image sets SSL_CERT_FILE=/dev/null and SSL_CERT_DIR=/etc/ssl/certs: no root is
    # parsed when the context is built, the one a handshake needs is read then. A directory holding
    # the test CA under its subject hash verifies the upstream; an empty one refuses it.
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to name the CA by its subject hash")
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    proc = await asyncio.create_subprocess_exec(
        openssl, "x509", "-subject_hash", "-noout", "-in", str(pem), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    subject_hash = out.decode().strip()
    roots, empty = tmp_path / "roots", tmp_path / "empty"
    roots.mkdir()
    empty.mkdir()
    (roots / f"{subject_hash}.0").write_bytes(pem.read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)
    url = tls_sim.url + "/v1/models"
    for directory, trusted in ((roots, True), (empty, False)):
        monkeypatch.setenv("SSL_CERT_DIR", str(directory))
        ctx = ssl.create_default_context()
        assert ctx.cert_store_stats()["x509_ca"] == 0  # nothing parsed up front
        client = upstream_client.UpstreamClient(ssl_context=ctx)
        try:
            if trusted:
                resp = await client.request("GET", url, headers={"Authorization": "Bearer " + tls_sim.settings.api_key})
                assert resp.status == 200, await resp.read()
                await resp.read()
                assert ctx.cert_store_stats()["x509_ca"] == 1  # read when the handshake needed it
            else:
                with pytest.raises(upstream_client.UpstreamConnectionError, match="TLS"):
                    await client.request("GET", url)
        finally:
            await client.close()
