"""Property: the sidecar itself never answers 5xx, whatever body a client posts.

Generated bodies (any JSON, and near-valid requests with every field replaced by
any JSON value) go to every POST route of a running sidecar whose backend is the
simulator. A 5xx is allowed only when it is the upstream's own answer passed on
(`x-kubetoll-backend` set and the code an upstream one), never from the sidecar.
Bounded for CI; `bench/fuzz_bodies.py` runs the same property for longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetoll_tools.simulator import SimSettings, SimulatedUpstream
from support.harness import RunningSidecar, base_config

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | json_values},
    optional={"content": st.text(max_size=60) | json_values, "name": json_values, "tool_calls": json_values},
)
near_valid = st.fixed_dictionaries(
    {"model": st.just("chat") | json_values},
    optional={
        "messages": st.lists(message, max_size=4) | json_values,
        "prompt": st.text(max_size=40) | json_values,
        "input": st.text(max_size=40) | json_values,
        "max_tokens": st.integers(-5, 10**7) | json_values,
        "n": st.integers(-1, 5) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "tools": json_values,
        "response_format": json_values,
        "temperature": json_values,
        "user": json_values,
        "metadata": json_values,
    },
)
deeply_nested = st.integers(200, 1100).map(
    lambda depth: b'{"model": "chat", "messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}"
)
bodies = st.one_of(
    near_valid.map(lambda b: json.dumps(b).encode()),
    deeply_nested,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


class SidecarThread:
    """A simulator and a sidecar on their own loop in a thread, shared by every example."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.url = ""
        self._stop: asyncio.Event | None = None
        self.failure: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported by __enter__ instead of a bare timeout
            self.failure = exc
            self.ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with SimulatedUpstream(SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"])) as sim:
            sidecar = await RunningSidecar(self.tmp, base_config(sim.url)).start()
            self.url = sidecar.url
            self.ready.set()
            await self._stop.wait()
            await sidecar.stop()

    def __enter__(self) -> SidecarThread:
        self.thread.start()
        assert self.ready.wait(30), "the sidecar did not start"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


@pytest.fixture(scope="module")
def sidecar_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with SidecarThread(tmp_path_factory.mktemp("fuzz")) as running:
        yield running.url


async def post(url: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + path, data=body, headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(20)
        ) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def sidecar_5xx(status: int, headers: dict[str, str], body: bytes) -> bool:
    if status < 500:
        return False
    try:
        code = json.loads(body)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        code = None
    # Every backend failing is the upstream's doing only when the upstream said so with a 5xx.
    return "x-kubetoll-backend" not in headers and code != "all_backends_failed"


# CI runs a few hundred; bench/fuzz_bodies.py sets KT_FUZZ_EXAMPLES for a longer run.
EXAMPLES = int(os.environ.get("KT_FUZZ_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), body=bodies)
def test_no_body_makes_the_sidecar_answer_5xx(sidecar_url: str, path: str, body: bytes) -> None:
    status, headers, answer = asyncio.run(post(sidecar_url, path, body))
    assert not sidecar_5xx(status, headers, answer), (status, body[:300], answer[:300])
    if status >= 400:
        error = json.loads(answer)["error"]  # always OpenAI's error shape
        assert isinstance(error["message"], str) and error["message"]
