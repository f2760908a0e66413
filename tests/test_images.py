"""The container images, without Docker.

No Docker engine runs here, so the images are checked in the parts that can be:
the Dockerfiles' shape (multi-stage, slim runtime, numeric non-root user, the
offline encodings check, entrypoints), that everything they COPY exists and gets
past .dockerignore, and what the builder stage does: the wheel is built from a
copy of the Docker build context (once per test session), installed into a fresh
venv, and run from there with no network and TIKTOKEN_CACHE_DIR unset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.ports import PortTaken, candidate_port, is_address_in_use, start_on_free_port

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = {
    "fb374d419588a4632f3f557e76b4b70aebbca790": "o200k_base",
    "9b5ad71b2ce5302211f9c61530b329a4922fc6a4": "cl100k_base",
}
IMAGES = {"sidecar": "Dockerfile.sidecar", "operator": "Dockerfile.operator"}
PACKAGE_DIRS = ("core", "sidecar", "operator", "tools")
# What each image runs, and what it must not carry (docs/install.md, "Images").
KEEPS = {"sidecar": ("kubetoll_core", "kubetoll_sidecar"), "operator": ("kubetoll_core", "kubetoll_operator")}
MUST_NOT_IMPORT = {
    "sidecar": ("kubetoll_operator", "kubetoll_tools", "kopf", "rich"),
    "operator": ("kubetoll_sidecar", "kubetoll_tools", "tiktoken", "numpy", "rich"),
}


# --------------------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _glob_regex(pattern: str) -> str:
    """Go's filepath.Match plus Docker's `**` (any number of folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parent folders) decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            verdict = not negate
    return verdict


def build_context(dest: Path) -> Path:
    """A copy of what `docker build .` sends, by .dockerignore."""
    patterns = dockerignore_patterns()
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".git/", ".venv/")) or rel in (".git", ".venv") or not path.is_file():
            continue
        if ignored(rel, patterns):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


@pytest.mark.parametrize("which", list(IMAGES))
def test_dockerfile_shape(which: str) -> None:
    steps = instructions(ROOT / IMAGES[which])
    args = {k: v for k, v in (a.split("=", 1) for kw, a in steps if kw == "ARG" and "=" in a)}
    froms = [a for kw, a in steps if kw == "FROM"]
    assert len(froms) == 2, "multi-stage: a builder and a runtime"
    for f in froms:
        image = f.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        assert image == "python:3.11-slim", f
    assert froms[0].endswith("AS builder") and froms[1].endswith("AS runtime")

    runtime = steps[[i for i, (kw, _) in enumerate(steps) if kw == "FROM"][1] :]
    builder = steps[: [i for i, (kw, _) in enumerate(steps) if kw == "FROM"][1]]
    build_runs = " ".join(a for kw, a in builder if kw == "RUN")
    assert "pip wheel --no-deps --wheel-dir /dist ." in build_runs
    # The sidecar image also carries the `traces` extra (OpenTelemetry, loaded only with telemetry.otlp).
    extras = {"sidecar": "sidecar,traces"}.get(which, which)
    assert f'pip install "$(ls /dist/kubetoll-*.whl)[{extras}]"' in build_runs
    assert prune_step(which), "the builder removes the packages this image does not run"

    if which == "sidecar":  # roots from the hashed directory, on demand (tests/test_upstream_tls.py)
        env_lines = " ".join(a for kw, a in runtime if kw == "ENV")
        assert "SSL_CERT_DIR=/etc/ssl/certs" in env_lines and "SSL_CERT_FILE=/dev/null" in env_lines
    users = [a for kw, a in runtime if kw == "USER"]
    assert users == ["10001:10001"], "a numeric, non-root user (runAsNonRoot can check it)"
    assert ("COPY", "--from=builder /opt/kubetoll /opt/kubetoll") in runtime
    checks = [a for kw, a in runtime if kw == "RUN" and a.startswith("--network=none [") and "--help" not in a]
    assert len(checks) == 1, "one offline import check at build time"
    argv = json.loads(checks[0].removeprefix("--network=none "))
    if which == "sidecar":
        assert argv[:3] == ["/usr/bin/env", "-u", "TIKTOKEN_CACHE_DIR"]
        argv = argv[3:]
    # The RUN step's check, run here the same way (the project's packages, no cache dir set).
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"} | {
        "PYTHONPATH": ":".join(str(ROOT / d) for d in PACKAGE_DIRS)
    }
    result = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (
        "tiktoken encodings load offline from" if which == "sidecar" else "operator imports offline"
    ) in result.stdout

    entrypoint = [json.loads(a) for kw, a in runtime if kw == "ENTRYPOINT"]
    assert entrypoint == [[f"kubetoll-{which}"]]
    if which == "sidecar":
        assert [json.loads(a) for kw, a in runtime if kw == "CMD"] == [["--config", "/etc/kubetoll/router/router.json"]]
    assert [a for kw, a in runtime if kw == "RUN" and "--help" in a] == [
        f'--network=none ["kubetoll-{which}", "--help"]'
    ]


