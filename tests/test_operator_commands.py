"""`kubetoll crds / validate / compile` and the file watching of `kubetoll run`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path

import pytest

from kubetoll_core.router_config import RouterConfig
from kubetoll_tools.cli import main
from kubetoll_tools.operator_commands import LocalRunner
from support.log_events import log_events

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [str(p) for p in sorted((ROOT / "examples").glob("*.yaml"))]


def test_crds_check_passes_on_the_committed_files() -> None:
    assert main(["crds", "--check", "--out", str(ROOT / "crds")]) == 0


def test_validate_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *sum((["-f", p] for p in EXAMPLES), [])]) == 0
    out, err = capsys.readouterr()
    assert "0 errors" in out and "0 warnings" in out


def test_validate_names_file_document_kind_field_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n"
        "apiVersion: kubetoll.dev/v1alpha1\nkind: ModelBackend\nmetadata: {name: b}\n"
        "spec: {provider: openai, model: m, endpoint: 'https://x/v1', serviceRef: {name: svc, port: 80}, credentials: {secretRef: {name: s, key: k}}}\n"
    )
    (tmp_path / "broken.yaml").write_text("kind: [\n")
    assert main(["validate", "-f", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}#1: error: ModelBackend/b spec: set exactly one of endpoint or serviceRef (InvalidSpec)" in err
    assert "broken.yaml: not valid YAML" in err


def test_compile_prints_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--namespace", "team-a", "--canonical", *sum((["-f", p] for p in EXAMPLES), [])]) == 0
    out, err = capsys.readouterr()
    text = out.strip()
    config = RouterConfig.model_validate_json(text)
    assert config.namespace == "team-a" and [r.name for r in config.routes] == ["chat"]
    assert f"config hash {hashlib.sha256(text.encode()).hexdigest()}" in err


def test_local_runner_recompiles_on_change_and_keeps_the_last_good_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetoll.run")
    src = tmp_path / "manifests"
    shutil.copytree(ROOT / "examples", src, ignore=shutil.ignore_patterns("sidecar", "*.md"))
    monkeypatch.delenv("KUBETOLL_SECRET_OPENAI_CREDENTIALS_API_KEY", raising=False)
    monkeypatch.setenv("KUBETOLL_SECRET_ANTHROPIC_CREDENTIALS_API_KEY", "from-env")
    runner = LocalRunner([str(src)], "default", tmp_path / "router.json", redis_url="redis://127.0.0.1:6379/0")
    result, messages = runner.compile()
    assert result is not None and runner.apply(result)
    config = json.loads((tmp_path / "router.json").read_text())
    assert config["budgetStore"]["url"] == "redis://127.0.0.1:6379/0"
    creds = {b["name"]: b.get("credentials") for b in config["backends"]}
    assert creds["gpt-4o"] == {"env": "KUBETOLL_SECRET_OPENAI_CREDENTIALS_API_KEY"}
    import os

    assert os.environ["KUBETOLL_SECRET_OPENAI_CREDENTIALS_API_KEY"] == "sk-REPLACE-ME"  # from the Secret manifest
    assert os.environ["KUBETOLL_SECRET_ANTHROPIC_CREDENTIALS_API_KEY"] == "from-env"  # the environment wins

    router = tmp_path / "router.json"
    with log_events("kubetoll.run") as events:
        stop = threading.Event()
        watcher = threading.Thread(target=runner.watch, args=(stop,), daemon=True)
        watcher.start()
        try:
            route = src / "20-route.yaml"
            route.write_text(route.read_text().replace("modelName: chat ", "modelName: chat-v2 "))
            # Every recompile ends with one "manifests changed: ..." line; wait for it, then look.
            events.wait_for("manifests changed: config")
            names = {r["name"] for r in json.loads(router.read_text())["routes"]}
            assert "chat-v2" in names and "chat" not in names
            good = router.read_text()
            # A regex typo in the route: the route keeps its last good version, so the file is unchanged.
            route.write_text(route.read_text().replace('regex: "^(platform|data)$"', 'regex: "^(platform|data$"'))
            events.wait_for("what did not compile keeps its last good version")
            assert events.wait_for("manifests changed: config").startswith("manifests changed: config unchanged")
            assert "spec.rules[2].match.header.regex" in caplog.text
            assert router.read_text() == good
            # Losing every backend of one rule skips that rule only.
            route.write_text(
                route.read_text()
                .replace('regex: "^(platform|data$"', 'regex: "^(platform|data)$"')
                .replace("backends: [llama-vllm, gpt-4o-mini]\n  fallbackOn", "backends: [nope]\n  fallbackOn")
            )
            events.wait_for("RuleSkipped")
            assert " written to " in events.wait_for("manifests changed: config")
            assert router.read_text() != good
            chat = next(r for r in json.loads(router.read_text())["routes"] if r["name"] == "chat-v2")
            assert [r["name"] for r in chat["rules"]] == ["long-context", "premium", "internal"]
        finally:
            stop.set()
            watcher.join(5)
