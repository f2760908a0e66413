"""Load-aware choice among an in-cluster backend's replicas, and spill-over to a hosted backend.

Through the official `openai` SDK against a real sidecar: two simulated vLLM replicas
whose `/metrics` gauges the test sets (kubetoll_tools.simulator_vllm_metrics) and one
simulated hosted OpenAI backend. The sidecar's monotonic clock is the test's: after the
first read at start-up, a replica is read again only when the test moves the clock past
its interval or calls `poll_once`, so nothing waits on time.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetoll_core.enums import LoadMetricsFormat
from kubetoll_sidecar.replica_load import parse_load
from kubetoll_tools.simulator import Fault, SimulatedUpstream
from kubetoll_tools.simulator_vllm_metrics import SimulatedLoadMetrics
from support.harness import base_config, wait_until
from support.ports import refusing_port
from test_operator_metrics import scrape, value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas():
    async with SimulatedUpstream() as a, SimulatedUpstream() as b:
        yield a, b


def config(sim: SimulatedUpstream, a: SimulatedUpstream, b: SimulatedUpstream, service_port: int) -> dict[str, Any]:
    cfg = base_config(sim.url)
    hosted = cfg["backends"][0]
    hosted["name"] = "hosted"
    cfg["backends"] = [
        {
            "name": "vllm",
            "provider": "openai-compatible",
            "model": "gpt-4o-mini",
            # The Service URL: nothing listens there, so every answer proves a replica was called directly.
            "endpoint": f"http://127.0.0.1:{service_port}/v1",
            "pricing": {"inputPerMTok": 0.05, "outputPerMTok": 0.05},
            "timeouts": {"connect": 1, "firstToken": 2, "total": 5},
            "replicas": [{"url": a.url + "/v1", "name": "vllm-0"}, {"url": b.url + "/v1", "name": "vllm-1"}],
            "loadMetrics": {"format": "vllm", "intervalSeconds": 1, "staleAfterSeconds": 5},
        },
        hosted,
    ]
    cfg["routes"] = [{"name": "chat", "rules": [{"backends": ["vllm", "hosted"]}], "spillover": {"queueDepth": 4}}]
    return cfg


async def chat(sc: Any, **kw: Any) -> Any:
    return await sc.openai().chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], **kw
    )


def served(*sims: SimulatedUpstream) -> list[int]:
    return [len(s.requests) for s in sims]


async def test_traffic_goes_to_the_idle_replica_and_spills_to_hosted_when_all_are_deep(
    sim, replicas, start_sidecar
) -> None:
    a, b = replicas
    clock = Clock()
    with refusing_port() as service_port:
        sc = await start_sidecar(config(sim, a, b, service_port), monotonic=clock)
        loads = sc.sidecar.replica_loads

        # vllm-0 has a queue, vllm-1 none: every request goes to vllm-1.
        a.load_metrics.set(waiting=3, running=8, kv_cache=0.5)
        b.load_metrics.set(waiting=0, running=2, kv_cache=0.1)
        await loads.poll_once()
        for _ in range(4):
            raw = await chat(sc)
            assert raw.headers["x-kubetoll-backend"] == "vllm"
            assert "x-kubetoll-spillover" not in raw.headers
        assert served(a, b, sim) == [0, 4, 0]

        # The load moves: so does the traffic.
        a.load_metrics.set(waiting=0)
        b.load_metrics.set(waiting=6)
        await loads.poll_once()
        for _ in range(3):
            await chat(sc)
        assert served(a, b, sim) == [3, 4, 0]

        # Equal queues: the emptier KV cache wins.
        a.load_metrics.set(waiting=1, kv_cache=0.9)
        b.load_metrics.set(waiting=1, kv_cache=0.2)
        await loads.poll_once()
        await chat(sc)
        assert served(a, b, sim) == [3, 5, 0]

        # Equal in every gauge: taken in turn.
        a.load_metrics.set(waiting=0, kv_cache=0.3)
        b.load_metrics.set(waiting=0, kv_cache=0.3)
        await loads.poll_once()
        for _ in range(4):
            await chat(sc)
        assert served(a, b, sim) == [5, 7, 0]

        # Every queue deeper than queueDepth (4): the request spills to the hosted backend.
        a.load_metrics.set(waiting=9)
        b.load_metrics.set(waiting=5)
        await loads.poll_once()
        raw = await chat(sc)
        assert raw.headers["x-kubetoll-backend"] == "hosted"
        assert raw.headers["x-kubetoll-spillover"] == "vllm"
        assert raw.headers["x-kubetoll-fallbacks"] == "1"
        assert served(a, b, sim) == [5, 7, 1]
        # Streams too: the header comes with the stream's head.
        async with sc.openai().chat.completions.with_streaming_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        ) as resp:
            assert resp.headers["x-kubetoll-spillover"] == "vllm"
            chunks = [c async for c in await resp.parse()]
        assert chunks
        assert served(a, b, sim) == [5, 7, 2]

        records = [r for r in sc.sidecar.ledger.records() if r.outcome == "ok"]
        spilled = [r for r in records if r.spillover]
        assert [(r.backend, r.spillover, r.fallbacks) for r in spilled] == [("hosted", "vllm", 1)] * 2
        assert {r.backend for r in records if not r.spillover} == {"vllm"}

        samples = await scrape(sc.config["server"]["metricsPort"])
        assert value(samples, "kubetoll_spillover_total", route="chat", backend="vllm") == 2
        assert value(samples, "kubetoll_fallbacks_total", route="chat", backend="vllm", reason="spillover") == 2
        assert value(samples, "kubetoll_replica_queue_depth", backend="vllm", replica="vllm-0") == 9
        assert value(samples, "kubetoll_replica_queue_depth", backend="vllm", replica="vllm-1") == 5

        # One replica has room again: back in the cluster.
        b.load_metrics.set(waiting=4)
        await loads.poll_once()
        raw = await chat(sc)
        assert raw.headers["x-kubetoll-backend"] == "vllm" and "x-kubetoll-spillover" not in raw.headers
        assert served(a, b, sim) == [5, 8, 2]


async def test_a_cascade_step_spills_over_like_a_chain(sim, sim2, replicas, start_sidecar) -> None:
    """The cheap step (in-cluster first, a hosted cheap model after it) spills when the GPUs are deep."""
    a, b = replicas
    with refusing_port() as service_port:
        cfg = config(sim, a, b, service_port)
        strong = {**cfg["backends"][1], "name": "strong", "endpoint": sim2.url + "/v1", "model": "gpt-4o"}
        cfg["backends"].append(strong)
        cfg["routes"] = [
            {
                "name": "chat",
                "rules": [{"backends": ["strong"], "cascade": {"steps": [{"backends": ["vllm", "hosted"]}]}}],
                "spillover": {"queueDepth": 4},
            }
        ]
        sc = await start_sidecar(cfg)
        a.load_metrics.set(waiting=9)
        b.load_metrics.set(waiting=7)
        await sc.sidecar.replica_loads.poll_once()
        raw = await chat(sc)
    assert raw.headers["x-kubetoll-cascade"] == "first"  # the first step answered, from its hosted backend
    assert raw.headers["x-kubetoll-backend"] == "hosted"
    assert raw.headers["x-kubetoll-spillover"] == "vllm"
    assert served(a, b, sim, sim2) == [0, 0, 1, 0]
    samples = await scrape(sc.config["server"]["metricsPort"])
    assert value(samples, "kubetoll_spillover_total", route="chat", backend="vllm") == 1


async def test_stale_or_unreachable_metrics_count_as_unknown(sim, replicas, start_sidecar) -> None:
    a, b = replicas
    clock = Clock()
    with refusing_port() as service_port:
        sc = await start_sidecar(config(sim, a, b, service_port), monotonic=clock)
        loads = sc.sidecar.replica_loads
        a.load_metrics.set(waiting=9)
        b.load_metrics.set(waiting=9)
        await loads.poll_once()
        assert (await chat(sc)).headers["x-kubetoll-backend"] == "hosted"

        # vllm-0's page fails from now on; its last read goes stale once the clock passes staleAfterSeconds.
        a.load_metrics.fail = 503
        clock.now += 2
        await loads.poll_once()
        assert (await chat(sc)).headers["x-kubetoll-backend"] == "hosted"  # still fresh: both deep
        clock.now += 4
        await loads.poll_once()
        # Unknown is not deep: no spill-over, and the unknown replica goes before the known deep one.
        raw = await chat(sc)
        assert raw.headers["x-kubetoll-backend"] == "vllm" and "x-kubetoll-spillover" not in raw.headers
        assert served(a, b) == [1, 0]

        # A known replica with room goes before the unknown one.
        b.load_metrics.set(waiting=0)
        await loads.poll_once()
        await chat(sc)
        assert served(a, b) == [1, 1]

        # Both unknown (vllm-1 answers what is not a metrics page): used in turn, never spilled.
        b.load_metrics.format = "tgi"  # a page without vLLM's gauges
        clock.now += 6
        await loads.poll_once()
        for _ in range(2):
            assert (await chat(sc)).headers["x-kubetoll-backend"] == "vllm"
        assert served(a, b) == [2, 2]
        assert len(sim.requests) == 2


async def test_the_last_backend_of_a_chain_never_spills_and_a_spilled_one_is_the_last_resort(
    sim, replicas, start_sidecar
) -> None:
    a, b = replicas
    clock = Clock()
    with refusing_port() as service_port:
        cfg = config(sim, a, b, service_port)
        sc = await start_sidecar(cfg, monotonic=clock)
        loads = sc.sidecar.replica_loads
        a.load_metrics.set(waiting=9)
        b.load_metrics.set(waiting=9)
        await loads.poll_once()
        # The hosted backend fails: the deep queue serves rather than the request failing.
        sim.enqueue_fault(Fault(status=500))
        raw = await chat(sc)
        assert raw.headers["x-kubetoll-backend"] == "vllm"
        assert raw.headers["x-kubetoll-spillover"] == "vllm"
        assert raw.headers["x-kubetoll-fallbacks"] == "2"
        assert served(a, b) == [1, 0] or served(a, b) == [0, 1]

        # A route whose chain is the in-cluster backend alone: nothing to spill to, so no spill-over.
        cfg["routes"].append({"name": "local", "rules": [{"backends": ["vllm"]}], "spillover": {"queueDepth": 4}})
        sc.write_config(cfg)
        await _wait_reloaded(sc, 2)
        raw = await sc.openai().chat.completions.with_raw_response.create(
            model="local", messages=[{"role": "user", "content": "hello"}]
        )
        assert raw.headers["x-kubetoll-backend"] == "vllm" and "x-kubetoll-spillover" not in raw.headers


async def _wait_reloaded(sc: Any, routes: int) -> None:
    await wait_until(lambda: len(sc.sidecar.config.routes) == routes)


def test_the_page_parser_reads_each_format_and_ignores_the_rest() -> None:
    page = SimulatedLoadMetrics(format="vllm")
    page.set(waiting=3, running=7, kv_cache=0.25)
    load = parse_load(page.page(), LoadMetricsFormat.vllm, 5.0)
    assert (load.waiting, load.running, load.kv_cache, load.at) == (3, 7, 0.25, 5.0)
    # Two engines: queues add up, the cache usage is the fullest one's; a longer name is not the gauge.
    text = (
        'vllm:num_requests_waiting{engine="0",model_name="a b"} 2\n'
        'vllm:num_requests_waiting{engine="1",model_name="a b"} 5 1700000000\n'
        "vllm:num_requests_waiting_by_reason 40\n"
        'vllm:kv_cache_usage_perc{engine="0"} 0.4\nvllm:kv_cache_usage_perc{engine="1"} 0.7\n'
        "vllm:num_requests_running NaN\n"
    )
    load = parse_load(text, LoadMetricsFormat.vllm, 0.0)
    assert (load.waiting, load.running, load.kv_cache) == (7, None, 0.7)
    for fmt in ("tgi", "sglang"):
        page = SimulatedLoadMetrics(format=fmt)
        page.set(waiting=4, running=1, kv_cache=0.5)
        assert parse_load(page.page(), LoadMetricsFormat(fmt), 0.0).waiting == 4
    with pytest.raises(ValueError, match="no vllm load gauges"):
        parse_load(SimulatedLoadMetrics(format="tgi").page(), LoadMetricsFormat.vllm, 0.0)
    with pytest.raises(ValueError, match="format"):
        SimulatedLoadMetrics(format="triton")


async def test_a_replica_that_refuses_connections_goes_last_and_the_request_falls_back(
    sim, replicas, start_sidecar
) -> None:
    a, b = replicas
    clock = Clock()
    with refusing_port() as service_port, refusing_port() as dead_port:
        cfg = config(sim, a, b, service_port)
        # vllm-0's pod is gone, the EndpointSlice not updated yet; vllm-1 has no metrics page read yet.
        cfg["backends"][0]["replicas"][0]["url"] = f"http://127.0.0.1:{dead_port}/v1"
        cfg["backends"][0].pop("loadMetrics")
        sc = await start_sidecar(cfg, monotonic=clock)
        backends = []
        for _ in range(4):
            backends.append((await chat(sc)).headers["x-kubetoll-backend"])
        # Taken in turn, the dead one is tried once: that request falls back to hosted; then it goes last.
        assert sorted(backends) == ["hosted", "vllm", "vllm", "vllm"]
        assert len(b.requests) == 3
        clock.now += 6  # its hold is over: tried again (and held again)
        backends = [(await chat(sc)).headers["x-kubetoll-backend"] for _ in range(3)]
        assert sorted(backends) == ["hosted", "vllm", "vllm"]


async def test_a_reload_keeps_the_load_of_the_replicas_it_keeps_and_drops_the_others() -> None:
    from kubetoll_core.router_config import Backend
    from kubetoll_sidecar.metrics import Metrics
    from kubetoll_sidecar.replica_load import ReplicaLoads

    def backend(*names: str) -> Backend:
        return Backend.model_validate(
            {
                "name": "vllm",
                "provider": "openai-compatible",
                "model": "m",
                "endpoint": "http://vllm:8000/v1",
                "replicas": [{"url": f"http://{n}:8000/v1", "name": n} for n in names],
                "loadMetrics": {"format": "vllm"},
            }
        )

    async with SimulatedUpstream() as up:
        clock = Clock()
        metrics = Metrics()
        loads = ReplicaLoads(metrics, clock)
        first = backend("pod-0", "pod-1")
        loads.configure([first])
        for r in loads.replicas("vllm"):
            r.metrics_url = up.url + "/metrics"  # both read from the one simulated page
        up.load_metrics.set(waiting=7)
        await loads.poll_once()
        assert (
            metrics.registry.get_sample_value("kubetoll_replica_queue_depth", {"backend": "vllm", "replica": "pod-1"})
            == 7
        )
        loads.configure([backend("pod-1", "pod-2")])
        kept, new = loads.replicas("vllm")
        assert (kept.name, kept.load is not None, new.name, new.load) == ("pod-1", True, "pod-2", None)
        assert (
            metrics.registry.get_sample_value("kubetoll_replica_queue_depth", {"backend": "vllm", "replica": "pod-0"})
            is None
        )
        loads.configure([])
        assert loads.replicas("vllm") == []
        await loads.close()
