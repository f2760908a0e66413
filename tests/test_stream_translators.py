"""Every stream translator keeps `text`: the generated pieces it sent to the client, in order.

`StreamTranslator.text` is what a stream cut before the upstream reported usage
is billed by (`"".join(text)`, counted with tiktoken), so every provider's
translator must keep it, and keep it equal to what the client received.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from kubetoll_sidecar import tokens
from kubetoll_sidecar.providers.anthropic import AnthropicTranslator
from kubetoll_sidecar.providers.base import StreamTranslator, Translator, Usage
from kubetoll_sidecar.providers.openai import AzureOpenAITranslator, OpenAITranslator


def openai_chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


OPENAI_STREAM: list[bytes] = [
    openai_chunk({"role": "assistant", "content": ""}),
    openai_chunk({"content": "Let me "}),
    openai_chunk({"content": "check the wéather."}),
    openai_chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        }
    ),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
    openai_chunk({}, "tool_calls"),
    orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o",
            "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 15, "total_tokens": 35},
        }
    ),
    b"[DONE]",
]

ANTHROPIC_EVENTS: list[tuple[str, dict[str, Any]]] = [
    (
        "message_start",
        {
            "type": "message_start",
            "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 20, "output_tokens": 1}},
        },
    ),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me "}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "check the wéather."}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    (
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        },
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city":'}},
    ),
    (
        "content_block_delta",
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ' "Paris"}'}},
    ),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
]


def sent(chunks: list[dict[str, Any] | bytes], *, names: bool = False) -> str:
    """The generated text the chunks carry to the client, in order: content and tool arguments
    (and the tool names too with `names`)."""
    pieces = []
    for c in chunks:
        chunk = orjson.loads(c) if isinstance(c, bytes) else c
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            pieces.append(delta.get("content") or choice.get("text") or "")
            for tc in delta.get("tool_calls") or ():
                fn = tc.get("function") or {}
                pieces.append(((fn.get("name") or "") if names else "") + (fn.get("arguments") or ""))
    return "".join(pieces)


def feed_openai(st: StreamTranslator, events: list[bytes]) -> list[dict[str, Any] | bytes]:
    out: list[dict[str, Any] | bytes] = []
    for data in events:
        out.extend(st.feed(None, data))
    return out


def feed_anthropic(st: StreamTranslator, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any] | bytes]:
    out: list[dict[str, Any] | bytes] = []
    for name, payload in events:
        out.extend(st.feed(name, orjson.dumps(payload)))
    return out


@pytest.mark.parametrize("translator", [OpenAITranslator(), AzureOpenAITranslator()], ids=["openai", "azure"])
def test_openai_pass_through_keeps_the_text_it_streamed(translator: Translator) -> None:
    st = translator.stream_translator("chat", include_usage=True)
    assert st.text == [] and st.text_chars == 0
    chunks = feed_openai(st, OPENAI_STREAM)
    assert st.done and st.error() is None
    assert st.usage == Usage(20, 15)
    # The pass-through keeps a tool call's function name with its arguments (as its text_chars always has).
    assert st.text == ["Let me ", "check the wéather.", "get_weather", '{"city":', ' "Paris"}']
    assert "".join(st.text) == sent(chunks, names=True)
    assert st.text_chars == len("".join(st.text))


def test_openai_cut_stream_text_is_what_the_client_got() -> None:
    st = OpenAITranslator().stream_translator("chat", include_usage=False)
    cut = OPENAI_STREAM[:5]  # cut inside the tool call's arguments: no usage, no [DONE]
    chunks = feed_openai(st, cut)
    assert not st.done and st.usage is None
    assert "".join(st.text) == "Let me check the wéather.get_weather" + '{"city":' == sent(chunks, names=True)
    assert tokens.count_text("".join(st.text), "gpt-4o") > 0


def test_openai_legacy_completions_text() -> None:
    st = OpenAITranslator().stream_translator("chat", include_usage=False)
    events = [orjson.dumps({"choices": [{"index": 0, "text": piece}]}) for piece in ("Once upon", " a time")]
    chunks = feed_openai(st, events)
    assert st.text == ["Once upon", " a time"]
    assert "".join(st.text) == sent(chunks)


def test_anthropic_keeps_the_content_and_tool_arguments_it_streamed() -> None:
    st = AnthropicTranslator().stream_translator("chat", include_usage=True)
    assert st.text == [] and st.text_chars == 0
    chunks = feed_anthropic(st, ANTHROPIC_EVENTS)
    assert st.done and st.error() is None
    assert st.text == ["Let me ", "check the wéather.", '{"city":', ' "Paris"}']
    assert "".join(st.text) == sent(chunks)
    assert st.text_chars == len("".join(st.text))


def test_anthropic_cut_stream_text_is_what_the_client_got() -> None:
    st = AnthropicTranslator().stream_translator("chat", include_usage=False)
    chunks = feed_anthropic(st, ANTHROPIC_EVENTS[:7])  # cut inside the tool call's arguments
    assert not st.done
    assert st.usage is not None and st.usage.completion_tokens == 1  # only message_start's count
    assert "".join(st.text) == "Let me check the wéather." + '{"city":' == sent(chunks)
    assert tokens.count_text("".join(st.text), "gpt-4o") > 0
