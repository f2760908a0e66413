"""The base of every contract model, and cross-field rules written once for two checkers.

A rule that spans fields is a `CelRule`: its CEL text goes into the CRD as an
`x-kubernetes-validations` entry (so the API server enforces it) and its Python
twin runs whenever the model is parsed (so the operator, `kubetoll validate`
and the sidecar reading a RouterConfig give the same answer). Tests hold the two
equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

from .user_regex import compile_user_regex


@dataclass(frozen=True)
class CelRule:
    """A rule that spans fields: CEL for the API server, and the same rule in Python.

    `rule` is evaluated with `self` bound to the object the rule is attached to;
    `check` gets the parsed model and returns True when the object is valid.
    `field_path` (relative to that object, as in x-kubernetes-validations) names
    the field the message is about.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


def _add_cel_rules(schema: dict[str, Any], cls: type) -> None:
    rules: tuple[CelRule, ...] = getattr(cls, "__cel_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_schema() for r in rules]


class ContractModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected, immutable once parsed."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_add_cel_rules,
    )

    __cel_rules__: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cel_rules(self) -> Any:
        failed = []
        for rule in type(self).__cel_rules__:
            if not rule.check(self):
                where = rule.field_path.lstrip(".") + ": " if rule.field_path else ""
                failed.append(where + rule.message)
        if failed:
            raise ValueError("; ".join(failed))
        return self


def regex_compiles(value: str | None) -> str | None:
    """A field validator: the value is None or a regular expression RE2 compiles (see user_regex)."""
    if value is not None:
        compile_user_regex(value)  # UserRegexError is a ValueError: pydantic reports it on the field
    return value
