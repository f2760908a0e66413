"""Reading manifests from disk for `kubetoll validate`, `compile` and `run`.

Every object remembers where it came from (file and document index), so an error
can say "examples/20-route.yaml#0 ModelRoute/chat spec.rules[0].backends[1]: ...".
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Document:
    path: str
    index: int  # position of the YAML document in its file
    obj: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}#{self.index}"

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name", ""))

    def namespace(self, default: str) -> str:
        return str((self.obj.get("metadata") or {}).get("namespace") or default)


@dataclass(frozen=True)
class LoadError:
    path: str
    index: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.index is None else f"{self.path}#{self.index}"
        return f"{where}: {self.message}"


def manifest_files(paths: Iterable[str]) -> list[Path]:
    """The files named, and every manifest file under the directories named, in a stable order."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
        else:
            files.append(path)
    return files


def _documents(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text()
    yield from enumerate(yaml.safe_load_all(text))


def load(paths: Iterable[str]) -> tuple[list[Document], list[LoadError]]:
    docs: list[Document] = []
    errors: list[LoadError] = []
    for path in manifest_files(paths):
        try:
            items = list(_documents(path))
        except FileNotFoundError:
            errors.append(LoadError(str(path), None, "no such file or directory"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(LoadError(str(path), None, f"cannot read: {exc}"))
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            errors.append(LoadError(str(path), None, f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"))
            continue
        for index, item in items:
            if item is None:
                continue
            if not isinstance(item, dict):
                errors.append(LoadError(str(path), index, "a manifest must be a mapping"))
                continue
            if item.get("kind") == "List" and isinstance(item.get("items"), list):
                docs += [Document(str(path), index, sub) for sub in item["items"] if isinstance(sub, dict)]
            else:
                docs.append(Document(str(path), index, item))
    return docs, errors


def secret_values(docs: Iterable[Document], namespace: str, default_namespace: str) -> dict[str, dict[str, str]]:
    """Secret manifests among the documents: name → key → value (stringData wins over data)."""
    out: dict[str, dict[str, str]] = {}
    for d in docs:
        if d.obj.get("apiVersion") != "v1" or d.kind != "Secret" or d.namespace(default_namespace) != namespace:
            continue
        values: dict[str, str] = {}
        for k, v in (d.obj.get("data") or {}).items():
            try:
                values[k] = base64.b64decode(str(v)).decode()
            except (ValueError, UnicodeDecodeError):
                continue
        for k, v in (d.obj.get("stringData") or {}).items():
            values[k] = str(v)
        out[d.name] = values
    return out
