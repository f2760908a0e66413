"""A sidecar loads only what its config needs (docs/performance.md, "Footprint").

One sidecar runs in every application pod, so what it loads at start is paid in
every pod. These tests start real `kubetoll-sidecar` processes (the entry point's
`main`, plus a thread that reports the process's modules and encodings when told)
and check what they loaded, not how long it took: the figures are
bench/footprint.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kubetoll_core.price_catalog import with_catalog_prices
from kubetoll_core.prices import resolve_price
from kubetoll_core.router_config import Backend
from kubetoll_core.usage import Usage
from kubetoll_sidecar import tokens
from support.harness import base_config, in_cluster_llama
from support.ports import PortTaken, candidate_port, is_address_in_use

ROOT = Path(__file__).resolve().parent.parent
SOURCE_PATHS = [str(ROOT / d) for d in ("core", "sidecar", "operator", "tools")]

# The process under test: the sidecar's entry point, and a thread that waits for a
# trigger file, then writes what the process has imported and which encodings it
# holds (a thread of stdlib only: it imports nothing the checks look for).
CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path

    trigger, report = Path(sys.argv[1]), Path(sys.argv[2])

    def report_when_asked():
        while not trigger.exists():
            time.sleep(0.02)
        from kubetoll_sidecar import tokens
        report.write_text(json.dumps({
            "modules": sorted(sys.modules),
            "encodings": tokens.loaded_encodings(),
            "approximate": tokens.approximate_encoding(),
        }))

    threading.Thread(target=report_when_asked, daemon=True).start()
    from kubetoll_sidecar.main import main
    sys.exit(main(sys.argv[3:]))
    """
)

# Loaded only with the feature that needs them (module: what brings it in).
HEAVY = {
    "genai_prices": "a catalogue-priced backend without catalogPrices (the operator always writes them)",
    "kubetoll_core.price_catalog": "the same (the module that reads the catalogue)",
    "jwt": "tenancy.jwt",
    "cryptography": "tenancy.jwt",
    "redis": "budgetStore.url",
    "yaml": "a YAML config file (the operator writes JSON)",
    "numpy": "a semantic cache policy",
    "kubetoll_sidecar.cache.guards.lexicon": "the same (the strict check's word lists, ~2 MiB)",
    "opentelemetry": "telemetry.otlp.endpoint (traces)",
    "google.protobuf": "the same (the OTLP exporter's encoding)",
}


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, directory: Path, config: dict[str, Any]) -> None:
        self.proc, self.directory, self.config = proc, directory, config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['server']['port']}"

    async def loaded(self) -> dict[str, Any]:
        """What the process has imported and the encodings it holds, now."""
        report = self.directory / "report.json"
        (self.directory / "trigger").touch()
        for _ in range(500):
            if report.exists() and report.stat().st_size:
                data: dict[str, Any] = json.loads(report.read_text())
                data["top"] = {m.split(".")[0] for m in data["modules"]}
                return data
            await asyncio.sleep(0.02)
        raise AssertionError("the sidecar process did not report its modules")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def start_process(directory: Path, config: dict[str, Any], name: str = "router.json", **env: str) -> Process:
    """`kubetoll-sidecar --config <file>` in its own process, returned once /readyz says 200."""
    last: Exception | None = None
    for _ in range(5):
        config["server"] = {**config["server"], "port": candidate_port(), "metricsPort": candidate_port()}
        path = directory / name
        path.write_text(json.dumps(config) if name.endswith(".json") else _yaml(config))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(directory / "trigger"),
            str(directory / "report.json"),
            "--config",
            str(path),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(SOURCE_PATHS), **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            await _ready(proc, config)
            return Process(proc, directory, config)
        except PortTaken as exc:
            last = exc
    raise RuntimeError(f"no free ports after 5 attempts: {last}")


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config)


