"""The examples in the docstrings run."""

import doctest
import importlib

import pytest

MODULES = [
    "qwen35.converter.quantize",
    "qwen35.converter.convert",
    "qwen35.converter.inspect",
    "qwen35.verify",
    "qwen35.native",
    "qwen35.bindings.model",
    "qwen35.bindings.toolcalls",
    "qwen35.bindings.sampling",
    "qwen35.bindings.structured",
    "qwen35.bindings.chat",
    "qwen35.quant",
]


# structured's examples build grammars with llama-cpp-python, which `make setup` installs
QUICK = [pytest.param(m, marks=pytest.mark.quick) if m != "qwen35.bindings.structured" else m for m in MODULES]


@pytest.mark.parametrize("name", QUICK)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
