"""AnthropicTranslator: OpenAI chat <-> Anthropic Messages, requests, responses, streams, errors.

Runnable on its own: PYTHONPATH=sidecar:operator pytest tests/test_anthropic_translator.py
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from kubetoll_core.enums import FailureClass
from kubetoll_core.router_config import Backend
from kubetoll_sidecar.providers import anthropic as anthropic_mod
from kubetoll_sidecar.providers.anthropic import (
    ANTHROPIC_VERSION,
    IGNORED_OPENAI_FIELDS,
    AnthropicStreamTranslator,
    AnthropicTranslator,
)
from kubetoll_sidecar.providers.base import UnsupportedRequest, UpstreamError, Usage
from kubetoll_sidecar.sse import SSEDecoder

NOW = 1_760_000_000
MODEL = "claude-sonnet-4-5-20250929"
API_KEY = "sk-ant-api03-SECRET-test-key"


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic_mod.time, "time", lambda: NOW + 0.75)


def backend(endpoint: str = "https://api.anthropic.com", **kw: Any) -> Backend:
    return Backend(name="claude", provider="anthropic", model=MODEL, endpoint=endpoint, **kw)


def build(
    body: dict[str, Any], *, be: Backend | None = None, stream: bool = False, tr: AnthropicTranslator | None = None
) -> dict[str, Any]:
    tr = tr or AnthropicTranslator()
    req = tr.build_request(be or backend(), "chat", {"model": MODEL, **body}, API_KEY, stream)
    return orjson.loads(req.body)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string"}},
        "required": ["location"],
    },
}


# =========================================================================== build_request


class TestRequestEnvelope:
    def test_url_headers_method_and_body(self) -> None:
        req = AnthropicTranslator().build_request(
            backend(), "chat", {"model": MODEL, "messages": [user("Hello")]}, API_KEY, False
        )
        assert req.method == "POST"
        assert req.url == "https://api.anthropic.com/v1/messages"
        assert req.headers == {
            "content-type": "application/json",
            "x-api-key": API_KEY,
            "anthropic-version": "2023-06-01",
        }
        assert isinstance(req.body, bytes)
        assert orjson.loads(req.body) == {
            "model": MODEL,
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": [text("Hello")]}],
        }

    def test_version_constant(self) -> None:
        assert ANTHROPIC_VERSION == "2023-06-01"

    def test_endpoint_ending_in_v1(self) -> None:
        req = AnthropicTranslator().build_request(
            backend("https://gateway.internal:8443/anthropic/v1/"),
            "chat",
            {"model": MODEL, "messages": [user("x")]},
            API_KEY,
            False,
        )
        assert req.url == "https://gateway.internal:8443/anthropic/v1/messages"

    def test_endpoint_with_path_prefix(self) -> None:
        req = AnthropicTranslator().build_request(
            backend("http://proxy.svc:8080/anthropic"),
            "chat",
            {"model": MODEL, "messages": [user("x")]},
            API_KEY,
            False,
        )
        assert req.url == "http://proxy.svc:8080/anthropic/v1/messages"

    def test_no_api_key_no_header_and_backend_headers_added(self) -> None:
        be = backend(headers={"anthropic-beta": "prompt-caching-2024-07-31", "x-team": "search"})
        req = AnthropicTranslator().build_request(be, "chat", {"model": MODEL, "messages": [user("x")]}, None, False)
        assert req.headers == {
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "prompt-caching-2024-07-31",
            "x-team": "search",
        }

    def test_stream_flag(self) -> None:
        assert build({"messages": [user("x")], "stream": True}, stream=True)["stream"] is True
        assert "stream" not in build({"messages": [user("x")]}, stream=False)

    @pytest.mark.parametrize("endpoint", ["completions", "embeddings"])
    def test_unsupported_endpoints(self, endpoint: str) -> None:
        with pytest.raises(UnsupportedRequest, match="anthropic backends serve chat completions only"):
            AnthropicTranslator().build_request(
                backend(), endpoint, {"model": MODEL, "input": "x", "prompt": "x"}, API_KEY, False
            )

    def test_n_greater_than_one_unsupported(self) -> None:
        with pytest.raises(UnsupportedRequest, match="n must be 1"):
            build({"messages": [user("x")], "n": 2})

    def test_n_one_is_fine(self) -> None:
        assert "n" not in build({"messages": [user("x")], "n": 1})

    def test_legacy_functions_unsupported(self) -> None:
        with pytest.raises(UnsupportedRequest):
            build({"messages": [user("x")], "functions": [{"name": "f", "parameters": {}}]})

    def test_audio_output_unsupported(self) -> None:
        with pytest.raises(UnsupportedRequest, match="audio"):
            build(
                {"messages": [user("x")], "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
            )

    def test_ignored_fields_are_dropped(self) -> None:
        body = {
            "messages": [user("x")],
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 3,
            "seed": 42,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.2,
            "logit_bias": {"50256": -100},
            "store": True,
            "metadata": {"app": "bot"},
            "service_tier": "default",
            "reasoning_effort": "low",
        }
        assert set(body) - {"messages"} <= IGNORED_OPENAI_FIELDS
        assert {
            "stream_options",
            "logprobs",
            "seed",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
        } <= IGNORED_OPENAI_FIELDS
        assert build(body, stream=True) == {
            "model": MODEL,
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": [text("x")]}],
            "stream": True,
        }

    def test_messages_must_be_a_list(self) -> None:
        with pytest.raises(ValueError, match="messages"):
            build({"messages": "hello"})

    def test_only_system_messages_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="at least one user or assistant message"):
            build({"messages": [{"role": "system", "content": "You are terse."}]})

    def test_unknown_role(self) -> None:
        with pytest.raises(ValueError, match="'robot'"):
            build({"messages": [{"role": "robot", "content": "beep"}]})


class TestSamplingParameters:
    def test_max_tokens_sources(self) -> None:
        msgs = [user("x")]
        assert build({"messages": msgs, "max_completion_tokens": 300, "max_tokens": 100})["max_tokens"] == 300
        assert build({"messages": msgs, "max_tokens": 100})["max_tokens"] == 100
        assert build({"messages": msgs}, be=backend(limits={"maxOutputTokens": 64000}))["max_tokens"] == 64000
        assert (
            build({"messages": msgs, "max_tokens": 10}, be=backend(limits={"maxOutputTokens": 64000}))["max_tokens"]
            == 10
        )
        assert build({"messages": msgs})["max_tokens"] == 4096
        assert build({"messages": msgs, "max_tokens": None})["max_tokens"] == 4096

    @pytest.mark.parametrize(("given", "sent"), [(0, 0), (0.3, 0.3), (1, 1), (1.0, 1.0), (1.7, 1.0), (2, 1.0)])
    def test_temperature_clamped_to_one(self, given: float, sent: float) -> None:
        p = build({"messages": [user("x")], "temperature": given})
        assert p["temperature"] == sent
        assert type(p["temperature"]) is type(sent)

    def test_top_p_stop_user(self) -> None:
        p = build({"messages": [user("x")], "top_p": 0.9, "stop": "\n\nHuman:", "user": "tenant-a/user-17"})
        assert p["top_p"] == 0.9
        assert p["stop_sequences"] == ["\n\nHuman:"]
        assert p["metadata"] == {"user_id": "tenant-a/user-17"}

    def test_stop_list(self) -> None:
        assert build({"messages": [user("x")], "stop": ["END", "###"]})["stop_sequences"] == ["END", "###"]
        assert "stop_sequences" not in build({"messages": [user("x")], "stop": []})
        assert "stop_sequences" not in build({"messages": [user("x")], "stop": None})

    def test_absent_parameters_not_sent(self) -> None:
        p = build({"messages": [user("x")]})
        for key in ("temperature", "top_p", "stop_sequences", "metadata", "tools", "tool_choice", "system"):
            assert key not in p


class TestMessages:
    def test_system_and_developer_merged_in_order(self) -> None:
        p = build(
            {
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "developer", "content": [text("Answer in French."), text("Be brief.")]},
                    user("Hi"),
                    {"role": "assistant", "content": "Bonjour !"},
                    {"role": "system", "content": "The user is an admin."},
                    user("What's new?"),
                ]
            }
        )
        assert p["system"] == [
            text("You are a helpful assistant."),
            text("Answer in French."),
            text("Be brief."),
            text("The user is an admin."),
        ]
        assert p["messages"] == [
            {"role": "user", "content": [text("Hi")]},
            {"role": "assistant", "content": [text("Bonjour !")]},
            {"role": "user", "content": [text("What's new?")]},
        ]

    def test_system_cache_control_passed_through(self) -> None:
        part = {"type": "text", "text": "long policy", "cache_control": {"type": "ephemeral"}}
        p = build({"messages": [{"role": "system", "content": [part]}, user("x")]})
        assert p["system"] == [{"type": "text", "text": "long policy", "cache_control": {"type": "ephemeral"}}]

    def test_system_with_image_rejected(self) -> None:
        with pytest.raises(ValueError, match="only text"):
            build(
                {
                    "messages": [
                        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                        user("x"),
                    ]
                }
            )

    def test_consecutive_same_role_messages_merge(self) -> None:
        p = build(
            {
                "messages": [
                    user("first"),
                    {"role": "user", "content": [text("second"), text("third")]},
                    {"role": "assistant", "content": "a1"},
                    {"role": "assistant", "content": [text("a2")]},
                    user("last"),
                ]
            }
        )
        assert p["messages"] == [
            {"role": "user", "content": [text("first"), text("second"), text("third")]},
            {"role": "assistant", "content": [text("a1"), text("a2")]},
            {"role": "user", "content": [text("last")]},
        ]

    def test_empty_messages_dropped_and_neighbours_merged(self) -> None:
        p = build(
            {
                "messages": [
                    user("one"),
                    {"role": "assistant", "content": ""},
                    user("two"),
                ]
            }
        )
        assert p["messages"] == [{"role": "user", "content": [text("one"), text("two")]}]

    def test_tool_round_trip_merges_results_and_next_user_message(self) -> None:
        p = build(
            {
                "messages": [
                    user("Weather in Paris and Rome?"),
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "toolu_01A",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                            },
                            {
                                "id": "toolu_01B",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"location":"Rome"}'},
                            },
                        ],
                    },
                    {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C, cloudy"},
                    {"role": "tool", "tool_call_id": "toolu_01B", "content": [text("24C"), text("sunny")]},
                    user("And in Celsius please."),
                ],
                "tools": [WEATHER_TOOL],
            }
        )
        assert p["messages"] == [
            {"role": "user", "content": [text("Weather in Paris and Rome?")]},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"location": "Paris"}},
                    {"type": "tool_use", "id": "toolu_01B", "name": "get_weather", "input": {"location": "Rome"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C, cloudy"},
                    {"type": "tool_result", "tool_use_id": "toolu_01B", "content": [text("24C"), text("sunny")]},
                    text("And in Celsius please."),
                ],
            },
        ]
        assert p["tools"] == [WEATHER_TOOL_ANTHROPIC]

    def test_assistant_text_before_tool_use(self) -> None:
        p = build(
            {
                "messages": [
                    user("q"),
                    {
                        "role": "assistant",
                        "content": "Let me check.",
                        "tool_calls": [
                            {"id": "toolu_1", "type": "function", "function": {"name": "now", "arguments": ""}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
                ]
            }
        )
        assert p["messages"][1] == {
            "role": "assistant",
            "content": [text("Let me check."), {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}],
        }
        assert p["messages"][2] == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12:00"}],
        }

    def test_tool_results_first_in_merged_user_message(self) -> None:
        # A user message before the tool message (an unusual but valid-looking history):
        # Anthropic wants the tool_result blocks first in the merged turn.
        p = build(
            {
                "messages": [
                    user("q"),
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                    user("hurry"),
                    {"role": "tool", "tool_call_id": "t1", "content": "done"},
                ]
            }
        )
        assert p["messages"][2] == {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done"}, text("hurry")],
        }

    @pytest.mark.parametrize("arguments", ['{"location": "Paris"', "not json", "{'a': 1}"])
    def test_invalid_tool_arguments_raise(self, arguments: str) -> None:
        with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not valid JSON"):
            build(
                {
                    "messages": [
                        user("q"),
                        {
                            "role": "assistant",
                            "tool_calls": [
                                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": arguments}}
                            ],
                        },
                    ]
                }
            )

    @pytest.mark.parametrize("arguments", ["[1, 2]", '"Paris"', "3"])
    def test_tool_arguments_must_be_an_object(self, arguments: str) -> None:
        with pytest.raises(ValueError, match="must be a JSON object"):
            build(
                {
                    "messages": [
                        user("q"),
                        {
                            "role": "assistant",
                            "tool_calls": [
                                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": arguments}}
                            ],
                        },
                    ]
                }
            )

    def test_tool_call_without_id_or_name(self) -> None:
        with pytest.raises(ValueError, match="needs an id"):
            build(
                {
                    "messages": [
                        user("q"),
                        {
                            "role": "assistant",
                            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                        },
                    ]
                }
            )
        with pytest.raises(ValueError, match="function.name"):
            build(
                {
                    "messages": [
                        user("q"),
                        {
                            "role": "assistant",
                            "tool_calls": [{"id": "t", "type": "function", "function": {"arguments": "{}"}}],
                        },
                    ]
                }
            )

    def test_tool_message_needs_tool_call_id(self) -> None:
        with pytest.raises(ValueError, match="tool_call_id"):
            build({"messages": [user("q"), {"role": "tool", "content": "x"}]})

    def test_images(self) -> None:
        p = build(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            text("What is in these images?"),
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==",
                                    "detail": "high",
                                },
                            },
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg"
                                },
                            },
                        ],
                    }
                ]
            }
        )
        assert p["messages"] == [
            {
                "role": "user",
                "content": [
                    text("What is in these images?"),
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgoAAAANSUhEUg=="},
                    },
                    {
                        "type": "image",
                        "source": {
                            "type": "url",
                            "url": "https://upload.wikimedia.org/wikipedia/commons/a/a7/Camponotus_flavomarginatus_ant.jpg",
                        },
                    },
                ],
            }
        ]

    @pytest.mark.parametrize(
        "url", ["data:image/png,rawbytes", "data:;base64,AAAA", "ftp://example.com/cat.png", "cat.png"]
    )
    def test_bad_image_urls(self, url: str) -> None:
        with pytest.raises(ValueError):
            build({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})

    def test_pdf_file_part(self) -> None:
        p = build(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "file",
                                "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQ="},
                            },
                            text("Summarise."),
                        ],
                    }
                ]
            }
        )
        assert p["messages"][0]["content"] == [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}},
            text("Summarise."),
        ]

    def test_file_id_and_audio_unsupported(self) -> None:
        with pytest.raises(UnsupportedRequest, match="file"):
            build({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}]})
        with pytest.raises(UnsupportedRequest, match="audio"):
            build(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
                        }
                    ]
                }
            )

    def test_unknown_content_part(self) -> None:
        with pytest.raises(ValueError, match="'video'"):
            build({"messages": [{"role": "user", "content": [{"type": "video"}]}]})


class TestTools:
    MSGS = [user("Weather in Paris?")]

    def test_tool_without_description_or_parameters(self) -> None:
        p = build({"messages": self.MSGS, "tools": [{"type": "function", "function": {"name": "now"}}]})
        assert p["tools"] == [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]
        assert "tool_choice" not in p

    def test_non_function_tool_unsupported(self) -> None:
        with pytest.raises(UnsupportedRequest, match="function tools only"):
            build({"messages": self.MSGS, "tools": [{"type": "custom", "custom": {"name": "x"}}]})

    @pytest.mark.parametrize(
        ("openai", "anthropic"),
        [
            ("auto", {"type": "auto"}),
            ("required", {"type": "any"}),
            ("none", {"type": "none"}),
            ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
        ],
    )
    def test_tool_choice(self, openai: Any, anthropic: dict[str, Any]) -> None:
        p = build({"messages": self.MSGS, "tools": [WEATHER_TOOL], "tool_choice": openai})
        assert p["tool_choice"] == anthropic
        assert p["tools"] == [WEATHER_TOOL_ANTHROPIC]

    @pytest.mark.parametrize(
        ("openai", "anthropic"),
        [
            (None, {"type": "auto", "disable_parallel_tool_use": True}),
            ("auto", {"type": "auto", "disable_parallel_tool_use": True}),
            ("required", {"type": "any", "disable_parallel_tool_use": True}),
            (
                {"type": "function", "function": {"name": "get_weather"}},
                {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            ),
            ("none", {"type": "none"}),
        ],
    )
    def test_parallel_tool_calls_false(self, openai: Any, anthropic: dict[str, Any]) -> None:
        body: dict[str, Any] = {"messages": self.MSGS, "tools": [WEATHER_TOOL], "parallel_tool_calls": False}
        if openai is not None:
            body["tool_choice"] = openai
        assert build(body)["tool_choice"] == anthropic

    def test_parallel_tool_calls_true_changes_nothing(self) -> None:
        assert "tool_choice" not in build({"messages": self.MSGS, "tools": [WEATHER_TOOL], "parallel_tool_calls": True})

    def test_tool_choice_without_tools_dropped(self) -> None:
        p = build({"messages": self.MSGS, "tool_choice": "auto", "parallel_tool_calls": False})
        assert "tool_choice" not in p and "tools" not in p

    def test_bad_tool_choice(self) -> None:
        with pytest.raises(ValueError, match="tool_choice"):
            build({"messages": self.MSGS, "tools": [WEATHER_TOOL], "tool_choice": "sometimes"})


# =========================================================================== JSON response mode

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


class TestJsonResponseRequest:
    def test_json_schema_becomes_forced_tool(self) -> None:
        tr = AnthropicTranslator()
        p = build(
            {
                "messages": [user("Largest city in France?")],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "city_info", "strict": True, "schema": CITY_SCHEMA},
                },
            },
            tr=tr,
        )
        assert p["tools"] == [
            {
                "name": "city_info",
                "description": "Give your final answer by calling this tool; its input is the JSON response.",
                "input_schema": CITY_SCHEMA,
            }
        ]
        assert p["tool_choice"] == {"type": "tool", "name": "city_info", "disable_parallel_tool_use": True}
        assert tr.json_response_tool == "city_info"

    def test_json_schema_description_and_unnamed(self) -> None:
        tr = AnthropicTranslator()
        p = build(
            {
                "messages": [user("x")],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"description": "A city.", "schema": CITY_SCHEMA},
                },
            },
            tr=tr,
        )
        assert p["tools"] == [{"name": "json_response", "description": "A city.", "input_schema": CITY_SCHEMA}]
        assert tr.json_response_tool == "json_response"

    def test_json_object(self) -> None:
        tr = AnthropicTranslator()
        p = build({"messages": [user("x")], "response_format": {"type": "json_object"}}, tr=tr)
        assert p["tools"][0]["name"] == "json_response"
        assert p["tools"][0]["input_schema"] == {"type": "object"}
        assert p["tool_choice"] == {"type": "tool", "name": "json_response", "disable_parallel_tool_use": True}

    def test_text_format_is_nothing(self) -> None:
        tr = AnthropicTranslator()
        p = build({"messages": [user("x")], "response_format": {"type": "text"}}, tr=tr)
        assert "tools" not in p and tr.json_response_tool is None

    def test_with_client_tools_the_model_must_use_some_tool(self) -> None:
        tr = AnthropicTranslator()
        p = build(
            {
                "messages": [user("x")],
                "tools": [WEATHER_TOOL],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "get_weather", "schema": CITY_SCHEMA},
                },
            },
            tr=tr,
        )
        # The schema name collides with a client tool: the JSON tool falls back to json_response.
        assert [t["name"] for t in p["tools"]] == ["get_weather", "json_response"]
        assert p["tool_choice"] == {"type": "any"}
        assert tr.json_response_tool == "json_response"

    def test_with_client_tools_and_tool_choice_none(self) -> None:
        p = build(
            {
                "messages": [user("x")],
                "tools": [WEATHER_TOOL],
                "tool_choice": "none",
                "response_format": {"type": "json_object"},
            }
        )
        assert p["tool_choice"] == {"type": "tool", "name": "json_response", "disable_parallel_tool_use": True}

    def test_unknown_response_format(self) -> None:
        with pytest.raises(ValueError, match="response_format"):
            build({"messages": [user("x")], "response_format": {"type": "yaml"}})

    def test_state_is_reset_per_build(self) -> None:
        tr = AnthropicTranslator()
        build({"messages": [user("x")], "response_format": {"type": "json_object"}}, tr=tr)
        build({"messages": [user("x")]}, tr=tr)
        assert tr.json_response_tool is None


# =========================================================================== parse_response


def anthropic_message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", usage: dict[str, Any] | None = None
) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage
            or {
                "input_tokens": 2095,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 503,
            },
        }
    )


class TestParseResponse:
    def test_text_message_with_cache_usage(self) -> None:
        body = anthropic_message(
            [
                {"type": "thinking", "thinking": "The user greets me.", "signature": "EqQBCgIYAhIM..."},
                {"type": "text", "text": "Hi! My name is Claude."},
                {"type": "text", "text": " How can I help?"},
            ],
            usage={
                "input_tokens": 50,
                "cache_creation_input_tokens": 248,
                "cache_read_input_tokens": 1800,
                "output_tokens": 12,
                "service_tier": "standard",
            },
        )
        out, usage = AnthropicTranslator().parse_response("chat", body, "support-bot")
        assert out == {
            "id": "chatcmpl-msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "object": "chat.completion",
            "created": NOW,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi! My name is Claude. How can I help?"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": 2098,
                "completion_tokens": 12,
                "total_tokens": 2110,
                "prompt_tokens_details": {"cached_tokens": 1800},
            },
        }
        assert usage == Usage(prompt_tokens=2098, completion_tokens=12, cached_tokens=1800, cache_write_tokens=248)
        assert usage.reported is True

    def test_null_cache_fields(self) -> None:
        body = anthropic_message(
            [text("ok")],
            usage={
                "input_tokens": 10,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
                "output_tokens": 2,
            },
        )
        out, usage = AnthropicTranslator().parse_response("chat", body, "m")
        assert usage == Usage(prompt_tokens=10, completion_tokens=2)
        assert out["usage"] == {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 0},
        }

    def test_tool_use(self) -> None:
        body = anthropic_message(
            [
                {"type": "text", "text": "I'll check the weather in both cities."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA"},
                },
                {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}},
            ],
            stop_reason="tool_use",
        )
        out, _ = AnthropicTranslator().parse_response("chat", body, "m")
        assert out["choices"][0] == {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "I'll check the weather in both cities.",
                "tool_calls": [
                    {
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"San Francisco, CA"}'},
                    },
                    {"id": "toolu_01B", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            "finish_reason": "tool_calls",
            "logprobs": None,
        }

    def test_tool_use_only_has_null_content(self) -> None:
        body = anthropic_message(
            [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1, 2]}}], stop_reason="tool_use"
        )
        out, _ = AnthropicTranslator().parse_response("chat", body, "m")
        msg = out["choices"][0]["message"]
        assert msg["content"] is None
        assert msg["tool_calls"][0]["function"]["arguments"] == '{"a":[1,2]}'

    @pytest.mark.parametrize(
        ("stop_reason", "finish"),
        [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
            ("model_context_window_exceeded", "length"),
        ],
    )
    def test_stop_reasons(self, stop_reason: str, finish: str) -> None:
        out, _ = AnthropicTranslator().parse_response("chat", anthropic_message([text("x")], stop_reason), "m")
        assert out["choices"][0]["finish_reason"] == finish

    def test_json_mode_response(self) -> None:
        tr = AnthropicTranslator()
        build(
            {
                "messages": [user("x")],
                "response_format": {"type": "json_schema", "json_schema": {"name": "city_info", "schema": CITY_SCHEMA}},
            },
            tr=tr,
        )
        body = anthropic_message(
            [
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "city_info",
                    "input": {"city": "Paris", "population": 2102650},
                }
            ],
            stop_reason="tool_use",
        )
        out, _ = tr.parse_response("chat", body, "m")
        assert out["choices"][0]["message"] == {"role": "assistant", "content": '{"city":"Paris","population":2102650}'}
        assert out["choices"][0]["finish_reason"] == "stop"
        assert orjson.loads(out["choices"][0]["message"]["content"]) == {"city": "Paris", "population": 2102650}

    def test_json_mode_client_tool_called_instead(self) -> None:
        tr = AnthropicTranslator()
        build({"messages": [user("x")], "tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}, tr=tr)
        body = anthropic_message(
            [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"location": "Paris"}}],
            stop_reason="tool_use",
        )
        out, _ = tr.parse_response("chat", body, "m")
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        assert out["choices"][0]["message"]["content"] is None
        assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"

    def test_json_mode_cut_by_max_tokens(self) -> None:
        tr = AnthropicTranslator()
        build({"messages": [user("x")], "response_format": {"type": "json_object"}}, tr=tr)
        body = anthropic_message(
            [{"type": "tool_use", "id": "t1", "name": "json_response", "input": {}}], stop_reason="max_tokens"
        )
        out, _ = tr.parse_response("chat", body, "m")
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["choices"][0]["message"]["content"] == "{}"

    def test_without_json_mode_a_tool_named_json_response_is_a_tool_call(self) -> None:
        body = anthropic_message(
            [{"type": "tool_use", "id": "t1", "name": "json_response", "input": {}}], stop_reason="tool_use"
        )
        out, _ = AnthropicTranslator().parse_response("chat", body, "m")
        assert out["choices"][0]["finish_reason"] == "tool_calls"

    def test_not_json(self) -> None:
        with pytest.raises(ValueError, match="not JSON"):
            AnthropicTranslator().parse_response("chat", b"<html>oops</html>", "m")

    def test_other_endpoints(self) -> None:
        with pytest.raises(UnsupportedRequest):
            AnthropicTranslator().parse_response("embeddings", anthropic_message([text("x")]), "m")

    def test_openai_sdk_accepts_output(self) -> None:
        openai_types = pytest.importorskip("openai.types.chat")
        body = anthropic_message(
            [
                text("Checking."),
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"location": "Paris"}},
            ],
            stop_reason="tool_use",
        )
        out, _ = AnthropicTranslator().parse_response("chat", body, "m")
        parsed = openai_types.ChatCompletion.model_validate(out)
        assert parsed.choices[0].message.tool_calls[0].function.arguments == '{"location":"Paris"}'
        assert parsed.usage.prompt_tokens_details.cached_tokens == 0


# =========================================================================== streams

TEXT_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", w\xc3\xb6rld!"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}

event: message_stop
data: {"type":"message_stop"}

"""