async def _ready(proc: asyncio.subprocess.Process, config: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{config['server']['metricsPort']}/readyz"
    async with aiohttp.ClientSession() as http:
        for _ in range(1200):
            if proc.returncode is not None:
                assert proc.stdout is not None
                output = (await proc.stdout.read()).decode(errors="replace")
                if is_address_in_use(output):
                    raise PortTaken(output)
                raise AssertionError(f"the sidecar exited with {proc.returncode}:\n{output[-3000:]}")
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("the sidecar did not become ready within 60 s")


async def chat(process: Process, tenant: str = "acme") -> tuple[int, Any, dict[str, Any]]:
    """(status, headers, JSON body) of one chat completion through the sidecar."""
    body = {"model": "chat", "messages": [{"role": "user", "content": "Where is my order? It was due on Monday."}]}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{process.url}/v1/chat/completions", json=body, headers={"x-kubetoll-tenant": tenant}) as r,
    ):
        return r.status, r.headers, await r.json()


def compiled(backend: dict[str, Any]) -> dict[str, Any]:
    """A backend as the operator writes it into the RouterConfig: catalogue prices included."""
    return with_catalog_prices(Backend.model_validate(backend)).model_dump(mode="json", by_alias=True)


async def test_a_compiled_one_backend_config_loads_its_encoding_and_nothing_heavy(sim, tmp_path):
    """gpt-4 is counted with cl100k_base: o200k_base (twice the memory) is never loaded, and
    neither is the price catalogue, PyJWT, Redis's client, PyYAML or numpy."""
    config = base_config(sim.url)
    config["backends"][0]["model"] = "gpt-4"
    config["backends"] = [compiled(b) for b in config["backends"]]
    assert "catalogPrices" in config["backends"][0]  # priced from the catalogue, as the operator resolved it
    process = await start_process(tmp_path, config)
    try:
        status, headers, body = await chat(process)
        assert status == 200, body
        # Priced from the compiled catalogue prices: what the catalogue itself says (looked up here).
        usage = Usage(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        catalogue = resolve_price(Backend.model_validate(base_config(sim.url)["backends"][0] | {"model": "gpt-4"}))
        assert float(headers["x-kubetoll-cost-usd"]) == pytest.approx(catalogue.cost(usage), abs=1e-9)
        loaded = await process.loaded()
    finally:
        await process.stop()
    assert list(loaded["encodings"]) == [tokens.CL100K]
    heavy = {m for m in HEAVY if m in loaded["modules"] or m in loaded["top"]}
    assert heavy == set(), {m: HEAVY[m] for m in heavy}


async def test_an_in_cluster_fallback_beside_a_gpt4o_backend_adds_no_encoding(sim, tmp_path):
    """A hosted gpt-4o-mini with an in-cluster Llama (whose tokenizer tiktoken does not ship):
    the Llama route is counted with o200k_base, which the sidecar holds anyway, so
    cl100k_base (+23 MiB) is never loaded, not at start and not by a request to the Llama."""
    config = base_config(sim.url)
    config["backends"][0]["model"] = "gpt-4o-mini"
    config["backends"].append(in_cluster_llama(sim.url))
    config["routes"] = [
        {"name": "chat", "rules": [{"backends": ["primary", "gpu"]}]},
        {"name": "local", "rules": [{"backends": ["gpu"]}]},
    ]
    config["backends"] = [compiled(b) for b in config["backends"]]
    process = await start_process(tmp_path, config)
    try:
        for route in ("local", "chat"):
            body = {"model": route, "messages": [{"role": "user", "content": "Where is my order? Due Monday."}]}
            async with aiohttp.ClientSession() as http, http.post(f"{process.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
        loaded = await process.loaded()
    finally:
        await process.stop()
    assert list(loaded["encodings"]) == [tokens.O200K]
    assert loaded["approximate"] == tokens.O200K


async def test_each_heavy_library_loads_with_its_feature(sim, tmp_path, redis_url):
    """The check above can fail: a hand-written YAML config (no catalogPrices) with
    tenancy.jwt, a Redis budget store and traces loads the catalogue, PyJWT, Redis, PyYAML and OpenTelemetry."""
    config = base_config(
        sim.url,
        tenancy={"jwt": {"algorithms": ["HS256"], "hs256SecretEnv": "KT_TEST_JWT_SECRET"}},
        budgetStore={"url": redis_url},
        # Traces on: the exporter runs in the background, so a collector that is not there does not matter.
        telemetry={"otlp": {"endpoint": "http://127.0.0.1:9"}},
    )
    process = await start_process(
        tmp_path, config, name="router.yaml", KT_TEST_JWT_SECRET="a-secret-of-at-least-32-bytes-for-hs256"
    )
    try:
        loaded = await process.loaded()
    finally:
        await process.stop()
    assert list(loaded["encodings"]) == [tokens.O200K]  # gpt-4o: o200k_base alone
    for module in ("genai_prices", "jwt", "cryptography", "redis", "yaml", "opentelemetry", "google.protobuf"):
        assert module in loaded["top"] or module in loaded["modules"], module
    assert "numpy" not in loaded["top"]  # no semantic cache here either


# --------------------------------------------------------------------------- the encodings' baked form


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("baked")
    written = tokens.bake_encodings(directory)
    assert sorted(p.name for p in written) == sorted(n + tokens.BAKED_SUFFIX for n in (tokens.O200K, tokens.CL100K))
    return directory


def run_python(code: str, **env: str) -> Any:
    """`code` in a fresh interpreter (the module caches its encodings), its stdout as JSON."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(SOURCE_PATHS), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", [tokens.O200K, tokens.CL100K])
def test_a_baked_encoding_is_tiktokens_encoding(baked, name):
    """Read from its baked form, an encoding has tiktoken's every token, special token and
    pattern, and counts as tiktoken does: the estimate stays exact."""
    code = textwrap.dedent(
        f"""
        import json, tiktoken
        from tiktoken_ext.openai_public import ENCODING_CONSTRUCTORS
        from kubetoll_sidecar import tokens
        enc = tokens.get_encoding({name!r})
        ref = tiktoken.Encoding(**ENCODING_CONSTRUCTORS[{name!r}]())
        tables = len(enc.token_byte_values()) == len(ref._mergeable_ranks) and all(
            enc.decode_single_token_bytes(rank) == token and enc.encode_single_token(token) == rank
            for token, rank in ref._mergeable_ranks.items()
        )
        texts = [
            "Where is my order? It was due on Monday.",
            "def f(x):\\n    return x ** 2  # squared\\n\\n\\n",
            "Ünïcödé, 日本語のテキスト, emoji 🚀🚀, tabs\\tand   spaces   ",
            "1234567890 3.14159 -42 0x1F 1e-9",
            "<|endoftext|> is text here, not a special token",
        ]
        print(json.dumps({{
            "source": tokens.loaded_encodings()[{name!r}],
            "tables": tables,
            "specials": enc._special_tokens == ref._special_tokens,
            "pattern": enc._pat_str == ref._pat_str,
            "counts": [len(enc.encode_ordinary(t)) == len(ref.encode_ordinary(t)) for t in texts],
            "kept_ranks": len(enc._mergeable_ranks),
        }}))
        """
    )
    got = run_python(code, KUBETOLL_BAKED_ENCODINGS=str(baked))
    assert got["source"] == str(baked / (name + tokens.BAKED_SUFFIX))
    assert got["tables"] and got["specials"] and got["pattern"]
    assert all(got["counts"])
    assert got["kept_ranks"] == 0  # the Python copy of the ranks is dropped: only the Rust tables stay


def test_without_a_baked_form_the_published_file_is_read(tmp_path):
    got = run_python(
        "import json; from kubetoll_sidecar import tokens; tokens.get_encoding('cl100k_base');"
        "print(json.dumps(tokens.loaded_encodings()))",
        KUBETOLL_BAKED_ENCODINGS=str(tmp_path),  # nothing baked there
    )
    assert got == {
        tokens.CL100K: str(ROOT / "sidecar/kubetoll_sidecar/tiktoken_cache/9b5ad71b2ce5302211f9c61530b329a4922fc6a4")
    }


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "damaged"),
        (lambda data: data.replace(b"223921b76ee99bde", b"000000000000000f", 1), "another file"),
        (lambda data: b"something else\n" + data, "not a baked encoding"),
        (lambda data: data.replace(b'"tokens":', b'"tokenz":', 1), "header does not read"),
        (lambda data: data[:10], "not a baked encoding"),
    ],
)
def test_a_damaged_baked_file_is_refused_with_a_clear_error(baked, tmp_path, damage, message):
    name = tokens.CL100K + tokens.BAKED_SUFFIX
    (tmp_path / name).write_bytes(damage((baked / name).read_bytes()))
    got = run_python(
        "import json; from kubetoll_sidecar import tokens\n"
        "try:\n    tokens.get_encoding('cl100k_base')\nexcept RuntimeError as exc:\n    print(json.dumps(str(exc)))",
        KUBETOLL_BAKED_ENCODINGS=str(tmp_path),
    )
    assert message in got and "cl100k_base" in got


# --------------------------------------------------------------------------- prices without the catalogue


def test_the_compiled_config_prices_every_backend_without_the_catalogue(tmp_path):
    """The operator writes catalogue prices into the RouterConfig; read where no catalogue can
    be imported, the config prices every backend, standard and batch, exactly as the catalogue does."""
    from kubetoll_core.prices import resolve_batch_price
    from kubetoll_operator.compiler import compile_namespace

    def backend(name: str, **spec: Any) -> dict[str, Any]:
        spec = {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "endpoint": "https://api.example.com/v1",
            "credentials": {"secretRef": {"name": "keys", "key": "api-key"}},
            **spec,
        }
        return {"apiVersion": "kubetoll.dev/v1alpha1", "kind": "ModelBackend", "metadata": {"name": name}, "spec": spec}

    objects = [
        backend("mini"),
        backend("sonnet", provider="anthropic", model="claude-sonnet-4-5"),  # tiered prices over 200k tokens
        backend("embed", model="text-embedding-3-small"),  # input only
        backend(
            "compat", provider="openai-compatible", pricing={"catalogProvider": "openai", "catalogModel": "gpt-4o"}
        ),
        backend("explicit", pricing={"inputPerMTok": 1, "outputPerMTok": 2}),
    ]
    result = compile_namespace("team-a", objects)
    assert result.problems == []
    config = json.loads(result.config_json)
    backends = {b["name"]: b for b in config["backends"]}
    assert {n for n, b in backends.items() if "catalogPrices" in b} == {"mini", "sonnet", "embed", "compat"}
    assert backends["sonnet"]["catalogPrices"]["standard"]["input"]["tiers"]  # the cliff is carried

    def priced(b: Backend) -> list[Any]:
        usage = Usage(250_000, 1_000, cached_tokens=10_000)
        return [(p.source, p.base, p.tiers, p.cost(usage)) for p in (resolve_price(b), resolve_batch_price(b))]

    # What the catalogue itself says, looked up here from the backends as written (no catalogPrices).
    expected = {
        name: priced(Backend.model_validate({k: v for k, v in b.items() if k != "catalogPrices"}))
        for name, b in backends.items()
    }
    path = tmp_path / "router.json"
    path.write_text(result.config_json)
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["genai_prices"] = None  # the sidecar image: importing the catalogue fails
        from kubetoll_core.prices import resolve_batch_price, resolve_price
        from kubetoll_core.usage import Usage
        from kubetoll_sidecar.config_loader import load_config
        usage = Usage(250_000, 1_000, cached_tokens=10_000)
        out = {{}}
        for b in load_config({str(path)!r}).config.backends:
            out[b.name] = [
                (p.source, [p.base.input, p.base.output, p.base.cached_input, p.base.cache_write],
                 [[s, [r.input, r.output, r.cached_input, r.cache_write]] for s, r in p.tiers], p.cost(usage))
                for p in (resolve_price(b), resolve_batch_price(b))
            ]
        print(json.dumps({{"prices": out, "catalogue_loaded": "kubetoll_core.price_catalog" in sys.modules}}))
        """
    )
    got = run_python(code)
    assert got["catalogue_loaded"] is False
    for name, want in expected.items():
        assert got["prices"][name] == [
            [source, [base.input, base.output, base.cached_input, base.cache_write],
             [[s, [r.input, r.output, r.cached_input, r.cache_write]] for s, r in tiers], cost]
            for source, base, tiers, cost in want
        ], name  # fmt: skip
