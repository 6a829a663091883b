"""The Qwen3.5 tool-call parser: round trip through the official chat template (the oracle for
the format), real-format samples including the failure cases, and every way of streaming them."""

import json
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen35.bindings.toolcalls import MalformedToolCall, Text, ToolCall, ToolCallParser, parse

pytestmark = pytest.mark.quick  # no native build needed: `make check` runs it

ROOT = Path(__file__).resolve().parent.parent
from support.tiny import TEMPLATE  # noqa: E402  (the official Qwen3.5 template)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "hours": {"type": "array"},
                    "where": {"type": "object"},
                    "scale": {"type": "number"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "run", "parameters": {"type": "object", "properties": {"code": {"type": "string"}}}},
    },
]


def _render_assistant(content, calls):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": content, "tool_calls": [c.as_message_call() for c in calls]},
    ]
    text = env.from_string(TEMPLATE.read_text()).render(messages=msgs, tools=TOOLS, add_generation_prompt=False)
    reply = text.rsplit("<|im_start|>assistant\n", 1)[1]
    assert reply.endswith("<|im_end|>\n")
    reply = reply[: -len("<|im_end|>\n")]
    return reply.split("</think>\n\n", 1)[-1]


CALLS = [
    ("", [ToolCall("get_weather", {"city": "Paris", "days": 3})]),
    ("I will look it up.", [ToolCall("get_weather", {"city": "São Paulo", "metric": True, "scale": 1.5})]),
    (
        "",
        [
            ToolCall("run", {"code": "for i in range(3):\n    print(i)\n"}),
            ToolCall("get_weather", {"city": "Oslo", "hours": [1, 2], "where": {"lat": 59.9}}),
        ],
    ),
    ("Two things first.\nThen:", [ToolCall("run", {"code": "<tag> & </parameter-like>"})]),
]


@pytest.mark.parametrize("content,calls", CALLS)
def test_round_trip_through_the_official_template(content, calls):
    reply = _render_assistant(content, calls)
    events = parse(reply, TOOLS)
    got_calls = [e for e in events if isinstance(e, ToolCall)]
    assert got_calls == calls
    text = "".join(e.text for e in events if isinstance(e, Text))
    assert text.strip() == content.strip()


@pytest.mark.parametrize("content,calls", CALLS)
def test_any_split_of_the_stream_gives_the_same_events(content, calls):
    reply = _render_assistant(content, calls)
    for step in (1, 2, 3, 7, 11):
        p = ToolCallParser(TOOLS)
        events = []
        for i in range(0, len(reply), step):
            events += p.feed(reply[i : i + step])
        events += p.finish()
        assert [e for e in events if isinstance(e, ToolCall)] == calls
        assert "".join(e.text for e in events if isinstance(e, Text)) == "".join(
            e.text for e in parse(reply, TOOLS) if isinstance(e, Text)
        )


def test_text_is_not_held_back_longer_than_needed():
    p = ToolCallParser()
    assert p.feed("a < b and <tool") == [Text("a < b and ")]
    assert p.feed("box>") == [Text("<toolbox>")]


FAILURES = [
    (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
        "not closed by </function>",
    ),
    ('<tool_call>\n{"name": "get_weather"}\n</tool_call>', "no <function=NAME>"),
    (
        "<tool_call>\n<function=run>\n<parameter=code>\nprint(1)\n</function>\n</tool_call>",
        "not closed by </parameter>",
    ),
    (
        "<tool_call>\n<function=run>\nstray words\n<parameter=code>\nx\n</parameter>\n</function>\n</tool_call>",
        "unexpected text",
    ),
    ("Sure.\n<tool_call>\n<function=run>\n<parameter=code>\nx = 1", "not closed by </tool_call>"),
]


@pytest.mark.parametrize("reply,reason", FAILURES)
def test_malformed_calls_are_reported_not_raised(reply, reason):
    events = parse(reply, TOOLS)
    bad = [e for e in events if isinstance(e, MalformedToolCall)]
    assert len(bad) == 1 and reason in bad[0].reason, events
    assert not any(isinstance(e, ToolCall) for e in events)


def test_values_that_do_not_fit_the_schema_stay_strings():
    reply = (
        "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
        "<parameter=hours>\n[1, 2\n</parameter>\n<parameter=unknown>\n42\n</parameter>\n</function>\n</tool_call>"
    )
    (call,) = parse(reply, TOOLS)
    assert call.arguments == {"days": "three", "hours": "[1, 2", "unknown": "42"}
    (call,) = parse(reply)  # no schema: strings
    assert json.dumps(call.arguments) == '{"days": "three", "hours": "[1, 2", "unknown": "42"}'
