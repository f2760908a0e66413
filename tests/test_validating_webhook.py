"""The validating webhook for Kubetoll's four kinds, over HTTPS, from the operator's real server.

kopf runs for real against kmock's KubernetesEmulator with the webhook enabled
as the chart runs it (a certificate directory on a fixed port; fixtures from
test_webhook_server.py). The test plays the API server: it POSTs the
AdmissionReviews `kubectl apply` would cause to `/validate-resources`, verifying
the server certificate against the CA, and reads the answers as kubectl does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml

from kubetoll_operator import metrics, validation
from kubetoll_operator.injection import InjectionOptions
from kubetoll_operator.validation import WARNING_MAX_CHARS, WARNINGS_MAX_TOTAL, fit_warnings
from kubetoll_operator.webhook import VALIDATE_WEBHOOK_ID, InjectionWebhookServer, WebhookOptions
from support.admission import post_review, resource_review
from test_webhook_server import ApiServer, cluster, start_operator  # noqa: F401

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PATH = f"/{VALIDATE_WEBHOOK_ID}"
NS = "team-a"


def examples() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc["apiVersion"].startswith("kubetoll.dev/"):
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


class Validator(ApiServer):
    async def post(self, body: Any) -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.base + PATH, json=body, ssl=self.ssl) as resp:
                await resp.read()
                return resp

    async def validate(self, obj: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return await post_review(self.base + PATH, resource_review(obj, namespace=NS, **kwargs), self.ssl)


@pytest.fixture
async def api(cluster: Any, start_operator: Any, cert_dir: Path, ca: trustme.CA, port: int) -> Validator:  # noqa: F811
    await start_operator(
        WebhookOptions(
            enabled=True,
            addr="127.0.0.1",
            port=port,
            cert_dir=str(cert_dir),
            native_sidecars="false",
            injection=InjectionOptions(image="registry.example/kubetoll-sidecar:1"),
        )
    )
    validator = Validator(port, ca)
    await validator.wait_listening()
    return validator


def typo(kind: str, name: str, edit: Any) -> dict[str, Any]:
    obj = copy.deepcopy(examples()[(kind, name)])
    edit(obj["spec"])
    return obj


def _regex(spec: dict[str, Any]) -> None:
    (rule,) = [r for r in spec["rules"] if "header" in (r.get("match") or {})]
    rule["match"]["header"]["regex"] = "^(platform|data$"


TYPOS = [
    pytest.param(
        typo("TokenBudget", "chat-budget", lambda s: s.update(timezone="Europe/Berln")),
        "spec.timezone",
        "unknown timezone 'Europe/Berln'",
        id="timezone",
    ),
    pytest.param(
        typo("ModelRoute", "chat", _regex), "spec.rules[2].match.header.regex", "^(platform|data$", id="regex"
    ),
    pytest.param(
        typo("ModelBackend", "llama-vllm", lambda s: s.update(headers={"bad header": "x"})),
        "spec.headers",
        "'bad header' is not a valid header name",
        id="header-name",
    ),
    pytest.param(
        typo("ModelBackend", "gpt-4o", lambda s: s.update(model="no-such-model-anywhere")),
        "spec.pricing",
        "model 'no-such-model-anywhere' is not in the price catalogue",
        id="catalogue",
    ),
]


def decisions(decision: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "kubetoll_operator_admission_decisions_total", {"kind": "validate", "decision": decision}
    )
    return value or 0.0


@pytest.mark.parametrize(("obj", "field", "says"), TYPOS)
async def test_each_typo_is_refused_with_its_field(api: Validator, obj: dict[str, Any], field: str, says: str) -> None:
    denied_before = decisions("denied")
    for operation, old in (("CREATE", None), ("UPDATE", examples()[(obj["kind"], obj["metadata"]["name"])])):
        response = await api.validate(obj, operation=operation, old=old)
        assert response["allowed"] is False, response
        status = response["status"]
        # What kubectl prints: `The KIND "NAME" is invalid: * field: message` from a 422 Invalid with causes.
        assert status["code"] == 422 and status["reason"] == "Invalid"
        assert status["details"]["kind"] == obj["kind"] and status["details"]["name"] == obj["metadata"]["name"]
        assert status["details"]["group"] == "kubetoll.dev"
        causes = {c["field"]: c["message"] for c in status["details"]["causes"]}
        assert field in causes and says in causes[field], causes
        # ... and every client that reads only the message sees the field and the reason too.
        assert f"{field}: " in status["message"] and says in status["message"]
        assert status["message"].startswith(f"{obj['kind']} '{obj['metadata']['name']}' is invalid: ")
    assert decisions("denied") == denied_before + 2  # the operator's admission metric counts each refusal


async def test_the_examples_are_allowed_with_reference_warnings_only(api: Validator) -> None:
    for (kind, name), obj in examples().items():
        response = await api.validate(obj)
        assert response["allowed"] is True, (kind, name, response)
        assert "status" not in response
        warnings = response.get("warnings", [])
        # Each object is checked alone, so what it names elsewhere is a warning, never a refusal.
        assert all(w.startswith(f"{kind} {name}: spec.") for w in warnings), warnings
        assert all(("not in this check" in w or "not found" in w) for w in warnings), warnings
        assert all(len(w) <= WARNING_MAX_CHARS for w in warnings)
    route = await api.validate(examples()[("ModelRoute", "chat")])
    assert "ModelRoute chat: spec.rules[0].backends[0]: ModelBackend 'claude-sonnet' is not in this check" in " ".join(
        route["warnings"]
    )
    backend = await api.validate(examples()[("ModelBackend", "gpt-4o")])
    assert "warnings" not in backend  # a backend names only its Secret, which is not checked here


async def test_delete_and_metadata_only_updates_are_always_allowed(api: Validator) -> None:
    bad = TYPOS[0].values[0]
    response = await api.validate(bad, operation="DELETE")
    assert response == {"uid": response["uid"], "allowed": True}
    # A stored bad object (from before the webhook, or while it was down) must still take
    # finalizers, labels and kopf's annotations: only a changed spec is checked.
    relabelled = copy.deepcopy(bad)
    relabelled["metadata"]["labels"] = {"team": "platform"}
    assert (await api.validate(relabelled, operation="UPDATE", old=bad))["allowed"] is True
    going = copy.deepcopy(bad)
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    going["spec"]["timezone"] = "Europe/Berlim"
    assert (await api.validate(going, operation="UPDATE", old=bad))["allowed"] is True
    # A spec change over the bad object is checked again.
    worse = copy.deepcopy(bad)
    worse["spec"]["timezone"] = "Europe/Berlim"
    assert (await api.validate(worse, operation="UPDATE", old=bad))["allowed"] is False


async def test_kinds_it_does_not_know_pass_with_a_warning(api: Validator) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    response = await api.validate(cm, group="", version="v1")
    assert response["allowed"] is True
    assert response["warnings"] == [
        "kubetoll: ConfigMap.core not validated: the webhook checks ModelBackend, ModelRoute, "
        "TokenBudget, CachePolicy only (is a webhook rule wrong?)"
    ]


async def test_malformed_reviews_get_a_400_that_says_what_is_missing(api: Validator) -> None:
    for body, says in (
        ([1, 2], "expected an AdmissionReview object, got list"),
        ({"kind": "Pod"}, "expected kind AdmissionReview, got 'Pod'"),
        ({"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}, "has no request object"),
        ({"kind": "AdmissionReview", "request": {"operation": "CREATE"}}, "request.uid is missing"),
    ):
        for path in (PATH, "/inject-sidecar"):  # the injection paths refuse them the same way
            async with aiohttp.ClientSession() as session:
                async with session.post(api.base + path, json=body, ssl=api.ssl) as resp:
                    assert resp.status == 400, (path, body)
                    assert says in await resp.text()
    review = resource_review(examples()[("TokenBudget", "chat-budget")], namespace=NS)
    review["request"]["object"] = None
    async with aiohttp.ClientSession() as session:
        async with session.post(api.base + PATH, json=review, ssl=api.ssl) as resp:
            assert resp.status == 400 and "request.object is missing for a CREATE" in await resp.text()


def test_warnings_fit_the_api_servers_limits() -> None:
    long = ["w" * 300]
    assert fit_warnings(long) == ["w" * (WARNING_MAX_CHARS - 3) + "..."]
    many = [f"warning {i} " + "x" * 200 for i in range(40)]
    fitted = fit_warnings(many + many)  # duplicates are said once
    assert sum(len(w) for w in fitted) <= WARNINGS_MAX_TOTAL
    assert fitted[:-1] == many[: len(fitted) - 1]
    assert fitted[-1] == f"kubetoll: {40 - len(fitted) + 1} more warnings; the resource's status lists them all"


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_a_failing_check_answers_as_the_failure_policy_would(on_error: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(namespace: str, obj: Any) -> list[Any]:
        raise RuntimeError("catalogue unreadable")

    monkeypatch.setattr(validation, "check_resource", broken)
    server = InjectionWebhookServer(None, validate_on_error=on_error)
    errors_before = decisions("error")
    review = resource_review(examples()[("TokenBudget", "chat-budget")], namespace=NS)
    response = server.validate(review)["response"]
    assert response["uid"] == review["request"]["uid"]
    assert decisions("error") == errors_before + 1
    if on_error == "allow":
        assert response["allowed"] is True
        assert response["warnings"] == [
            "kubetoll: the resource was not validated: the webhook failed (RuntimeError: catalogue unreadable); "
            "see the operator's log"
        ]
    else:
        assert response["allowed"] is False and response["status"]["code"] == 500
        assert "the webhook failed (RuntimeError: catalogue unreadable)" in response["status"]["message"]
