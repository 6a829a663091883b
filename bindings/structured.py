"""Structured replies: OpenAI's ``response_format`` and ``tool_choice`` as llama.cpp grammars.

JSON schemas become GBNF through llama-cpp-python's converter (``llama_cpp.llama_grammar``, a
port of llama.cpp's ``json-schema-to-grammar``); a constrained tool call is Qwen3.5's XML format
(the one its chat template teaches, ``toolcalls.py`` parses) with each typed argument's value
given by the same converter and each string argument free text up to ``</parameter>``.

With thinking on, the reasoning is free text, but the reply may not end inside it: the answer
the constraint describes starts where the reasoning ends, at ``</think>`` (or at a
``<tool_call>`` the model opens while still reasoning, when a call is what is asked for).

>>> constraint({"type": "json_object"}, None, "auto", thinking=False).grammar.splitlines()[0]
'root ::= [\\\\n]{0,2} json'
>>> constraint({"type": "json_object"}, None, "auto", thinking=True).grammar.splitlines()[0]
'root ::= think0 ( "</think>" [\\\\n]{0,2} json )'
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
# JSON-schema keywords the grammar converter does not turn into constraints: refused, so that a
# reply never passes the grammar and then fails the schema
NOT_ENFORCED = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedProperties",
    "unevaluatedItems",
)


@dataclass(frozen=True)
class Constraint:
    grammar: str | None = None  # GBNF, root rule "root"
    calls_allowed: bool = True  # tool_choice "none": no call is parsed, the call token is banned


def _schema_of(response_format) -> dict | None:
    """The JSON schema response_format asks for (None: free text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(
            f'response_format must be an object like {{"type": "json_object"}}, not {type(response_format).__name__}'
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError('response_format.json_schema must be an object with a "schema" object')
    schema = spec.get("schema") or {"type": "object"}
    _check_enforceable(schema, "response_format.json_schema.schema")
    return schema


def _check_enforceable(schema, where: str) -> None:
    """ValueError naming the first keyword of schema (recursively) the converter would ignore."""
    if isinstance(schema, list):
        for i, sub in enumerate(schema):
            _check_enforceable(sub, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for key, sub in schema.items():
        if key in NOT_ENFORCED:
            raise ValueError(
                f"{where}: the JSON-schema keyword {key!r} cannot be enforced by the grammar; "
                "leave it out (and check the value after the reply)"
            )
        if key in ("properties", "$defs", "definitions"):
            for name, prop in sub.items() if isinstance(sub, dict) else ():
                _check_enforceable(prop, f"{where}.{key}.{name}")
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
            _check_enforceable(sub, f"{where}.{key}")


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
            raise ValueError(
                'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}'
            )
        if name not in functions:
            raise ValueError(
                f"tool_choice names {name!r}, which is not one of the tools ({', '.join(functions) or 'none given'})"
            )
        return "required", [name]
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of auto, none, required, or a named function")
    if tool_choice == "required" and not functions:
        raise ValueError('tool_choice "required" needs tools')
    return tool_choice, list(functions)


def _text_without(literals: tuple[str, ...], name: str) -> dict[str, str]:
    """Rules for any text that contains none of literals, rule ``{name}0`` the start: an
    Aho-Corasick automaton whose states are the literals' proper prefixes the text may end in."""
    prefixes = sorted({lit[:i] for lit in literals for i in range(len(lit))}, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(prefixes)}
    alphabet = sorted(set("".join(literals)))

    def step(state: str, c: str) -> str | None:  # None: a literal would be complete
        s = state + c
        if any(s.endswith(lit) for lit in literals):
            return None
        return next(s[k:] for k in range(len(s) + 1) if s[k:] in index)

    def cls(chars) -> str:
        return "".join("\\" + c if c in "]\\^-" else c for c in chars)

    rules = {}
    for p in prefixes:
        alts = ['""']
        for c in alphabet:
            nxt = step(p, c)
            if nxt is not None:
                alts.append(f"{json.dumps(c)} {name}{index[nxt]}")
        alts.append(f"[^{cls(alphabet)}] {name}0")  # any other character: no literal under way
        rules[f"{name}{index[p]}"] = " | ".join(alts)
    return rules


def _call_rules(converter, functions: dict[str, dict], names: list[str], parallel: bool) -> dict[str, str]:
    rules = {
        "calls": 'call ("\\n" call)*' if parallel else "call",
        "call": '"<tool_call>\\n" function "</tool_call>"',
        "function": " | ".join(f"fn{i}" for i in range(len(names))),
    }
    rules.update(_text_without((PARAM_CLOSE,), "argtext"))
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
            _check_enforceable(sub, f"tool {name!r}: parameter {arg!r}")
            literals = sub.get("enum", [sub["const"]] if "const" in sub else None)
            if isinstance(literals, list) and literals and all(isinstance(v, str) for v in literals):
                value = f"fn{i}-arg{j}-value"  # written as the text itself, not a JSON string
                rules[value] = " | ".join(json.dumps(v) for v in literals)
            elif sub.get("type") == "string":
                limits = [k for k in ("pattern", "format", "minLength", "maxLength") if k in sub]
                if limits:
                    raise ValueError(
                        f"tool {name!r}: parameter {arg!r}: {limits[0]!r} cannot be enforced on a "
                        "text value of a tool call; leave it out (and check the value after the reply)"
                    )
                value = "argtext0"
            else:
                try:
                    value = converter.visit(sub, f"fn{i}-arg{j}-value")
                except Exception as e:  # the converter's own assertion or KeyError on a schema it cannot take
                    raise ValueError(
                        f"tool {name!r}: parameter {arg!r} has a schema the grammar converter cannot take ({e})"
                    ) from None
            rule = f"fn{i}-arg{j}"
            rules[rule] = f'"<parameter={arg}>\\n" {value} "\\n</parameter>\\n"'
            parts.append(rule if arg in required else f"{rule}?")
        rules[f"fn{i}"] = f'"<function={name}>\\n" {" ".join(parts)} "</function>\\n"'
    return rules


def constraint(response_format, tools, tool_choice, *, thinking: bool, parallel_tool_calls: bool = True) -> Constraint:
    """The grammar (if any) for a reply with these OpenAI request fields; ValueError naming the
    field when one is not usable. parallel_tool_calls=False: a constrained reply is one call."""
    from llama_cpp.llama_grammar import SchemaConverter

    schema = _schema_of(response_format)
    functions = _tool_functions(tools)
    choice, names = _chosen(tool_choice, functions)
    if schema is None and choice != "required":
        return Constraint(calls_allowed=choice != "none")
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    bodies, rules = [], {}
    if choice == "required" or (choice == "auto" and functions and schema is not None):
        rules.update(_call_rules(converter, functions, names, parallel_tool_calls))
        bodies.append("calls")
    if choice != "required" and schema is not None:
        try:
            schema = converter.resolve_refs(schema, "response_format")
            bodies.append(converter.visit(schema, "json"))
        except Exception as e:
            raise ValueError(f"response_format.json_schema.schema cannot be turned into a grammar ({e})") from None
    body = " | ".join(bodies) if len(bodies) > 1 else bodies[0]
    body = f"( {body} )" if len(bodies) > 1 else body
    if thinking:  # free reasoning, which must end before the answer: at </think>, or at a call it opens
        ends = (THINK_END, TOOL_OPEN) if "calls" in bodies else (THINK_END,)
        rules.update(_text_without(ends, "think"))
        root = f'think0 ( "{THINK_END}" [\\n]{{0,2}} {body}' + (" | calls )" if "calls" in bodies else " )")
    else:
        root = f"[\\n]{{0,2}} {body}"
    text = "\n".join(
        [
            f"root ::= {root}",
            *(f"{k} ::= {v}" for k, v in rules.items()),
            *map(_strict_json_char, converter.format_grammar().splitlines()),
        ]
    )
    return Constraint(text, calls_allowed=choice != "none")


def _strict_json_char(line: str) -> str:
    """llama-cpp-python's converter lets a JSON string hold raw control characters (a newline, a
    tab), which JSON forbids; llama.cpp's own converter excludes them. The same rule, corrected."""
    if line.startswith("char ::= "):
        return r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
    return line
