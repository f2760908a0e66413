"""A simulated inference server's Prometheus `/metrics`: the load gauges of vLLM, TGI or SGLang, set by the test.

`SimulatedUpstream.load_metrics` (one per simulated server) answers `GET /metrics` in
the Prometheus text format with the gauges the sidecar's load-aware choice reads
(`kubetoll_sidecar.replica_load`), plus a histogram and a counter of the kind a real
server's page is full of, so the reader is tested against a page that is not only
its own gauges:

* `vllm` (the default): `vllm:num_requests_waiting`, `vllm:num_requests_running`,
  `vllm:gpu_cache_usage_perc`, each labelled `model_name` as vLLM labels them;
* `tgi`: `tgi_queue_size`, `tgi_batch_current_size`;
* `sglang`: `sglang:num_queue_reqs`, `sglang:num_running_reqs`, `sglang:token_usage`.

A test sets the load with `set(waiting=..., running=..., kv_cache=...)`, and makes the
page fail with `fail` (an HTTP status to answer with; 0: answer normally) or hang with
`hang` (seconds before answering). `scrapes` counts the reads. Nothing here moves by
itself: the load is what the test last set.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

FORMATS = ("vllm", "tgi", "sglang")


class SimulatedLoadMetrics:
    """The `/metrics` page of one simulated replica."""

    def __init__(self, model: str = "m", format: str = "vllm") -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
        self.model = model
        self.format = format
        self.waiting = 0
        self.running = 0
        self.kv_cache = 0.0
        self.fail = 0
        self.hang = 0.0
        self.scrapes = 0

    def set(self, *, waiting: int | None = None, running: int | None = None, kv_cache: float | None = None) -> None:
        if waiting is not None:
            self.waiting = waiting
        if running is not None:
            self.running = running
        if kv_cache is not None:
            self.kv_cache = kv_cache

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self._metrics)

    def page(self) -> str:
        m = f'model_name="{self.model}"'
        gauges: list[tuple[str, str, float]]
        if self.format == "tgi":
            gauges = [("tgi_queue_size", "", self.waiting), ("tgi_batch_current_size", "", self.running)]
        elif self.format == "sglang":
            gauges = [
                ("sglang:num_queue_reqs", m, self.waiting),
                ("sglang:num_running_reqs", m, self.running),
                ("sglang:token_usage", m, self.kv_cache),
            ]
        else:
            gauges = [
                ("vllm:num_requests_waiting", m, self.waiting),
                ("vllm:num_requests_running", m, self.running),
                ("vllm:gpu_cache_usage_perc", m, self.kv_cache),
            ]
        lines = [
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.",
            "# TYPE process_cpu_seconds_total counter",
            "process_cpu_seconds_total 12.5",
            "# TYPE request_latency_seconds histogram",
            f'request_latency_seconds_bucket{{{m},le="0.5"}} 3',
            f'request_latency_seconds_bucket{{{m},le="+Inf"}} 4',
            f"request_latency_seconds_sum{{{m}}} 1.5",
            f"request_latency_seconds_count{{{m}}} 4",
        ]
        for name, labels, value in gauges:
            lines += [f"# HELP {name} simulated", f"# TYPE {name} gauge"]
            lines.append(f"{name}{{{labels}}} {float(value)}" if labels else f"{name} {float(value)}")
        return "\n".join(lines) + "\n"

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        if self.hang:
            await asyncio.sleep(self.hang)
        if self.fail:
            return web.Response(status=self.fail, text="unavailable\n")
        return web.Response(text=self.page(), content_type="text/plain", charset="utf-8")
