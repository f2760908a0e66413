"""`kubetoll estimate`: token counts, arithmetic, input errors."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
import tiktoken

from kubetoll_tools import tool_commands as commands


def _run(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kubetoll")
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["estimate", *argv])
    from kubetoll_tools.estimate import run

    out, err = io.StringIO(), io.StringIO()
    rc = run(args, out, err)
    return rc, out.getvalue(), err.getvalue()


SAMPLES = [
    {
        "messages": [
            {"role": "system", "content": "You are the support assistant of a parcel shipping company."},
            {"role": "user", "content": "How do I reset my password?"},
            {
                "role": "assistant",
                "content": "Open Settings → Security and choose “Reset password”; a link arrives by email within a minute.",
            },
        ]
    },
    [
        {"role": "user", "content": "Where is my parcel? The tracking page has said 'label created' since Monday."},
        {
            "role": "assistant",
            "content": "Labels can show that status until the first carrier scan. Send me the order number and I will check.",
        },
    ],
    {
        "messages": [
            {"role": "system", "content": "Answer in one short paragraph."},
            {"role": "user", "content": "Do you ship to Canada?"},
            {"role": "assistant", "content": "Yes. International parcels to Canada take 4–7 business days."},
            {"role": "user", "content": "And to Iceland, with customs paperwork handled by you?"},
            {
                "role": "assistant",
                "content": "Yes, we prepare the customs declaration; delivery takes 5–9 business days.",
            },
        ]
    },
]


def _expected_tokens(sample: object, encoding: str) -> tuple[int, int]:
    """OpenAI's chat accounting, written out: 3 tokens of reply priming, 3 per message plus its content."""
    enc = tiktoken.get_encoding(encoding)
    messages = sample["messages"] if isinstance(sample, dict) else sample
    prompt, reply = messages[:-1], messages[-1]
    n = 3 + sum(
        3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in prompt
    )  # OpenAI: role and content
    return n, len(enc.encode(reply["content"]))


def test_token_counts_match_tiktoken(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in SAMPLES) + "\n")
    rc, out, err = _run(
        [
            str(path),
            "--models",
            "gpt-4o,gpt-4-turbo,claude-3-5-haiku-latest",
            "--requests-per-day",
            "100",
            "--format",
            "json",
        ]
    )
    assert rc == 0, err
    result = json.loads(out)
    assert result["samples"] == 3
    for i, sample in enumerate(SAMPLES):
        row = result["per_sample"][i]
        assert row["source"] == f"{path}:{i + 1}"
        for model, encoding in (
            ("gpt-4o", "o200k_base"),
            ("gpt-4-turbo", "cl100k_base"),
            ("claude-3-5-haiku-latest", "cl100k_base"),
        ):
            assert (row["input_tokens"][model], row["output_tokens"][model]) == _expected_tokens(sample, encoding), (
                i,
                model,
            )
    by_name = {t["name"]: t for t in result["targets"]}
    ins = [_expected_tokens(s, "o200k_base")[0] for s in SAMPLES]
    assert by_name["gpt-4o"]["input_tokens_per_request"] == pytest.approx(sum(ins) / 3)
    assert by_name["claude-3-5-haiku-latest"]["approximate_tokens"] is True
    assert by_name["gpt-4o"]["approximate_tokens"] is False


