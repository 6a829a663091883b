"""Replies parsed as the model wrote them. The oracle is Qwen3.5's own chat template: an assistant
message (reasoning, content, tool calls with multi-line, indented, newline-ending and non-ASCII
argument values) rendered by it is the text a model writes; parsing that text back, streamed in
any split into byte pieces (multi-byte characters and tags cut anywhere), gives the message."""

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen35.bindings.chat import ContentDelta, ReasoningDelta, _ReplyText
from qwen35.bindings.toolcalls import ToolCall, ToolCallParser

pytestmark = pytest.mark.quick  # no native build needed: `make check` runs it

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = (ROOT / "examples" / "models" / "qwen35-dense-tiny" / "chat_template.jinja").read_text()
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "python",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "timeout": {"type": "integer"},
                    "verbose": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "tags": {"type": "array"},
                    "limit": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "edit",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "new_text": {"type": "string"}},
            },
        },
    },
]
FORBIDDEN = ("<tool_call>", "</tool_call>", "<think>", "</think>", "</parameter>", "</function>", "<|im_")


def render(message: dict, thinking: bool) -> str:
    """What a model writes for message: the template's rendering of it as the reply to a user,
    after the generation prompt (which ends in <think>\\n, or in an empty think block)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(jinja2.TemplateError(m))
    t = env.from_string(TEMPLATE)
    head = t.render(
        messages=[{"role": "user", "content": "q"}], tools=TOOLS, add_generation_prompt=True, enable_thinking=thinking
    )
    full = t.render(messages=[{"role": "user", "content": "q"}, message], tools=TOOLS, add_generation_prompt=False)
    start = full.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    written = full[start : full.rindex("<|im_end|>")]
    opening = head[head.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n") :]
    if thinking:
        assert written.startswith(opening)
        return written[len(opening) :]
    # thinking off: the reply follows the empty think block of the prompt
    return written.split("</think>\n\n", 1)[1]


class _Pieces:
    """A model stand-in whose 'tokens' are byte pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def piece(self, i):
        return self.pieces[i]


def parse(text: str, cuts: list[int], thinking: bool, tools=TOOLS):
    data = text.encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    rt = _ReplyText(_Pieces(pieces), ToolCallParser(tools), thinking)
    events = [e for i in range(len(pieces)) for e in rt.feed(i)]
    rest, msg = rt.finish()
    return events + rest, msg


def merged(events):
    out = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (ContentDelta, ReasoningDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        else:
            out.append(e)
    return out


text_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00")
plain = st.text(text_chars, max_size=40).filter(lambda s: not any(f in s for f in FORBIDDEN))
# argument values as code/edit tools see them: several lines, indentation, newlines at either end
value = (
    st.lists(st.one_of(plain, st.just(""), st.just("    indented()"), st.just("é → 漢字 🙂")), min_size=1, max_size=5)
    .map("\n".join)
    .map(lambda s: s.replace("\n\n\n", "\n\n"))
)
call = st.one_of(
    st.fixed_dictionaries(
        {
            "name": st.just("python"),
            "arguments": st.fixed_dictionaries(
                {"code": value},
                optional={
                    "timeout": st.integers(-(10**6), 10**6),
                    "verbose": st.booleans(),
                    "ratio": st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x)),
                    "tags": st.lists(st.text(max_size=5), max_size=3),
                    "limit": st.none() | st.integers(0, 99),
                },
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "name": st.just("edit"),
            "arguments": st.fixed_dictionaries({"path": plain.filter(lambda s: s.strip()), "new_text": value}),
        }
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reasoning=plain,
    content=plain,
    calls=st.lists(call, max_size=3),
    thinking=st.booleans(),
    cuts=st.lists(st.integers(0, 10**6), max_size=60),
)
def test_streamed_reply_equals_the_message_the_template_wrote(reasoning, content, calls, thinking, cuts):
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [{"type": "function", "function": c} for c in calls],
    }
    if thinking:
        message["reasoning_content"] = reasoning
    text = render(message, thinking)
    events, msg = parse(text, cuts, thinking)
    whole_events, whole = parse(text, [], thinking)
    assert msg == whole and merged(events) == merged(whole_events)
    assert msg["content"] == content.strip()
    assert msg.get("reasoning_content", "") == (reasoning.strip() if thinking else "")
    got = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in got] == [(c["name"], c["arguments"]) for c in calls]
    # typed exactly: an integer is an int (not 3.0), a boolean a bool (not 1)
    for c, want in zip(got, calls):
        for k, v in want["arguments"].items():
            assert type(c.arguments[k]) is type(v), (k, c.arguments[k], v)


def test_a_call_opened_while_thinking_ends_the_reasoning():
    text = "I should run it.\n<tool_call>\n<function=python>\n<parameter=code>\nprint(1)\n</parameter>\n</function>\n</tool_call>"
    for cut in range(len(text)):
        _events, msg = parse(text, [cut], thinking=True)
        assert msg["reasoning_content"] == "I should run it."
        assert msg["tool_calls"] == [
            {"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}}
        ]


@pytest.mark.parametrize("thinking", [True, False])
def test_newline_only_pieces_inside_a_call_are_kept(thinking):
    """Tokens that are only newlines (as in code) arrive before the reply has visible content."""
    code = "def hello():\n    print('hi')\n\nhello()\n"
    text = (
        "done\n</think>\n\n" if thinking else ""
    ) + f"<tool_call>\n<function=python>\n<parameter=code>\n{code}\n</parameter>\n</function>\n</tool_call>"
    pieces = [p.encode() for p in text.replace("\n", "\x00\n\x00").split("\x00") if p]
    rt = _ReplyText(_Pieces(pieces), ToolCallParser(TOOLS), thinking)
    events = [e for i in range(len(pieces)) for e in rt.feed(i)]
    events += rt.finish()[0]
    assert [e.arguments for e in events if isinstance(e, ToolCall)] == [{"code": code}]


def test_text_after_a_call_is_content():
    text = "<tool_call>\n<function=edit>\n<parameter=path>\na.py\n</parameter>\n</function>\n</tool_call>\nDone."
    for cut in range(len(text)):
        _events, msg = parse(text, [cut], thinking=False)
        assert msg["content"] == "Done." and msg["tool_calls"][0]["function"]["arguments"] == {"path": "a.py"}