TOOL_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"The user wants weather."}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Okay, let's check."}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\":"}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":" \\"San Fra"}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"ncisco, CA\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: content_block_start
data: {"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"toolu_02","name":"get_time","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":3}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

JSON_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_json","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":600,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_json","name":"city_info","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\\"city\\": \\"Par"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"is\\", \\"population\\": 2102650}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":40}}

event: message_stop
data: {"type":"message_stop"}

"""

ERROR_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_err","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":300,"output_tokens":1}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Partial"}}

event: error
data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

"""

SIZES = (1, 7, 3, 50, 13, 200, 2, 31)


def run_stream(
    transcript: bytes, st: AnthropicStreamTranslator, sizes: tuple[int, ...] = SIZES
) -> list[dict[str, Any]]:
    """Feeds `transcript` through an SSEDecoder in irregular pieces, then the translator."""
    decoder = SSEDecoder()
    chunks: list[dict[str, Any]] = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(transcript):
            break
        for event, data in decoder.feed(transcript[pos : pos + size]):
            chunks.extend(st.feed(event, data))
        pos += size
    for event, data in decoder.flush():
        chunks.extend(st.feed(event, data))
    return chunks


def chunk(id_: str, delta: dict[str, Any], finish: str | None = None, *, usage_field: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage_field:
        c["usage"] = None
    return c


def emitted(chunks: list[dict[str, Any]]) -> str:
    """The content and tool-call arguments the chunks carry to the client, in order."""
    pieces = []
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            pieces.append(delta.get("content") or "")
            pieces.extend(tc["function"].get("arguments") or "" for tc in delta.get("tool_calls") or ())
    return "".join(pieces)


class TestStream:
    def test_text_stream_with_usage(self) -> None:
        st = AnthropicTranslator().stream_translator("support-bot", include_usage=True)
        chunks = run_stream(TEXT_STREAM, st)
        cid = "chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
        assert chunks == [
            chunk(cid, {"role": "assistant", "content": ""}, usage_field=True),
            chunk(cid, {"content": "Hello"}, usage_field=True),
            chunk(cid, {"content": ", wörld!"}, usage_field=True),
            chunk(cid, {}, "stop", usage_field=True),
            {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": NOW,
                "model": MODEL,
                "choices": [],
                "usage": {
                    "prompt_tokens": 2125,
                    "completion_tokens": 15,
                    "total_tokens": 2140,
                    "prompt_tokens_details": {"cached_tokens": 2000},
                },
            },
        ]
        assert st.done is True
        assert st.error() is None
        assert st.text_chars == len("Hello") + len(", wörld!")
        assert st.text == ["Hello", ", wörld!"]
        assert st.usage == Usage(prompt_tokens=2125, completion_tokens=15, cached_tokens=2000, cache_write_tokens=100)

    @pytest.mark.parametrize("sizes", [(1,), (4096,), (5, 1, 17), (64, 3)])
    def test_chunking_does_not_matter(self, sizes: tuple[int, ...]) -> None:
        reference = run_stream(TEXT_STREAM, AnthropicTranslator().stream_translator("m", False), (len(TEXT_STREAM),))
        assert run_stream(TEXT_STREAM, AnthropicTranslator().stream_translator("m", False), sizes) == reference

    def test_crlf_transcript(self) -> None:
        reference = run_stream(TEXT_STREAM, AnthropicTranslator().stream_translator("m", False))
        assert (
            run_stream(TEXT_STREAM.replace(b"\n", b"\r\n"), AnthropicTranslator().stream_translator("m", False))
            == reference
        )

    def test_text_stream_without_usage(self) -> None:
        st = AnthropicTranslator().stream_translator("support-bot", include_usage=False)
        chunks = run_stream(TEXT_STREAM, st)
        assert len(chunks) == 4
        assert all("usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert st.done is True
        # Usage is still kept for billing even when the client did not ask for it.
        assert st.usage == Usage(prompt_tokens=2125, completion_tokens=15, cached_tokens=2000, cache_write_tokens=100)

    def test_tool_use_stream(self) -> None:
        st = AnthropicTranslator().stream_translator("m", include_usage=False)
        chunks = run_stream(TOOL_STREAM, st)
        cid = "chatcmpl-msg_014p7gG3wDgGV9EUtLvnow3U"
        assert chunks == [
            chunk(cid, {"role": "assistant", "content": ""}),
            chunk(cid, {"content": "Okay, let's check."}),
            chunk(
                cid,
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
            ),
            chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}),
            chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": ' "San Fra'}}]}),
            chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": 'ncisco, CA"}'}}]}),
            chunk(
                cid,
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "toolu_02",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": ""},
                        }
                    ]
                },
            ),
            chunk(cid, {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
            chunk(cid, {}, "tool_calls"),
        ]
        args = "".join(
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
            for c in chunks
            if "tool_calls" in c["choices"][0]["delta"] and c["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
        )
        assert orjson.loads(args) == {"location": "San Francisco, CA"}
        assert st.text_chars == len("Okay, let's check.") + len('{"location": "San Francisco, CA"}') + len("{}")
        # What a cut stream is billed by: the content and the tool arguments, in order (not the tool names).
        assert st.text == ["Okay, let's check.", '{"location":', ' "San Fra', 'ncisco, CA"}', "{}"]
        assert "".join(st.text) == emitted(chunks)
        assert st.usage == Usage(prompt_tokens=472, completion_tokens=89)
        assert st.done

    def test_json_mode_stream(self) -> None:
        tr = AnthropicTranslator()
        build(
            {
                "messages": [user("x")],
                "response_format": {"type": "json_schema", "json_schema": {"name": "city_info", "schema": CITY_SCHEMA}},
            },
            tr=tr,
        )
        st = tr.stream_translator("m", include_usage=False)
        assert st is not tr.stream_translator("m", include_usage=False)
        chunks = run_stream(JSON_STREAM, st)
        cid = "chatcmpl-msg_json"
        assert chunks == [
            chunk(cid, {"role": "assistant", "content": ""}),
            chunk(cid, {"content": '{"city": "Par'}),
            chunk(cid, {"content": 'is", "population": 2102650}'}),
            chunk(cid, {}, "stop"),
        ]
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert orjson.loads(content) == {"city": "Paris", "population": 2102650}
        assert st.text_chars == len(content)
        assert "".join(st.text) == content == emitted(chunks)

    def test_json_stream_without_json_mode_is_a_tool_call(self) -> None:
        chunks = run_stream(JSON_STREAM, AnthropicTranslator().stream_translator("m", False))
        assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "city_info"
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    def test_error_event(self) -> None:
        st = AnthropicTranslator().stream_translator("m", include_usage=True)
        chunks = run_stream(ERROR_STREAM, st)
        assert [c["choices"][0]["delta"] for c in chunks] == [
            {"role": "assistant", "content": ""},
            {"content": "Partial"},
        ]
        assert st.done is False
        err = st.error()
        assert isinstance(err, UpstreamError)
        assert err.failure is FailureClass.server_error
        assert err.status == 529
        assert err.openai_error == {
            "message": "Overloaded",
            "type": "server_error",
            "code": "overloaded_error",
            "param": None,
        }
        assert st.usage == Usage(prompt_tokens=300, completion_tokens=1)
        assert st.text_chars == len("Partial")
        assert st.text == ["Partial"]

    def test_error_event_feed_returns_nothing(self) -> None:
        st = AnthropicStreamTranslator("m", include_usage=False)
        assert (
            st.feed("error", b'{"type":"error","error":{"type":"api_error","message":"Internal server error"}}') == []
        )
        err = st.error()
        assert err is not None and err.failure is FailureClass.server_error and err.status == 500

    @pytest.mark.parametrize(
        ("etype", "failure", "status"),
        [
            ("rate_limit_error", FailureClass.rate_limited, 429),
            ("overloaded_error", FailureClass.server_error, 529),
            ("api_error", FailureClass.server_error, 500),
            ("invalid_request_error", None, 400),
        ],
    )
    def test_error_event_classes(self, etype: str, failure: FailureClass | None, status: int) -> None:
        st = AnthropicStreamTranslator("m", include_usage=False)
        st.feed(None, orjson.dumps({"type": "error", "error": {"type": etype, "message": "boom"}}))
        err = st.error()
        assert err is not None and err.failure == failure and err.status == status

    def test_cut_stream_keeps_input_usage(self) -> None:
        cut = TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_stop")]
        st = AnthropicTranslator().stream_translator("m", include_usage=True)
        chunks = run_stream(cut, st)
        assert [c["choices"][0]["delta"] for c in chunks] == [
            {"role": "assistant", "content": ""},
            {"content": "Hello"},
            {"content": ", wörld!"},
        ]
        assert st.done is False
        assert st.error() is None
        assert st.usage == Usage(prompt_tokens=2125, completion_tokens=1, cached_tokens=2000, cache_write_tokens=100)
        assert st.text_chars == 13
        # The output of a cut stream is counted from this.
        assert "".join(st.text) == "Hello, wörld!" == emitted(chunks)

    def test_cut_mid_event_is_flushed_not_crashing(self) -> None:
        cut = TOOL_STREAM[: TOOL_STREAM.index(b"ncisco, CA")]
        st = AnthropicTranslator().stream_translator("m", include_usage=False)
        run_stream(cut, st)
        # the half event is malformed JSON: reported as a server error, never raised
        assert st.done is False
        err = st.error()
        assert err is not None and err.failure is FailureClass.server_error
        assert st.usage == Usage(prompt_tokens=472, completion_tokens=2)

    def test_stream_events_without_event_names(self) -> None:
        # Some proxies strip `event:` lines; the data's own `type` is enough.
        stripped = b"\n".join(line for line in TEXT_STREAM.split(b"\n") if not line.startswith(b"event:"))
        reference = run_stream(TEXT_STREAM, AnthropicTranslator().stream_translator("m", True))
        assert run_stream(stripped, AnthropicTranslator().stream_translator("m", True)) == reference

    def test_message_delta_cumulative_input_tokens(self) -> None:
        st = AnthropicStreamTranslator("m", include_usage=False)
        st.feed(
            "message_start",
            b'{"type":"message_start","message":{"id":"msg_x","model":"claude-x","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}',
        )
        st.feed(
            "message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":12,"cache_read_input_tokens":null,"output_tokens":30}}',
        )
        assert st.usage == Usage(prompt_tokens=17, completion_tokens=30, cached_tokens=5)

    def test_events_after_stop_ignored(self) -> None:
        st = AnthropicTranslator().stream_translator("m", include_usage=False)
        run_stream(TEXT_STREAM, st)
        assert (
            st.feed(
                "content_block_delta",
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"late"}}',
            )
            == []
        )

    def test_model_alias_fallback_before_message_start(self) -> None:
        st = AnthropicStreamTranslator("support-bot", include_usage=False)
        out = st.feed(
            "content_block_delta", b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}'
        )
        assert out[0]["model"] == "support-bot"
        assert out[0]["id"].startswith("chatcmpl-")

    def test_openai_sdk_accepts_chunks(self) -> None:
        openai_types = pytest.importorskip("openai.types.chat")
        for c in run_stream(TOOL_STREAM, AnthropicTranslator().stream_translator("m", True)) + run_stream(
            TEXT_STREAM, AnthropicTranslator().stream_translator("m", True)
        ):
            openai_types.ChatCompletionChunk.model_validate(c)


