"""`kubetoll estimate`: what a workload will cost, before spending anything.

Input: sample conversations (JSONL, one `{"messages": [...]}` or bare messages
list per line; a JSON array; or YAML, a list of the same), or a prompt template
with variables (`--template FILE --vars vars.jsonl`, `{{name}}` placeholders).
A sample ending in an assistant message has its expected output: that reply is
counted as the output tokens and the messages before it as the prompt. Samples
without one use `--output-tokens`.

Tokens are counted the way the sidecar estimates them (`tokens.count_chat`, with
tiktoken): exact for OpenAI models, cl100k_base as an approximation for others.
Prices come from the price catalogue (`--models`) or from a RouterConfig's
backends, GPU shadow prices included (`--config --route`).

Cost per request is the mean over the samples of each sample's cost (so tiered
prices apply per request); per day is that times the requests per day, per month
times 30.4 days. The blended figure spreads requests over the backends by
`--split` (default: all on the first) and takes `--cache-hit-rate` off the top:
a cache hit is answered by the sidecar and costs nothing upstream.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetoll_core.enums import Provider
from kubetoll_core.parts import Pricing
from kubetoll_core.prices import PricingError, ResolvedPrice, resolve_price
from kubetoll_core.router_config import Backend
from kubetoll_sidecar import tokens
from kubetoll_sidecar.providers.base import Usage

from .spend import fmt_usd

DAYS_PER_MONTH = 30.4
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


class EstimateError(Exception):
    """Bad input or arguments (exit status 2). The message names the file and line where there is one."""


def _where(path: str | Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


@dataclass
class Sample:
    prompt: list[dict[str, Any]]
    expected_output: str | None  # the final assistant reply, when the sample has one
    source: str  # "file:line"


# --------------------------------------------------------------------------- reading samples


def _content_ok(content: Any) -> bool:
    if content is None or isinstance(content, str):
        return True
    if isinstance(content, list):
        return all(isinstance(p, (dict, str)) for p in content)
    return False


def conversation(value: Any, where: str) -> Sample:
    """A Sample from one conversation: {"messages": [...]} or a bare list of messages."""
    if isinstance(value, dict):
        if "messages" not in value:
            raise EstimateError(f'{where}: expected an object with "messages" or a list of messages')
        messages = value["messages"]
    else:
        messages = value
    if not isinstance(messages, list) or not messages:
        raise EstimateError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise EstimateError(f"{where}: message {i + 1} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise EstimateError(
                f"{where}: message {i + 1} has role {role!r}; expected one of {', '.join(sorted(ROLES))}"
            )
        if not _content_ok(m.get("content")):
            raise EstimateError(f"{where}: message {i + 1}: content must be a string or a list of parts")
        if role == "user" and m.get("content") in (None, "", []):
            raise EstimateError(f"{where}: message {i + 1}: a user message needs content")
    expected = None
    prompt = list(messages)
    if messages[-1].get("role") == "assistant" and len(messages) > 1:
        last = messages[-1]
        expected = tokens._content_text(last.get("content"))
        if last.get("tool_calls"):
            expected += json.dumps(last["tool_calls"], separators=(",", ":"))
        prompt = messages[:-1]
    return Sample(prompt, expected, where)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EstimateError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EstimateError(f"{path}: cannot read: {exc}") from None


def _jsonl(path: Path) -> list[tuple[int, Any]]:
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise EstimateError(f"{path}:{n}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    return out


def _yaml_items(path: Path) -> list[tuple[int, Any]]:
    """Top-level list items with the line each starts on (YAML or a JSON array)."""
    text = _read_text(path)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise EstimateError(
            f"{_where(path, line)}: not valid YAML/JSON: {getattr(exc, 'problem', None) or exc}"
        ) from None
    if data is None or node is None:  # (no node means no document, so no data either)
        return []
    if isinstance(data, dict):
        for key in ("conversations", "samples"):
            if key in data:
                items = data[key]
                node = next(v for k, v in node.value if k.value == key)
                break
        else:
            return [(1, data)]  # one conversation
    else:
        items = data
    if not isinstance(items, list):
        raise EstimateError(f"{path}:1: expected a list of conversations")
    return [(child.start_mark.line + 1, item) for child, item in zip(node.value, items)]


def load_samples(path: str | Path) -> list[Sample]:
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        items = _yaml_items(p)
    else:
        items = _jsonl(p)
    samples = [conversation(value, _where(p, line)) for line, value in items]
    if not samples:
        raise EstimateError(f"{p}: no samples")
    return samples


def _substitute(value: Any, variables: dict[str, Any], where: str, template: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in variables:
                raise EstimateError(f"{where}: variable {name!r} (used in {template}) is not set")
            v = variables[name]
            return v if isinstance(v, str) else json.dumps(v)

        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, variables, where, template) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where, template) for k, v in value.items()}
    return value


def load_template(template: str | Path, vars_path: str | Path | None) -> list[Sample]:
    """Samples from a prompt template: plain text (one user message) or a YAML/JSON conversation."""
    t = Path(template)
    text = _read_text(t)
    if t.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            body: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise EstimateError(
                f"{_where(t, mark.line + 1 if mark else None)}: not valid YAML/JSON: "
                f"{getattr(exc, 'problem', None) or exc}"
            ) from None
        conversation(body, str(t))  # validates the shape before any substitution
    else:
        body = {"messages": [{"role": "user", "content": text}]}
    if vars_path is None:
        return [conversation(_substitute(body, {}, str(t), str(t)), str(t))]
    samples = []
    for line, variables in _jsonl(Path(vars_path)):
        where = _where(vars_path, line)
        if not isinstance(variables, dict):
            raise EstimateError(f"{where}: expected an object of template variables")
        samples.append(conversation(_substitute(body, variables, where, str(t)), where))
    if not samples:
        raise EstimateError(f"{vars_path}: no variables")
    return samples


# --------------------------------------------------------------------------- what is priced


@dataclass
class Target:
    name: str  # what --split names: the model id (--models) or the backend name (--config)
    model: str  # what tokens are counted for
    price: ResolvedPrice
    approximate: bool = False  # tokens counted with a stand-in tokenizer

    @property
    def source(self) -> str:
        return self.price.source


def _catalog_provider(model: str) -> tuple[str, str]:
    """(catalogue provider id, model id) for a model named on the command line."""
    if "/" in model:
        provider, _, rest = model.partition("/")
        if provider and rest:
            return provider, rest
    m = model.lower()
    if m.startswith("claude"):
        return "anthropic", model
    if m.startswith("gemini"):
        return "google", model
    if m.startswith(("mistral", "codestral", "ministral", "magistral", "pixtral")):
        return "mistral", model
    if m.startswith("command"):
        return "cohere", model
    if m.startswith("deepseek"):
        return "deepseek", model
    if m.startswith("grok"):
        return "x-ai", model
    return "openai", model


def catalog_price(model: str) -> ResolvedPrice:
    provider, model_id = _catalog_provider(model)
    backend = Backend(
        name="estimate",
        provider=Provider.openai_compatible,
        model=model_id,
        endpoint="http://estimate.invalid",
        pricing=Pricing(catalog_provider=provider, catalog_model=model_id),
    )
    try:
        return resolve_price(backend)
    except PricingError as exc:
        raise EstimateError(
            f"--models {model}: {exc}; name it as provider/model (e.g. anthropic/claude-3-5-haiku-latest)"
        ) from None


def targets_from_models(spec: str) -> list[Target]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise EstimateError("--models: give at least one model")
    out = []
    for name in names:
        model = _catalog_provider(name)[1]
        out.append(Target(name, model, catalog_price(name), tokens.encoding_for_model(model).approximate))
    return out


def targets_from_config(path: str, route: str | None) -> list[Target]:
    from kubetoll_sidecar.config_loader import ConfigError, load_config

    try:
        config = load_config(path).config
    except ConfigError as exc:
        raise EstimateError(str(exc)) from None
    names = [r.name for r in config.routes]
    if route is None:
        if len(names) != 1:
            raise EstimateError(f"{path}: name a route with --route (routes: {', '.join(names) or 'none'})")
        route = names[0]
    found = next((r for r in config.routes if r.name == route), None)
    if found is None:
        raise EstimateError(f"{path}: no route {route!r} (routes: {', '.join(names) or 'none'})")
    # Approximate models counted as this config's sidecar counts them (tokens.use_encodings_for).
    tokens.use_encodings_for(b.model for b in config.backends)
    order: dict[str, None] = {}
    for rule in found.rules:
        order.update(dict.fromkeys(rule.backend_names()))  # cascade steps and experiment arms too
    if found.downgrade:
        order.update(dict.fromkeys(found.downgrade.backends))
    out = []
    for name in order:
        b = config.backend(name)
        try:
            price = resolve_price(b)
        except PricingError as exc:
            raise EstimateError(f"{path}: {exc}") from None
        out.append(Target(name, b.model, price, tokens.encoding_for_model(b.model).approximate))
    return out


# --------------------------------------------------------------------------- the estimate


@dataclass
class TargetEstimate:
    target: Target
    input_tokens: float  # per request, mean
    output_tokens: float
    cost_per_request: float
    per_sample: list[tuple[int, int, float]] = field(default_factory=list)  # (input, output, cost)

    def per_day(self, rpd: float) -> float:
        return self.cost_per_request * rpd


def parse_split(spec: str | None, targets: list[Target]) -> dict[str, float]:
    names = [t.name for t in targets]
    if not spec:
        return {names[0]: 1.0}
    weights: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, w = part.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise EstimateError(f"--split: {part.strip()!r} is not name=weight")
        if name not in names:
            raise EstimateError(f"--split: {name!r} is not one of {', '.join(names)}")
        try:
            weight = float(w)
        except ValueError:
            raise EstimateError(f"--split: weight {w!r} of {name} is not a number") from None
        if weight < 0:
            raise EstimateError(f"--split: weight of {name} is negative")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise EstimateError("--split: the weights add up to zero")
    return {k: v / total for k, v in weights.items()}


def estimate(samples: list[Sample], targets: list[Target], output_tokens: int | None) -> list[TargetEstimate]:
    if output_tokens is None:
        missing = next((s for s in samples if s.expected_output is None), None)
        if missing is not None:
            raise EstimateError(
                f"{missing.source}: the sample does not end with an assistant reply; give --output-tokens N"
            )
    out = []
    for t in targets:
        rows = []
        for s in samples:
            inp = tokens.count_chat(s.prompt, t.model)
            outp = (
                tokens.count_text(s.expected_output, t.model)
                if s.expected_output is not None
                else int(output_tokens or 0)
            )
            rows.append((inp, outp, t.price.cost(Usage(inp, outp))))
        n = len(rows)
        out.append(
            TargetEstimate(
                t, sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n, sum(r[2] for r in rows) / n, rows
            )
        )
    return out


def requests_per_day(rpd: float | None, mau: float | None, per_user: float | None) -> tuple[float, str]:
    if rpd is not None:
        if mau is not None or per_user is not None:
            raise EstimateError("give either --requests-per-day or --mau with --requests-per-user, not both")
        if rpd < 0:
            raise EstimateError("--requests-per-day must not be negative")
        return float(rpd), f"{rpd:g} requests/day"
    if mau is None or per_user is None:
        raise EstimateError(
            "give the volume: --requests-per-day N, or --mau N with --requests-per-user M (per user per month)"
        )
    if mau < 0 or per_user < 0:
        raise EstimateError("--mau and --requests-per-user must not be negative")
    v = mau * per_user / DAYS_PER_MONTH
    return v, f"{mau:g} monthly users × {per_user:g} requests/user/month ÷ {DAYS_PER_MONTH} = {v:,.1f} requests/day"


def build_result(
    samples: list[Sample],
    targets: list[Target],
    *,
    output_tokens: int | None,
    rpd: float,
    volume_text: str,
    split: dict[str, float],
    cache_hit_rate: float,
    source: str,
) -> dict[str, Any]:
    ests = estimate(samples, targets, output_tokens)
    rows: list[dict[str, Any]] = []
    for e in ests:
        per_day = e.cost_per_request * rpd
        rows.append(
            {
                "name": e.target.name,
                "model": e.target.model,
                "price_source": e.target.source,
                "approximate_tokens": e.target.approximate,
                "input_tokens_per_request": e.input_tokens,
                "output_tokens_per_request": e.output_tokens,
                "cost_per_request_usd": e.cost_per_request,
                "cost_per_day_usd": per_day,
                "cost_per_month_usd": per_day * DAYS_PER_MONTH,
            }
        )
    by_name = {r["name"]: r for r in rows}
    upstream_share = 1.0 - cache_hit_rate
    blend_req = upstream_share * sum(w * by_name[n]["cost_per_request_usd"] for n, w in split.items())
    blend_in = sum(w * by_name[n]["input_tokens_per_request"] for n, w in split.items())
    blend_out = sum(w * by_name[n]["output_tokens_per_request"] for n, w in split.items())
    return {
        "source": source,
        "samples": len(samples),
        "requests_per_day": rpd,
        "volume": volume_text,
        "days_per_month": DAYS_PER_MONTH,
        "targets": rows,
        "blended": {
            "split": split,
            "cache_hit_rate": cache_hit_rate,
            "input_tokens_per_request": blend_in,
            "output_tokens_per_request": blend_out,
            "cost_per_request_usd": blend_req,
            "cost_per_day_usd": blend_req * rpd,
            "cost_per_month_usd": blend_req * rpd * DAYS_PER_MONTH,
        },
        "per_sample": [
            {
                "source": s.source,
                "input_tokens": {e.target.name: e.per_sample[i][0] for e in ests},
                "output_tokens": {e.target.name: e.per_sample[i][1] for e in ests},
                "cost_usd": {e.target.name: e.per_sample[i][2] for e in ests},
            }
            for i, s in enumerate(samples)
        ],
    }


# --------------------------------------------------------------------------- output


def text_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def format_table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["targets"]:
        approx = "≈" if r["approximate_tokens"] else ""
        rows.append(
            [
                r["name"],
                r["price_source"],
                f"{approx}{r['input_tokens_per_request']:,.1f}",
                f"{approx}{r['output_tokens_per_request']:,.1f}",
                fmt_usd(r["cost_per_request_usd"]),
                fmt_usd(r["cost_per_day_usd"]),
                fmt_usd(r["cost_per_month_usd"]),
            ]
        )
    b = result["blended"]
    rows.append(["", "", "", "", "", "", ""])
    rows.append(
        [
            "blended",
            "",
            f"{b['input_tokens_per_request']:,.1f}",
            f"{b['output_tokens_per_request']:,.1f}",
            fmt_usd(b["cost_per_request_usd"]),
            fmt_usd(b["cost_per_day_usd"]),
            fmt_usd(b["cost_per_month_usd"]),
        ]
    )
    head = f"{result['samples']} samples from {result['source']}; {result['volume']}; month = {DAYS_PER_MONTH} days"
    table = text_table(
        ["model/backend", "price", "in tok/req", "out tok/req", "$/request", "$/day", "$/month"], rows, {2, 3, 4, 5, 6}
    )
    split = ", ".join(f"{k} {100 * v:.0f}%" for k, v in b["split"].items())
    notes = [
        f"blended: requests split {split}"
        + (
            f"; {100 * b['cache_hit_rate']:.0f}% answered from cache (free upstream)"
            if b["cache_hit_rate"]
            else "; no cache"
        )
    ]
    if any(r["approximate_tokens"] for r in result["targets"]):
        notes.append("≈ tokens counted with cl100k_base: the model's own tokenizer is not in tiktoken")
    if b["cache_hit_rate"]:
        notes.append("a semantic cache's embedding calls are not included")
    return "\n".join([head, "", table, "", *notes])


def format_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "name",
            "model",
            "price_source",
            "input_tokens_per_request",
            "output_tokens_per_request",
            "cost_per_request_usd",
            "cost_per_day_usd",
            "cost_per_month_usd",
        ]
    )
    for r in result["targets"]:
        w.writerow(
            [
                r["name"],
                r["model"],
                r["price_source"],
                f"{r['input_tokens_per_request']:.2f}",
                f"{r['output_tokens_per_request']:.2f}",
                f"{r['cost_per_request_usd']:.9f}",
                f"{r['cost_per_day_usd']:.6f}",
                f"{r['cost_per_month_usd']:.6f}",
            ]
        )
    b = result["blended"]
    w.writerow(
        [
            "blended",
            "",
            "",
            f"{b['input_tokens_per_request']:.2f}",
            f"{b['output_tokens_per_request']:.2f}",
            f"{b['cost_per_request_usd']:.9f}",
            f"{b['cost_per_day_usd']:.6f}",
            f"{b['cost_per_month_usd']:.6f}",
        ]
    )
    return buf.getvalue()


def run(args: Any, out: Any = None, err: Any = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        if bool(args.models) == bool(args.config):
            raise EstimateError("give the models to price: --models a,b,c or --config router.yaml --route NAME")
        if args.route and not args.config:
            raise EstimateError("--route needs --config")
        if args.template:
            if args.samples:
                raise EstimateError("give sample conversations or --template, not both")
            samples = load_template(args.template, args.vars)
            source = f"{args.template}" + (f" × {args.vars}" if args.vars else "")
        else:
            if args.vars:
                raise EstimateError("--vars needs --template")
            if not args.samples:
                raise EstimateError("give sample conversations (JSONL or YAML) or --template FILE --vars vars.jsonl")
            samples = load_samples(args.samples)
            source = str(args.samples)
        if args.output_tokens is not None and args.output_tokens < 0:
            raise EstimateError("--output-tokens must not be negative")
        if not 0.0 <= args.cache_hit_rate <= 1.0:
            raise EstimateError("--cache-hit-rate must be between 0 and 1")
        rpd, volume = requests_per_day(args.requests_per_day, args.mau, args.requests_per_user)
        targets = targets_from_models(args.models) if args.models else targets_from_config(args.config, args.route)
        split = parse_split(args.split, targets)
        result = build_result(
            samples,
            targets,
            output_tokens=args.output_tokens,
            rpd=rpd,
            volume_text=volume,
            split=split,
            cache_hit_rate=args.cache_hit_rate,
            source=source,
        )
    except EstimateError as exc:
        print(f"kubetoll estimate: {exc}", file=err)
        return 2
    if args.format == "json":
        out.write(json.dumps(result, indent=2) + "\n")
    elif args.format == "csv":
        out.write(format_csv(result))
    else:
        out.write(format_table(result) + "\n")
    return 0
