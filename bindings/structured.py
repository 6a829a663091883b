"""Structured replies: OpenAI's ``response_format`` and ``tool_choice`` as llama.cpp grammars.

JSON schemas become GBNF through llama-cpp-python's converter (``llama_cpp.llama_grammar``, a
port of llama.cpp's ``json-schema-to-grammar``); a constrained tool call is Qwen3.5's XML format
(the one its chat template teaches, ``toolcalls.py`` parses) with each typed argument's value
given by the same converter and each string argument free text up to ``</parameter>``.

With thinking on, the grammar is lazy: the reasoning is free, and the constraint starts where it
ends — at ``</think>``, or at a ``<tool_call>`` the model opens while still reasoning.

>>> c = constraint({"type": "json_object"}, None, "auto", thinking=False)
>>> c.grammar.splitlines()[0], c.triggers
('root ::= [\\\\n]{0,2} json', ())
>>> constraint({"type": "xml"}, None, "auto", thinking=False)
Traceback (most recent call last):
...
ValueError: response_format.type 'xml' is not one of text, json_object, json_schema
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

THINK_END = "</think>"
TOOL_OPEN = "<tool_call>"
PARAM_CLOSE = "</parameter>"
TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Constraint:
    grammar: str | None = None          # GBNF, root rule "root"
    triggers: tuple[str, ...] = ()      # regular expressions: the grammar applies from the first match on
    calls_allowed: bool = True          # tool_choice "none": no call is parsed, the call token is banned


def _schema_of(response_format) -> dict | None:
    """The JSON schema response_format asks for (None: free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object like {{\"type\": \"json_object\"}}, "
                         f"not {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError("response_format.json_schema must be an object with a \"schema\" object")
    return spec.get("schema") or {"type": "object"}


def _tool_functions(tools) -> dict[str, dict]:
    """name -> parameters schema of OpenAI-style tools."""
    out = {}
    for i, t in enumerate(tools or []):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"tools[{i}] has no function name")
        if not re.fullmatch(r"[^<>\n]+", f["name"]):
            raise ValueError(f"tools[{i}].function.name {f['name']!r} cannot be written in a tool call")
        params = f.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out[f["name"]] = params
    return out


def _chosen(tool_choice, functions: dict[str, dict]) -> tuple[str, list[str]]:
    """("auto" | "none" | "required", the functions a required call may name)."""
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ValueError('tool_choice must be "auto", "none", "required" or '
                             '{"type": "function", "function": {"name": ...}}')
        if name not in functions:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools "
                             f"({', '.join(functions) or 'none given'})")
        return "required", [name]
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of auto, none, required, or a named function")
    if tool_choice == "required" and not functions:
        raise ValueError('tool_choice "required" needs tools')
    return tool_choice, list(functions)


def _text_without(literal: str, name: str) -> dict[str, str]:
    """Rules for any text that does not contain literal (a DFA over the literal's prefixes, as
    in Knuth-Morris-Pratt): state i means the text ends in literal[:i]. Rule name{i}."""
    def step(i: int, c: str) -> int:     # the longest prefix of literal that ends text[:i] + c
        s = literal[:i] + c
        return next(k for k in range(min(len(s), len(literal)), -1, -1) if s.endswith(literal[:k]))

    def lit(c: str) -> str:
        return json.dumps(c)

    def cls(chars: set[str]) -> str:
        return "".join("\\" + c if c in "]\\^-" else c for c in sorted(chars))

    rules = {}
    alphabet = set(literal)
    for i in range(len(literal)):
        alts = ['""']
        for c in sorted(alphabet):
            j = step(i, c)
            if j < len(literal):
                alts.append(f"{lit(c)} {name}{j}")
        # any other character goes back to state 0
        alts.append(f"[^{cls(alphabet)}] {name}0")
        rules[f"{name}{i}"] = " | ".join(alts)
    return rules


def _call_rules(converter, functions: dict[str, dict], names: list[str]) -> dict[str, str]:
    rules = {"calls": 'call ("\\n" call)*', "call": '"<tool_call>\\n" function "</tool_call>"',
             "function": " | ".join(f"fn{i}" for i in range(len(names)))}
    rules.update(_text_without(PARAM_CLOSE, "argtext"))
    for i, name in enumerate(names):
        schema = functions[name]
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        if not isinstance(props, dict):
            raise ValueError(f"tool {name!r}: parameters.properties must be an object")
        parts = []
        for j, (arg, sub) in enumerate(props.items()):
            if not re.fullmatch(r"[^<>\n]+", arg):
                raise ValueError(f"tool {name!r}: parameter name {arg!r} cannot be written in a tool call")
            sub = sub if isinstance(sub, dict) else {}
            if sub.get("type") == "string" and not any(k in sub for k in ("enum", "const", "pattern", "format")):
                value = "argtext0"
            else:
                try:
                    value = converter.visit(sub, f"fn{i}-arg{j}-value")
                except Exception as e:   # the converter's own assertion or KeyError on a schema it cannot take
                    raise ValueError(f"tool {name!r}: parameter {arg!r} has a schema the grammar converter "
                                     f"cannot take ({e})") from None
            rule = f"fn{i}-arg{j}"
            rules[rule] = f'"<parameter={arg}>\\n" {value} "\\n</parameter>\\n"'
            parts.append(rule if arg in required else f"{rule}?")
        rules[f"fn{i}"] = f'"<function={name}>\\n" {" ".join(parts)} "</function>\\n"'
    return rules


def constraint(response_format, tools, tool_choice, *, thinking: bool) -> Constraint:
    """The grammar (if any) for a reply with these OpenAI request fields; ValueError naming the
    field when one is not usable."""
    from llama_cpp.llama_grammar import SchemaConverter

    schema = _schema_of(response_format)
    functions = _tool_functions(tools)
    choice, names = _chosen(tool_choice, functions)
    if schema is None and choice != "required":
        return Constraint(calls_allowed=choice != "none")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    bodies, rules = [], {}
    if choice == "required" or (choice == "auto" and functions and schema is not None):
        rules.update(_call_rules(converter, functions, names))
        bodies.append("calls")
    if choice != "required" and schema is not None:
        try:
            schema = converter.resolve_refs(schema, "response_format")
            bodies.append(converter.visit(schema, "json"))
        except Exception as e:
            raise ValueError(f"response_format.json_schema.schema cannot be turned into a grammar ({e})") from None
    body = " | ".join(bodies) if len(bodies) > 1 else bodies[0]
    body = f"( {body} )" if len(bodies) > 1 else body
    if thinking:
        root = f'"{THINK_END}" [\\n]{{0,2}} {body}' if "calls" not in bodies else \
            f'("{THINK_END}" [\\n]{{0,2}})? {body}'
        triggers = (re.escape(THINK_END),) + ((re.escape(TOOL_OPEN),) if "calls" in bodies else ())
    else:
        root, triggers = f"[\\n]{{0,2}} {body}", ()
    text = "\n".join([f"root ::= {root}", *(f"{k} ::= {v}" for k, v in rules.items()), converter.format_grammar()])
    return Constraint(text, triggers, calls_allowed=choice != "none")