def test_yaml_samples_count_the_same(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "samples.yaml"
    path.write_text(yaml.safe_dump(SAMPLES, allow_unicode=True))
    rc, out, err = _run([str(path), "--models", "gpt-4o", "--requests-per-day", "1", "--format", "json"])
    assert rc == 0, err
    result = json.loads(out)
    assert [r["input_tokens"]["gpt-4o"] for r in result["per_sample"]] == [
        _expected_tokens(s, "o200k_base")[0] for s in SAMPLES
    ]


HAND_CONFIG = """
version: 1
backends:
  - name: hosted
    provider: openai
    model: gpt-4o
    endpoint: https://api.example.com/v1
    pricing: {inputPerMTok: 1.0, outputPerMTok: 2.0}
  - name: gpu
    provider: openai-compatible
    model: meta-llama/Llama-3.1-8B-Instruct
    endpoint: http://vllm:8000/v1
    pricing: {gpuHourlyUSD: 3.6, tokensPerSecond: 1000}
routes:
  - name: chat
    rules:
      - backends: [hosted, gpu]
"""


def test_arithmetic_by_hand(tmp_path: Path) -> None:
    # One sample: a user message "hello" (one token in both o200k_base and cl100k_base).
    # Prompt tokens: 3 reply priming + 3 message framing + 1 role ("user") + 1 = 8. Output: --output-tokens 100.
    # hosted: 8 × $1/MTok + 100 × $2/MTok = $0.000208 a request
    # gpu:    $3.60 an hour / (1000 tok/s × 3600 s) = $1/MTok for every token: 108 × $1/MTok = $0.000108
    # 3040 MAU × 10 requests/user/month / 30.4 days = 1000 requests a day:
    #   hosted $0.208/day, $6.3232/month; gpu $0.108/day, $3.2832/month
    # blended, half on each, half of all requests from cache:
    #   0.5 × (0.5 × 0.000208 + 0.5 × 0.000108) = $0.000079 a request, $0.079/day, $2.4016/month
    assert len(tiktoken.get_encoding("o200k_base").encode("hello")) == 1
    assert len(tiktoken.get_encoding("cl100k_base").encode("hello")) == 1
    (tmp_path / "router.yaml").write_text(HAND_CONFIG)
    (tmp_path / "s.jsonl").write_text('[{"role": "user", "content": "hello"}]\n')
    rc, out, err = _run(
        [
            str(tmp_path / "s.jsonl"),
            "--config",
            str(tmp_path / "router.yaml"),
            "--route",
            "chat",
            "--mau",
            "3040",
            "--requests-per-user",
            "10",
            "--output-tokens",
            "100",
            "--split",
            "hosted=1,gpu=1",
            "--cache-hit-rate",
            "0.5",
            "--format",
            "json",
        ]
    )
    assert rc == 0, err
    r = json.loads(out)
    assert r["requests_per_day"] == pytest.approx(1000)
    hosted, gpu = r["targets"]
    assert (hosted["name"], gpu["name"]) == ("hosted", "gpu")
    assert hosted["input_tokens_per_request"] == 8 and hosted["output_tokens_per_request"] == 100
    assert hosted["cost_per_request_usd"] == pytest.approx(0.000208)
    assert hosted["cost_per_day_usd"] == pytest.approx(0.208)
    assert hosted["cost_per_month_usd"] == pytest.approx(6.3232)
    assert gpu["price_source"] == "gpu-shadow"
    assert gpu["cost_per_request_usd"] == pytest.approx(0.000108)
    assert gpu["cost_per_day_usd"] == pytest.approx(0.108)
    assert gpu["cost_per_month_usd"] == pytest.approx(3.2832)
    b = r["blended"]
    assert b["split"] == {"hosted": 0.5, "gpu": 0.5}
    assert b["cost_per_request_usd"] == pytest.approx(0.000079)
    assert b["cost_per_day_usd"] == pytest.approx(0.079)
    assert b["cost_per_month_usd"] == pytest.approx(2.4016)

    rc, out, _ = _run(
        [
            str(tmp_path / "s.jsonl"),
            "--config",
            str(tmp_path / "router.yaml"),
            "--requests-per-day",
            "1000",
            "--output-tokens",
            "100",
            "--format",
            "csv",
        ]
    )
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("name,model,price_source")
    assert lines[1].split(",")[5:8] == ["0.000208000", "0.208000", "6.323200"]
    assert lines[-1].startswith("blended,")  # default split: all on the first backend
    assert lines[-1].split(",")[5] == "0.000208000"

    rc, out, _ = _run(
        [
            str(tmp_path / "s.jsonl"),
            "--config",
            str(tmp_path / "router.yaml"),
            "--requests-per-day",
            "1000",
            "--output-tokens",
            "100",
        ]
    )
    assert rc == 0
    assert "hosted" in out and "$0.000208" in out and "$6.323" in out and "gpu-shadow" in out


def test_template_with_variables(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("Summarize the ticket from {{customer}} about {{ topic }}.")
    (tmp_path / "v.jsonl").write_text(
        '{"customer": "Acme", "topic": "a late parcel"}\n\n{"customer": "Globex", "topic": "a damaged box"}\n'
    )
    rc, out, err = _run(
        [
            "--template",
            str(tmp_path / "t.txt"),
            "--vars",
            str(tmp_path / "v.jsonl"),
            "--models",
            "gpt-4o",
            "--requests-per-day",
            "10",
            "--output-tokens",
            "50",
            "--format",
            "json",
        ]
    )
    assert rc == 0, err
    r = json.loads(out)
    enc = tiktoken.get_encoding("o200k_base")
    assert [s["input_tokens"]["gpt-4o"] for s in r["per_sample"]] == [
        3
        + 3
        + 1
        + len(enc.encode("Summarize the ticket from Acme about a late parcel.")),  # priming, framing, role "user"
        3 + 3 + 1 + len(enc.encode("Summarize the ticket from Globex about a damaged box.")),
    ]
    assert [s["source"] for s in r["per_sample"]] == [f"{tmp_path / 'v.jsonl'}:1", f"{tmp_path / 'v.jsonl'}:3"]


@pytest.mark.parametrize(
    ("name", "content", "where", "says"),
    [
        (
            "bad.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [oops]}\n',
            3,
            "not valid JSON",
        ),
        (
            "norole.jsonl",
            '[{"role": "user", "content": "hi"}]\n[{"role": "robot", "content": "hi"}]\n',
            2,
            "role 'robot'",
        ),
        ("nomsgs.jsonl", '{"prompt": "hi"}\n', 1, '"messages"'),
        ("empty.jsonl", '{"messages": []}\n', 1, "non-empty"),
        (
            "bad.yaml",
            "- messages:\n    - {role: user, content: hi}\n- messages:\n    - {role: user, content: [1, 2}\n",
            4,
            "not valid YAML",
        ),
        (
            "role.yaml",
            "- messages:\n    - {role: user, content: hi}\n- messages:\n    - {role: wizard, content: hi}\n",
            3,
            "role 'wizard'",
        ),
    ],
)
def test_bad_sample_files_name_the_line(tmp_path: Path, name: str, content: str, where: int, says: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    rc, out, err = _run([str(path), "--models", "gpt-4o", "--requests-per-day", "10", "--output-tokens", "5"])
    assert rc == 2
    assert out == ""
    assert f"{path}:{where}:" in err and says in err, err


def test_other_input_errors(tmp_path: Path) -> None:
    s = tmp_path / "s.jsonl"
    s.write_text(
        '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n[{"role": "user", "content": "no reply"}]\n'
    )
    rc, _, err = _run([str(s), "--models", "gpt-4o", "--requests-per-day", "10"])
    assert rc == 2 and f"{s}:2:" in err and "--output-tokens" in err
    rc, _, err = _run([str(s), "--models", "gpt-4o", "--output-tokens", "5"])
    assert rc == 2 and "--requests-per-day" in err
    rc, _, err = _run(
        [str(tmp_path / "missing.jsonl"), "--models", "gpt-4o", "--requests-per-day", "1", "--output-tokens", "5"]
    )
    assert rc == 2 and "missing.jsonl: no such file" in err
    rc, _, err = _run(
        [
            str(s),
            "--models",
            "gpt-4o,gpt-4o-mini",
            "--requests-per-day",
            "1",
            "--output-tokens",
            "5",
            "--split",
            "gpt-5-nano=1",
        ]
    )
    assert rc == 2 and "--split" in err
    rc, _, err = _run([str(s), "--models", "no-such-model-xyz", "--requests-per-day", "1", "--output-tokens", "5"])
    assert rc == 2 and "no-such-model-xyz" in err
    (tmp_path / "t.txt").write_text("Hello {{name}}, about {{order}}")
    (tmp_path / "v.jsonl").write_text('{"name": "a", "order": 1}\n{"name": "b"}\n')
    rc, _, err = _run(
        [
            "--template",
            str(tmp_path / "t.txt"),
            "--vars",
            str(tmp_path / "v.jsonl"),
            "--models",
            "gpt-4o",
            "--requests-per-day",
            "1",
            "--output-tokens",
            "5",
        ]
    )
    assert rc == 2 and f"{tmp_path / 'v.jsonl'}:2:" in err and "'order'" in err
