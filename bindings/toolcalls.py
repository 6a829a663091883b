"""Qwen3.5's XML tool calls, parsed as they stream.

The model writes (the format its chat template teaches)::

    optional text
    <tool_call>
    <function=NAME>
    <parameter=ARG>
    value, possibly on several lines
    </parameter>
    </function>
    </tool_call>

``ToolCallParser.feed`` takes generated text in arbitrary pieces and returns what can be told
so far: plain text (held back only while it could still be the start of ``<tool_call>``),
complete calls, and malformed calls (reported with their raw text, never raised). Argument values
are converted by the tool's JSON schema when one is given (integer, number, boolean, object,
array); otherwise, and when a value does not parse, they stay strings.

>>> p = ToolCallParser()
>>> [e for e in p.feed("Let me check.\\n<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nParis\\n")]
[Text(text='Let me check.\\n')]
>>> p.feed("</parameter>\\n</function>\\n</tool_call>") + p.finish()
[ToolCall(name='get_weather', arguments={'city': 'Paris'})]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*\Z", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*", re.S)


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def as_message_call(self) -> dict:
        """The form chat templates take in an assistant message's ``tool_calls``."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class MalformedToolCall:
    raw: str
    reason: str


Event = Text | ToolCall | MalformedToolCall


def _schemas(tools: list[dict] | None) -> dict[str, dict]:
    out = {}
    for t in tools or []:
        f = t.get("function", t)
        if isinstance(f, dict) and "name" in f:
            out[f["name"]] = (f.get("parameters") or {}).get("properties") or {}
    return out


def _convert(value: str, schema: dict | None) -> Any:
    kind = (schema or {}).get("type")
    if isinstance(kind, list):
        if "null" in kind and value.strip() in ("null", "None"):  # JSON's null, or as the template writes None
            return None
        kind = next((k for k in kind if k != "null"), None)
    try:
        if kind == "integer":
            return int(value.strip())
        if kind == "number":
            v = float(value.strip())
            return int(v) if v.is_integer() and re.fullmatch(r"-?\d+", value.strip()) else v
        if kind == "boolean":
            low = value.strip().lower()
            if low in ("true", "false"):
                return low == "true"
            return value
        if kind in ("object", "array"):
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        return value
    return value


def parse_call(raw: str, tools: list[dict] | None = None) -> ToolCall | MalformedToolCall:
    """The inside of one <tool_call>…</tool_call> block."""
    m = _FUNCTION.match(raw)
    if not m:
        if "<function=" not in raw:
            return MalformedToolCall(raw, "no <function=NAME> inside <tool_call>")
        return MalformedToolCall(raw, "<function=…> is not closed by </function>")
    name, body = m.group(1).strip(), m.group(2)
    schema = _schemas(tools).get(name)
    args: dict[str, Any] = {}
    pos = 0
    for p in _PARAM.finditer(body):
        if body[pos : p.start()].strip():
            return MalformedToolCall(raw, f"unexpected text in {name}: {body[pos : p.start()].strip()[:40]!r}")
        key = p.group(1).strip()
        args[key] = _convert(p.group(2), (schema or {}).get(key))
        pos = p.end()
    rest = body[pos:].strip()
    if rest:
        reason = "<parameter=…> is not closed by </parameter>" if "<parameter=" in rest else "unexpected text"
        return MalformedToolCall(raw, f"{reason} in {name}: {rest[:40]!r}")
    return ToolCall(name, args)


class ToolCallParser:
    """Incremental: feed() pieces of generated text, finish() at the end of the reply."""

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools
        self._buf = ""
        self._in_call = False
        self._after_call = False  # newlines right after a call are dropped if another call follows

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        out: list[Event] = []
        while True:
            if not self._in_call and self._after_call:
                rest = self._buf.lstrip("\n")
                if not rest or (len(rest) < len(OPEN) and OPEN.startswith(rest)):
                    return out  # not yet known whether another call follows
                if rest.startswith(OPEN):
                    self._buf = rest
                self._after_call = False
            if not self._in_call:
                i = self._buf.find(OPEN)
                if i < 0:
                    # keep a tail that could still become "<tool_call>"
                    keep = next(
                        (
                            k
                            for k in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                            if OPEN.startswith(self._buf[-k:])
                        ),
                        0,
                    )
                    emit, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                    if emit:
                        out.append(Text(emit))
                    return out
                if i:
                    out.append(Text(self._buf[:i]))
                self._buf, self._in_call = self._buf[i + len(OPEN) :], True
            j = self._buf.find(CLOSE)
            if j < 0:
                return out
            out.append(parse_call(self._buf[:j], self.tools))
            # the template puts a newline between consecutive calls
            self._buf, self._in_call, self._after_call = self._buf[j + len(CLOSE) :], False, True

    def finish(self) -> list[Event]:
        """What is left when generation stops: text, or a call that was never closed."""
        buf, self._buf = self._buf, ""
        self._after_call = False
        if self._in_call:
            self._in_call = False
            return [MalformedToolCall(OPEN + buf, "<tool_call> is not closed by </tool_call>")]
        return [Text(buf)] if buf else []


def parse(text: str, tools: list[dict] | None = None) -> list[Event]:
    """All events of a complete reply, adjacent text merged."""
    p = ToolCallParser(tools)
    events = p.feed(text) + p.finish()
    merged: list[Event] = []
    for e in events:
        if isinstance(e, Text) and merged and isinstance(merged[-1], Text):
            merged[-1] = Text(merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged
