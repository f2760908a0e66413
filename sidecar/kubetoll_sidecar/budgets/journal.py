"""What the Redis store keeps on local disk, so a restart loses neither spend nor the allowance it used.

Two kinds of file in `server.stateDir` (in a pod, an emptyDir: it survives the
sidecar container's restarts, not the pod's deletion):

- `journal-<sidecar id>.json`: spend this process settled that Redis has not
  confirmed, as the numbered flush batches the store will send
  (`SpendBuffer.unwritten`). Written while Redis is away (at most once per
  `JOURNAL_INTERVAL`) and at shutdown; removed once Redis confirmed
  everything. The next process of the pod replays every journal but its own,
  batch by batch, under the writer's sidecar id: Redis remembers each
  sidecar's last applied batch, so a batch the writer did get through is not
  counted twice, and a later batch of the writer always holds at least what
  the journal's batch of the same number holds.
- `allowance.json`: the failOpen allowance used per meter (and when the
  outage began), so a crash-looping pod does not take a fresh allowance on
  every start.

Each file is written whole under a temporary name, then renamed: a reader never
sees half of one. A file that cannot be read is renamed `*.bad` with a warning,
never replayed in part. This module only reads and writes; the store decides.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("kubetoll.budgets.redis")

JOURNAL_VERSION = 1
JOURNAL_INTERVAL = 1.0  # seconds between journal writes while Redis is away
_JOURNAL_PREFIX = "journal-"
_ALLOWANCE = "allowance.json"


@dataclass(slots=True)
class LeftJournal:
    """A journal a stopped process left: its spend still to replay."""

    path: Path
    sidecar_id: str
    namespace: str
    meters: dict[str, dict[str, Any]]
    batches: list[dict[str, Any]]


class StateDir:
    """The store's files in one directory. `open` returns None when the directory is not usable."""

    def __init__(self, path: Path, sidecar_id: str) -> None:
        self.path = path
        self.sidecar_id = sidecar_id
        self.journal_path = path / f"{_JOURNAL_PREFIX}{sidecar_id}.json"

    @classmethod
    def open(cls, path: str | None, sidecar_id: str) -> StateDir | None:
        if not path:
            return None
        p = Path(path)
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            log.info(
                "state directory %s is missing or not writable: spend Redis has not confirmed is not kept across "
                "restarts (a pod gets it from the injector)",
                p,
            )
            return None
        return cls(p, sidecar_id)

    # ------------------------------------------------------------------ writing

    def _write(self, target: Path, doc: dict[str, Any]) -> None:
        # No fsync: what this guards against is the process ending (a crash, SIGKILL, a
        # container restart), and the page cache outlives that; an emptyDir does not
        # outlive the node anyway.
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(orjson.dumps(doc))
        os.replace(tmp, target)

    def write_journal(self, doc: dict[str, Any]) -> None:
        self._write(self.journal_path, {"version": JOURNAL_VERSION, "sidecar": self.sidecar_id, **doc})

    def drop_journal(self) -> None:
        self.journal_path.unlink(missing_ok=True)

    def write_allowances(self, doc: dict[str, Any]) -> None:
        self._write(self.path / _ALLOWANCE, {"version": JOURNAL_VERSION, **doc})

    # ------------------------------------------------------------------ reading

    def _read(self, p: Path) -> dict[str, Any] | None:
        try:
            doc = orjson.loads(p.read_bytes())
            if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION:
                raise ValueError(f"not a version {JOURNAL_VERSION} state file")
            return doc
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            bad = p.with_name(p.name + ".bad")
            log.warning("state file %s cannot be read (%s): kept as %s, not used", p, exc, bad.name)
            try:
                os.replace(p, bad)
            except OSError:
                pass
            return None

    def left_journals(self) -> list[LeftJournal]:
        """Journals of other processes, oldest first."""
        out: list[tuple[float, LeftJournal]] = []
        for p in self.path.glob(f"{_JOURNAL_PREFIX}*.json"):
            if p == self.journal_path:
                continue
            doc = self._read(p)
            if doc is None:
                continue
            try:
                j = LeftJournal(
                    p, str(doc["sidecar"]), str(doc["namespace"]), dict(doc["meters"]), list(doc["batches"])
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("journal %s is incomplete (%s): not replayed", p, exc)
                continue
            out.append((float(doc.get("written", 0.0)), j))
        return [j for _, j in sorted(out, key=lambda t: t[0])]

    def read_allowances(self) -> dict[str, Any]:
        return self._read(self.path / _ALLOWANCE) or {}
