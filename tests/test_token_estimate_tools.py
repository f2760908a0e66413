"""Tool definitions are counted as OpenAI renders them, not as their JSON.

The published case is OpenAI's own (its cookbook, "Counting tokens for chat
completions with tool calls"): the API reported 105 prompt tokens for
gpt-3.5-turbo and gpt-4 and 101 for gpt-4o and gpt-4o-mini. Encoding the JSON
overcounted it by about a third, rejecting tenants near a limit early.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from kubetoll_sidecar import tokens

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {
                    "type": "string",
                    "description": "The unit of temperature to return",
                    "enum": ["celsius", "fahrenheit"],
                },
            },
            "required": ["location"],
        },
    },
}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "reported"), [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)]
)
def test_the_published_case_is_within_5_percent(model: str, reported: int) -> None:
    estimate = tokens.count_chat(MESSAGES, model, [WEATHER_TOOL])
    assert abs(estimate - reported) <= 0.05 * reported, estimate
    # What the JSON gave, for the record: well outside the bound.
    enc = tokens.get_encoding(tokens.encoding_for_model(model).name)
    as_json = tokens.count_chat(MESSAGES, model) + len(enc.encode_ordinary(orjson.dumps([WEATHER_TOOL]).decode()))
    assert as_json > 1.05 * reported


def test_nested_and_odd_tools_are_counted_without_failing() -> None:
    nested: dict[str, Any] = {
        "type": "function",
        "function": {
            "name": "create_order",
            "parameters": {
                "type": "object",
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        },
                    },
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    }
    flat = tokens.count_chat(MESSAGES, "gpt-4o", [nested])
    assert flat > tokens.count_chat(MESSAGES, "gpt-4o")
    odd: list[Any] = [1, "x", {"type": "web_search"}, {"type": "function", "function": {"name": 3, "parameters": []}}]
    assert tokens.count_chat(MESSAGES, "gpt-4o", odd) > tokens.count_chat(MESSAGES, "gpt-4o")


def test_a_tool_set_is_counted_once_per_distinct_set() -> None:
    first = tokens.count_chat(MESSAGES, "gpt-4o", [WEATHER_TOOL])
    key = ("o200k_base", "\x00tools\x00" + orjson.dumps([WEATHER_TOOL]).decode())
    assert tokens._cache._data.get(key) == first - tokens.count_chat(MESSAGES, "gpt-4o")
