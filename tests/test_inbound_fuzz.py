"""Property: no body posted to an inbound API (Responses, Messages) makes the sidecar answer 5xx.

The same running sidecar and generators as tests/test_fuzz_bodies.py (its route
`chat` is an OpenAI backend: the Responses API goes natively, the Messages API
through chat), with near-valid bodies of each API whose every field may be any
JSON value. Every 4xx is in the called API's own error format.
"""

from __future__ import annotations

import asyncio
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_fuzz_bodies import json_values, post, sidecar_url  # noqa: F401 (sidecar_url: the module's fixture)

part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "text", "input_image", "image", "tool_result", "tool_use"]) | json_values},
    optional={"text": json_values, "image_url": json_values, "source": json_values, "input": json_values},
)
item = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning"]) | json_values,
        "role": st.sampled_from(["user", "assistant", "system", "developer"]) | json_values,
        "content": st.text(max_size=40) | st.lists(part, max_size=3) | json_values,
        "call_id": json_values,
        "name": json_values,
        "arguments": json_values,
        "output": json_values,
    },
)
responses_body = st.fixed_dictionaries(
    {"model": st.just("chat") | json_values},
    optional={
        "input": st.text(max_size=40) | st.lists(item, max_size=4) | json_values,
        "instructions": json_values,
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": json_values}), max_size=2)
        | json_values,
        "tool_choice": json_values,
        "max_output_tokens": st.integers(-5, 10**6) | json_values,
        "text": json_values,
        "stream": st.booleans() | json_values,
        "store": st.just(False) | json_values,
    },
)
messages_body = st.fixed_dictionaries(
    {"model": st.just("chat") | json_values},
    optional={
        "messages": st.lists(item, max_size=4) | json_values,
        "system": json_values,
        "max_tokens": st.integers(-5, 10**6) | json_values,
        "tools": json_values,
        "tool_choice": json_values,
        "stop_sequences": json_values,
        "metadata": json_values,
        "stream": st.booleans() | json_values,
    },
)
bodies = st.one_of(
    st.tuples(st.just("/v1/responses"), responses_body.map(lambda b: json.dumps(b).encode())),
    st.tuples(
        st.sampled_from(["/v1/messages", "/v1/messages/count_tokens"]),
        messages_body.map(lambda b: json.dumps(b).encode()),
    ),
    st.tuples(st.sampled_from(["/v1/responses", "/v1/messages"]), json_values.map(lambda v: json.dumps(v).encode())),
)

EXAMPLES = int(os.environ.get("KT_FUZZ_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies)
def test_no_inbound_body_makes_the_sidecar_answer_5xx(sidecar_url: str, case: tuple[str, bytes]) -> None:  # noqa: F811
    path, body = case
    status, headers, answer = asyncio.run(post(sidecar_url, path, body))
    # A 5xx may only be the upstream's, passed on (the backend is named); never the sidecar's own.
    assert status < 500 or "x-kubetoll-backend" in headers, (status, body[:300], answer[:300])
    if status >= 400:
        got = json.loads(answer)
        if path.startswith("/v1/messages"):
            assert got["type"] == "error" and got["error"]["type"] and got["error"]["message"]
        else:
            assert isinstance(got["error"]["message"], str) and got["error"]["message"]