def prune_step(which: str) -> str:
    """The builder's RUN step that removes the project's packages this image does not run."""
    steps = [a for kw, a in instructions(ROOT / IMAGES[which]) if kw == "RUN" and "shutil.rmtree" in a]
    assert len(steps) == 1, steps
    return steps[0]


@pytest.mark.parametrize("which", list(IMAGES))
def test_everything_copied_exists_and_is_in_the_context(which: str) -> None:
    patterns = dockerignore_patterns()
    copies = [a for kw, a in instructions(ROOT / IMAGES[which]) if kw == "COPY" and not a.startswith("--from=")]
    assert copies
    for copy in copies:
        *sources, _dest = copy.split()
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"{IMAGES[which]}: COPY {src}: no such file in the repository"
            assert not ignored(src, patterns), f"{IMAGES[which]}: COPY {src}: excluded by .dockerignore"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files and not any(ignored(p.relative_to(ROOT).as_posix(), patterns) for p in files), src
    for d in PACKAGE_DIRS:
        assert any(src.rstrip("/") == d for copy in copies for src in copy.split()[:-1]), f"COPY {d}/ missing"
    # The encodings must reach the build too.
    for name in ENCODINGS:
        assert not ignored(f"sidecar/kubetoll_sidecar/tiktoken_cache/{name}", patterns)
    # What the context leaves out.
    for rel in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_images.py",
        "bench/README.md",
        "charts/kubetoll/Chart.yaml",
        "sidecar/kubetoll_sidecar/__pycache__/x.pyc",
    ):
        assert ignored(rel, patterns), rel


