from __future__ import annotations

import os

import pytest

from kubetoll_sidecar.upstream_simulator import SimSettings, SimulatedUpstream
from support.harness import RunningSidecar

os.environ.setdefault("KT_TEST_OPENAI_KEY", "sk-test-openai-key-123")
os.environ.setdefault("KT_TEST_ANTHROPIC_KEY", "sk-ant-test-key-456")


@pytest.fixture
async def sim():
    async with SimulatedUpstream(SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"])) as s:
        yield s


@pytest.fixture
async def sim2():
    """A second provider, for fallback tests."""
    async with SimulatedUpstream(SimSettings(api_key=os.environ["KT_TEST_OPENAI_KEY"])) as s:
        yield s


@pytest.fixture
async def start_sidecar(tmp_path):
    started: list[RunningSidecar] = []

    async def _start(config, clock=None, store=None) -> RunningSidecar:
        sc = RunningSidecar(tmp_path, config, clock=clock, store=store)
        started.append(sc)
        return await sc.start()

    yield _start
    for sc in started:
        await sc.stop()