# =========================================================================== classify_error


def err_body(etype: str, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": etype, "message": message}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}
    )


class TestClassifyError:
    def classify(self, status: int, body: bytes, headers: Any = None) -> UpstreamError:
        return AnthropicTranslator().classify_error(status, headers or {}, body)

    def test_rate_limited_with_retry_after(self) -> None:
        e = self.classify(
            429,
            err_body(
                "rate_limit_error",
                "This request would exceed the rate limit for your organization of 50 requests per minute.",
            ),
            {"retry-after": "17", "anthropic-ratelimit-requests-remaining": "0"},
        )
        assert e.status == 429
        assert e.failure is FailureClass.rate_limited
        assert e.retry_after == 17.0
        assert e.openai_error == {
            "message": "This request would exceed the rate limit for your organization of 50 requests per minute.",
            "type": "rate_limit_error",
            "code": "rate_limit_error",
            "param": None,
        }

    def test_retry_after_header_case_and_fraction(self) -> None:
        assert self.classify(429, err_body("rate_limit_error", "slow down"), {"Retry-After": "1.5"}).retry_after == 1.5

    def test_retry_after_http_date(self) -> None:
        e = self.classify(
            429, err_body("rate_limit_error", "slow down"), {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}
        )
        assert e.retry_after == 0.0  # in the past

    def test_retry_after_garbage_ignored(self) -> None:
        assert self.classify(429, err_body("rate_limit_error", "x"), {"retry-after": "soon"}).retry_after is None

    def test_retry_after_with_multidict(self) -> None:
        multidict = pytest.importorskip("multidict")
        headers = multidict.CIMultiDict({"Retry-After": "3"})
        assert self.classify(429, err_body("rate_limit_error", "x"), headers).retry_after == 3.0

    def test_no_retry_after(self) -> None:
        assert self.classify(429, err_body("rate_limit_error", "x")).retry_after is None

    def test_overloaded_529(self) -> None:
        e = self.classify(529, err_body("overloaded_error", "Overloaded"))
        assert e.failure is FailureClass.server_error
        assert e.openai_error == {
            "message": "Overloaded",
            "type": "server_error",
            "code": "overloaded_error",
            "param": None,
        }

    @pytest.mark.parametrize(("status", "etype"), [(500, "api_error"), (504, "timeout_error"), (503, "api_error")])
    def test_server_errors(self, status: int, etype: str) -> None:
        e = self.classify(status, err_body(etype, "Internal server error"))
        assert e.failure is FailureClass.server_error
        assert e.openai_error["type"] == "server_error"
        assert e.openai_error["code"] == etype

    def test_prompt_too_long(self) -> None:
        e = self.classify(400, err_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"))
        assert e.failure is FailureClass.context_length_exceeded
        assert e.openai_error == {
            "message": "prompt is too long: 210000 tokens > 200000 maximum",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "param": None,
        }

    def test_input_plus_max_tokens_exceeds_context(self) -> None:
        e = self.classify(
            400,
            err_body(
                "invalid_request_error",
                "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000, decrease input length or `max_tokens` and try again",
            ),
        )
        assert e.failure is FailureClass.context_length_exceeded

    def test_request_too_large_413(self) -> None:
        e = self.classify(413, err_body("request_too_large", "Request exceeds the maximum allowed number of bytes."))
        assert e.failure is FailureClass.context_length_exceeded
        assert e.openai_error["code"] == "request_too_large"

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (402, err_body("billing_error", "Payment required.")),
            (400, err_body("billing_error", "Your account has no payment method.")),
            (
                400,
                err_body(
                    "invalid_request_error",
                    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                ),
            ),
            (402, b"Payment Required"),
        ],
    )
    def test_budget_exhausted(self, status: int, body: bytes) -> None:
        e = self.classify(status, body)
        assert e.failure is FailureClass.budget_exhausted
        assert e.openai_error["type"] == "insufficient_quota"

    @pytest.mark.parametrize(
        ("status", "etype", "openai_type"),
        [
            (401, "authentication_error", "authentication_error"),
            (403, "permission_error", "permission_error"),
            (404, "not_found_error", "invalid_request_error"),
            (400, "invalid_request_error", "invalid_request_error"),
        ],
    )
    def test_client_errors_not_retried(self, status: int, etype: str, openai_type: str) -> None:
        e = self.classify(status, err_body(etype, f"{etype} happened"))
        assert e.failure is None
        assert e.status == status
        assert e.openai_error == {"message": f"{etype} happened", "type": openai_type, "code": etype, "param": None}
        assert e.message == f"anthropic HTTP {status} {etype}: {etype} happened"

    def test_plain_invalid_request_is_not_context(self) -> None:
        e = self.classify(
            400, err_body("invalid_request_error", 'messages: roles must alternate between "user" and "assistant"')
        )
        assert e.failure is None

    def test_non_json_body(self) -> None:
        html = b"<html><head><title>502 Bad Gateway</title></head><body>" + b"x" * 5000 + b"</body></html>"
        e = self.classify(502, html)
        assert e.failure is FailureClass.server_error
        assert e.message.startswith("anthropic returned HTTP 502: <html><head><title>502 Bad Gateway</title>")
        snippet = e.message.removeprefix("anthropic returned HTTP 502: ")
        assert len(snippet) == 200
        assert e.openai_error["message"] == e.message
        assert e.openai_error["type"] == "server_error"
        assert e.openai_error["code"] is None

    def test_non_json_client_error(self) -> None:
        e = self.classify(401, b"Unauthorized\n")
        assert e.failure is None
        assert e.message == "anthropic returned HTTP 401: Unauthorized"
        assert e.openai_error == {"message": e.message, "type": "authentication_error", "code": None, "param": None}

    def test_empty_body(self) -> None:
        e = self.classify(503, b"")
        assert e.failure is FailureClass.server_error
        assert e.message == "anthropic returned HTTP 503 with an empty body"

    def test_invalid_utf8_body(self) -> None:
        e = self.classify(500, b"\xff\xfe\x00garbage")
        assert e.failure is FailureClass.server_error
        assert "HTTP 500" in e.message

    def test_secrets_and_headers_not_in_messages(self) -> None:
        headers = {"retry-after": "2", "request-id": "req_SECRETISH", "x-api-key": API_KEY, "set-cookie": "session=abc"}
        for status, body in [
            (429, err_body("rate_limit_error", "slow")),
            (500, b"oops"),
            (401, err_body("authentication_error", "invalid x-api-key")),
        ]:
            e = self.classify(status, body, headers)
            blob = e.message + orjson.dumps(e.openai_error).decode()
            for value in ("req_SECRETISH", API_KEY, "session=abc"):
                assert value not in blob

    def test_json_without_anthropic_shape(self) -> None:
        e = self.classify(500, b'{"message": "upstream connect error"}')
        assert e.failure is FailureClass.server_error
        assert e.openai_error["message"] == "upstream connect error"


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