# --------------------------------------------------------------------------- the wheel, built once


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    context = build_context(tmp_path_factory.mktemp("docker-context"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list(out.glob("kubetoll-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _site_packages(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="session", params=list(IMAGES))
def image_venv(
    request: pytest.FixtureRequest, wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """A new venv built as the image's builder stage builds /opt/kubetoll, prune step included.

    The wheel goes in with --no-deps; its dependencies come from the test venv
    (installing them from PyPI would make the test slow and networked), reached
    through a .pth line that adds the test venv's site-packages *after* the fresh
    venv's own, without running its .pth files (so an editable install of the
    project there cannot shadow the wheel).
    """
    which = request.param
    venv = tmp_path_factory.mktemp(f"image-{which}") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # The Dockerfile's own prune step, with /opt/kubetoll pointing at this venv.
    prune = prune_step(which).replace("/opt/kubetoll", str(venv))
    result = subprocess.run(["bash", "-c", prune], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    Path(_site_packages(python), "zz_test_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    return which, venv


def offline_env() -> dict[str, str]:
    """No TIKTOKEN_CACHE_DIR, no project sources on the path, and any HTTP(S) download goes to a closed port."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    closed = "http://127.0.0.1:9"
    return env | {
        "HTTP_PROXY": closed,
        "HTTPS_PROXY": closed,
        "http_proxy": closed,
        "https_proxy": closed,
        "NO_PROXY": "",
        "no_proxy": "",
    }


def run_in(venv: Path, *argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        cwd=cwd,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        metadata = next(z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    for name in ENCODINGS:
        assert f"kubetoll_sidecar/tiktoken_cache/{name}" in names
    for module in (
        "kubetoll_core/router_config.py",
        "kubetoll_sidecar/server.py",
        "kubetoll_sidecar/main.py",
        "kubetoll_operator/handlers.py",
        "kubetoll_operator/main.py",
        "kubetoll_operator/ledger_sink/main.py",
        "kubetoll_operator/ledger_sink/migrations/0001_spend_records.sql",
        "kubetoll_tools/cli.py",
        "kubetoll_tools/simulator.py",
        "kubetoll_tools/demo_router.yaml",
    ):
        assert module in names
    for script in ("kubetoll = kubetoll_tools.cli:main", "kubetoll-sidecar = kubetoll_sidecar.main:main",
                   "kubetoll-operator = kubetoll_operator.main:main",
                   "kubetoll-ledger-sink = kubetoll_operator.ledger_sink.main:main"):  # fmt: skip
        assert script in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    sidecar_deps = " ".join(r for r in requires if 'extra == "sidecar"' in r)
    operator_deps = " ".join(r for r in requires if 'extra == "operator"' in r)
    assert "tiktoken" in sidecar_deps and "kopf" not in sidecar_deps
    assert "kopf" in operator_deps and "tiktoken" not in operator_deps and "numpy" not in operator_deps
    assert not any(n.startswith(("tests/", "charts/", "bench/")) for n in names)


def test_image_holds_only_its_packages(image_venv: tuple[str, Path], tmp_path: Path) -> None:
    which, venv = image_venv
    site = Path(_site_packages(venv / "bin" / "python"))
    ours = {p.name for p in site.iterdir() if p.name.startswith("kubetoll_")}
    assert ours == set(KEEPS[which])
    scripts = {p.name for p in (venv / "bin").iterdir() if p.name.startswith("kubetoll")}
    # The operator image also runs the PostgreSQL ledger sink (its second container in the chart).
    assert scripts == ({"kubetoll-operator", "kubetoll-ledger-sink"} if which == "operator" else {"kubetoll-sidecar"})
    # Importing everything the image runs pulls in nothing the image must not carry.
    entry = (
        "kubetoll_sidecar.server, kubetoll_sidecar.main"
        if which == "sidecar"
        else "kubetoll_operator.handlers, kubetoll_operator.main"
    )
    probe = (
        f"import json, sys, {entry}\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({list(MUST_NOT_IMPORT[which])!r}))\n"
        "print(json.dumps(bad))\n"
    )
    out = run_in(venv, "python", "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_image_entry_point_runs_offline(image_venv: tuple[str, Path], tmp_path: Path) -> None:
    which, venv = image_venv
    out = run_in(venv, f"kubetoll-{which}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    flags = (
        ("--config", "--wait-for-config")
        if which == "sidecar"
        else ("--peering", "--webhook", "--webhook-cert-dir", "--native-sidecars", "--sidecar-image")
    )
    for flag in flags:
        assert flag in out.stdout
    if which != "sidecar":
        return
    probe = (
        "import json, os, kubetoll_sidecar\n"
        "assert 'TIKTOKEN_CACHE_DIR' not in os.environ\n"
        "from kubetoll_sidecar import tokens\n"
        "sizes = {n: len(tokens.get_encoding(n).encode('Where is my order? It was due on Monday.')) for n in (tokens.O200K, tokens.CL100K)}\n"
        "print(json.dumps({'package': kubetoll_sidecar.__file__, 'cache': os.environ['TIKTOKEN_CACHE_DIR'], 'sizes': sizes}))\n"
    )
    out = run_in(venv, "python", "-c", probe, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    site = _site_packages(venv / "bin" / "python")
    assert info["package"].startswith(site), "imported from somewhere other than the installed wheel"
    assert info["cache"] == str(Path(site) / "kubetoll_sidecar" / "tiktoken_cache")
    assert all(n > 5 for n in info["sizes"].values())


def test_cli_wheel_runs_offline(wheel: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """`pip install kubetoll[cli]`: the `kubetoll` command with every group of sub-commands."""
    venv = tmp_path_factory.mktemp("cli") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    Path(_site_packages(python), "zz_test_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    out = run_in(venv, "kubetoll", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "unavailable command groups" not in out.stdout
    for command in ("sidecar", "operator", "crds", "validate", "run", "demo", "report", "simulate-upstream"):
        assert command in out.stdout


SERVING = "kubetoll sidecar serving the OpenAI API"


def _start_sidecar(venv: Path, tmp_path: Path, port: int, metrics_port: int) -> subprocess.Popen[str]:
    """The installed `kubetoll-sidecar` on the given ports, returned once its log says it serves.

    `PortTaken` when it could not listen because a port was taken (then it is started on others).
    """
    env = offline_env() | {"SIM_OPENAI_KEY": "sk-test", "SIM_ANTHROPIC_KEY": "sk-test"}
    proc = subprocess.Popen(
        [
            str(venv / "bin" / "kubetoll-sidecar"),
            "--config",
            str(ROOT / "examples" / "sidecar" / "router.yaml"),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:  # the log line is written once both ports listen
        seen.append(line)
        if SERVING in line:
            return proc
    proc.wait(10)
    output = "".join(seen)
    if is_address_in_use(output):
        raise PortTaken(output)
    raise AssertionError(f"kubetoll-sidecar exited with {proc.returncode} before serving:\n{output}")


@pytest.fixture
def sidecar_process(image_venv: tuple[str, Path], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    _, venv = image_venv
    ports: list[int] = []

    def start(port: int) -> subprocess.Popen[str]:
        ports[:] = [port, candidate_port()]
        return _start_sidecar(venv, tmp_path, *ports)

    proc = start_on_free_port(start)
    try:
        yield proc, ports[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("image_venv", ["sidecar"], indirect=True)
def test_installed_sidecar_starts_and_stops(sidecar_process: tuple[subprocess.Popen[str], int]) -> None:
    """The image's command, from the installed wheel: serving, ready on the probe port, exit 0 on SIGTERM."""
    proc, metrics_port = sidecar_process
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{metrics_port}/readyz", timeout=10) as resp:
        ready: dict[str, Any] = json.loads(resp.read())
    assert ready["ready"] is True and ready["routes"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
