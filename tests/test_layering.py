"""The package's layers, read from the source's import statements (Python's own parser is the oracle).

- ``qwen35.converter`` and ``qwen35.bindings`` never import each other: what both need (the native
  library, the GGUF header scan, the CPU list, the error base) lives in the root package.
- Those shared root modules import neither subpackage.
- Nothing installed imports test support (``tests/support``), and the installed package has no
  test support in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick  # no native build needed: `make check` runs it

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"converter": "qwen35.converter", "bindings": "qwen35.bindings", "qwen35": "qwen35"}
SHARED = ["native", "gguf_scan", "cpus", "errors"]


def imports(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports included), absolute."""
    return imports_of(path.read_text(), PACKAGES[path.parent.name])


def imports_of(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).glob("*.py"))


@pytest.mark.parametrize(("folder", "forbidden"), [("converter", "qwen35.bindings"), ("bindings", "qwen35.converter")])
def test_converter_and_bindings_do_not_import_each_other(folder, forbidden):
    bad = {
        f.name: sorted(m for m in imports(f) if m == forbidden or m.startswith(forbidden + "."))
        for f in sources(folder)
    }
    assert not {k: v for k, v in bad.items() if v}


def test_shared_modules_import_neither_subpackage():
    for name in SHARED:
        mods = imports(ROOT / "qwen35" / f"{name}.py")
        assert not [m for m in mods if m.startswith(("qwen35.converter", "qwen35.bindings"))], name


def test_no_test_support_in_or_imported_by_the_package():
    for folder in ("qwen35", "converter", "bindings"):
        for f in sources(folder):
            assert not [m for m in imports(f) if m == "support" or m.startswith(("support.", "tests"))], f
    assert not (ROOT / "qwen35" / "tiny.py").exists() and not (ROOT / "qwen35" / "upstream.py").exists()


def test_the_check_can_fail():
    """Relative, function-level and from-imports across the layers are all seen."""
    src = "from ..bindings import model\nfrom . import recipes\ndef f():\n    import qwen35.bindings.chat\n"
    found = imports_of(src, "qwen35.converter")
    assert {"qwen35.bindings.model", "qwen35.converter.recipes", "qwen35.bindings.chat"} <= found
