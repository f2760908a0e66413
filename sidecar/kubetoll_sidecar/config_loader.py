"""Reading RouterConfig from disk and noticing when it changes.

A ConfigMap mounted as a volume is updated by the kubelet with a symlink swap
(`router.json -> ..data/router.json`, `..data -> ..2026_11_22_...`), so the
file's own path never changes; its target does. The watcher polls (every 0.25 s:
cheap, and works on every filesystem, unlike inotify through symlinks) the
resolved path, inode, size and mtime, and reloads when any of them moves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from kubetoll_core.router_config import RouterConfig

log = logging.getLogger("kubetoll.config")


class ConfigError(Exception):
    """A config that cannot be used. The message says which file and why."""


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: RouterConfig
    path: str
    digest: str  # sha256 of the file's bytes


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:20]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - len(lines)
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)


def _syntax_error(exc: Exception) -> str:
    """Where and what, never the offending text: a config line may hold a secret someone pasted."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        return f"{exc.problem or exc.context or 'syntax error'} at {where}"
    if isinstance(exc, yaml.YAMLError):
        return "syntax error"
    return type(exc).__name__


def _yaml(raw: bytes, source: str) -> object:
    # Imported here: the operator writes JSON, so a sidecar in a pod never loads PyYAML (~25 ms, ~1 MB).
    import yaml

    try:
        return yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{source}: not valid JSON or YAML: {_syntax_error(exc)}") from None


def parse_config(raw: bytes, source: str) -> RouterConfig:
    data: object
    if source.endswith((".yaml", ".yml")):
        data = _yaml(raw, source)
    else:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = _yaml(raw, source)  # YAML is a superset of JSON: one more chance
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON/YAML object at the top level")
    version = data.get("version", 1)
    if version != 1:
        raise ConfigError(f"{source}: config version {version!r} is not supported by this sidecar (supports 1)")
    try:
        return RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"{source}: invalid RouterConfig: {format_validation_error(exc)}{_skew_hint(data, exc)}"
        ) from None


def _skew_hint(data: dict[str, Any], exc: ValidationError) -> str:
    """A config the operator wrote (it has a `revision`) refused only for fields this sidecar does not know:
    the operator is newer than this sidecar, which keeps its last good config until the pod is recreated."""
    errors = exc.errors()
    if not data.get("revision") or not errors or any(e["type"] != "extra_forbidden" for e in errors):
        return ""
    return (
        " (the operator wrote fields this sidecar version does not know: it is newer than this pod's "
        "sidecar, which keeps serving its last good config; recreate the pod, e.g. `kubectl rollout "
        "restart`, to get the sidecar the operator injects now)"
    )


def load_config(path: str) -> LoadedConfig:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return LoadedConfig(parse_config(raw, path), path, hashlib.sha256(raw).hexdigest())


def _fingerprint(path: str) -> tuple | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        return (real, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return None


class ConfigWatcher:
    """Polls a config file and calls `on_change` with a LoadedConfig or a ConfigError."""

    def __init__(
        self,
        path: str,
        on_change: Callable[[LoadedConfig | ConfigError], Awaitable[None]],
        interval: float = 0.25,
        initial_digest: str = "",
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self._fp = _fingerprint(path)
        self._digest = initial_digest
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kubetoll-config-watcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the watcher must outlive any bug: the next change still applies
                self._digest = ""
                log.error("config watcher: reloading %s failed (%s); watching on", self.path, type(exc).__name__)

    async def _check(self) -> None:
        fp = _fingerprint(self.path)
        if fp == self._fp:
            return
        self._fp = fp
        try:
            # Off the event loop: a namespace of thousands of routes takes a while to validate.
            loaded = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            self._digest = ""  # so that restoring the last good content applies (and clears the refusal)
            await self.on_change(exc)
            return
        if loaded.digest == self._digest:
            return  # touched, same content
        self._digest = loaded.digest
        await self.on_change(loaded)
