"""The checks a cascade step's answer must pass to be served (docs/routing.md, "Cascades").

Each check reads a chat completion (OpenAI's response shape, every choice) and the
request it answers, and names what is wrong, or nothing:

* `length`: a choice stopped at `finish_reason: length` (cut by max_tokens).
* `empty`: a choice has no text (only whitespace), no tool call, no function call
  and no refusal.
* `refusal`: a choice's `message.refusal` is set (OpenAI's structured refusal), or
  its whole text is a short stock refusal: at most `REFUSAL_MAX_CHARS` characters
  that open with one of a few English phrases ("I can't help with that", "I'm
  sorry, but I cannot assist with...", "I am unable to comply..."; `_REFUSAL`).
  Deliberately narrow: an answer that apologises and then answers is longer, and a
  refusal in another language is not recognised (it is served).
* `jsonSchema`: with `response_format` `json_schema`, every choice without a tool
  call is JSON that satisfies the schema (jsonschema, the schema's own draft, 2020-12
  when it names none); with `json_object`, a JSON object. A schema jsonschema cannot
  use (invalid, or a `$ref` it cannot resolve: nothing is fetched) judges nothing:
  the answer passes.
* `toolArguments`: every tool call names a function the request offered, and its
  arguments are a JSON object (the legacy `function_call` too). Not checked against
  the tool's parameter schema.

jsonschema is imported only by a config whose cascades use `jsonSchema`
(`prepare`): a sidecar without such a route never loads it. Validators are compiled
once per schema (`_VALIDATORS`, bounded).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from kubetoll_core.enums import CascadeCheck

log = logging.getLogger("kubetoll.cascade")

REFUSAL_MAX_CHARS = 300
# An optional apology, then "I can't / cannot / won't / am unable to / am not able to" and a verb of helping.
_REFUSAL = re.compile(
    r"^(?:(?:i'm|i am)\s+sorry|sorry|i\s+apologi[sz]e)?[,.!]?\s*(?:but\s+)?"
    r"i(?:'m|\s+am)?\s+(?:can't|cannot|can\s+not|won't|will\s+not|unable\s+to|not\s+able\s+to)\s+"
    r"(?:help|assist|comply|provide|answer|fulfil|fulfill|support|do\s+that)\b"
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})
_VALIDATORS_MAX = 128
_VALIDATORS: OrderedDict[bytes, Any] = OrderedDict()  # canonical schema JSON → validator, or None (unusable)


def prepare(checks: Iterable[CascadeCheck]) -> None:
    """Load what the checks need once, when a config is loaded, not on a request's clock."""
    if CascadeCheck.json_schema in checks:
        import jsonschema  # type: ignore[import-untyped]  # noqa: F401  (the import is the point: no stubs)


def failed_check(body: Any, request: Mapping[str, Any], checks: Iterable[CascadeCheck]) -> str | None:
    """The first of `checks` (in their order) that the answer `body` fails, as its config name; None: it passes."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return CascadeCheck.empty.value if CascadeCheck.empty in checks else None
    messages = [(c if isinstance(c, dict) else {}, _message(c)) for c in choices]
    for check in checks:
        if _FAILS[check](messages, request):
            return check.value
    return None


def _message(choice: Any) -> dict[str, Any]:
    msg = choice.get("message") if isinstance(choice, dict) else None
    return msg if isinstance(msg, dict) else {}


Choices = list[tuple[dict[str, Any], dict[str, Any]]]  # (choice, its message)


def _length(choices: Choices, request: Mapping[str, Any]) -> bool:
    return any(c.get("finish_reason") == "length" for c, _ in choices)


def _text(msg: Mapping[str, Any]) -> str:
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _empty(choices: Choices, request: Mapping[str, Any]) -> bool:
    return any(
        not _text(m).strip() and not m.get("tool_calls") and not m.get("function_call") and not m.get("refusal")
        for _, m in choices
    )


def is_stock_refusal(text: str) -> bool:
    t = text.strip()
    if not t or len(t) > REFUSAL_MAX_CHARS:
        return False
    return _REFUSAL.match(t.lower().translate(_APOSTROPHES)) is not None


def _refusal(choices: Choices, request: Mapping[str, Any]) -> bool:
    return any(
        (isinstance(m.get("refusal"), str) and m["refusal"].strip()) or is_stock_refusal(_text(m)) for _, m in choices
    )


def _json_schema(choices: Choices, request: Mapping[str, Any]) -> bool:
    fmt = request.get("response_format")
    if not isinstance(fmt, dict):
        return False
    kind = fmt.get("type")
    if kind == "json_object":
        return any(not isinstance(_loads(_text(m)), dict) for _, m in choices if not m.get("tool_calls"))
    if kind != "json_schema":
        return False
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, (dict, bool)):
        return False
    validator = _validator(schema)
    if validator is None:
        return False
    for _, m in choices:
        if m.get("tool_calls"):
            continue  # the model chose a tool: response_format is about text answers
        value = _loads(_text(m))
        if value is _NOT_JSON:
            return True
        try:
            if not validator.is_valid(value):
                return True
        except Exception as exc:  # a $ref that cannot be resolved, a format checker that raises: no verdict
            log.debug("jsonSchema check: the schema could not judge the answer (%s)", type(exc).__name__)
            return False
    return False


def _tool_arguments(choices: Choices, request: Mapping[str, Any]) -> bool:
    offered = _offered_functions(request)
    for _, m in choices:
        calls = [tc.get("function") if isinstance(tc, dict) else None for tc in m.get("tool_calls") or ()]
        if m.get("function_call"):
            calls.append(m["function_call"])
        for fn in calls:
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return True
            if offered is not None and fn["name"] not in offered:
                return True
            args = fn.get("arguments")
            if not isinstance(args, str) or not isinstance(_loads(args), dict):
                return True
    return False


def _offered_functions(request: Mapping[str, Any]) -> set[str] | None:
    """Names of the functions the request offered; None when it offered none (nothing to hold a call to)."""
    names: set[str] = set()
    for tool in request.get("tools") or ():
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    for fn in request.get("functions") or ():
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names or None


_NOT_JSON = object()


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _validator(schema: dict[str, Any] | bool) -> Any:
    """A compiled validator for `schema`, or None when jsonschema cannot use it."""
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # an integer past 64 bits: nothing jsonschema is asked about here
        return None
    if key in _VALIDATORS:
        _VALIDATORS.move_to_end(key)
        return _VALIDATORS[key]
    import jsonschema  # loaded by `prepare` with the config

    validator: Any = None
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        validator = cls(schema)
    except Exception as exc:  # SchemaError, an unknown $schema: the check has nothing to judge with
        log.debug("jsonSchema check: unusable schema (%s)", type(exc).__name__)
    _VALIDATORS[key] = validator
    if len(_VALIDATORS) > _VALIDATORS_MAX:
        _VALIDATORS.popitem(last=False)
    return validator


_FAILS = {
    CascadeCheck.length: _length,
    CascadeCheck.empty: _empty,
    CascadeCheck.refusal: _refusal,
    CascadeCheck.json_schema: _json_schema,
    CascadeCheck.tool_arguments: _tool_arguments,
}
