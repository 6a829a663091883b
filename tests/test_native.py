"""The bindings load only a library built from this tree's patch series."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35 import native

ROOT = Path(__file__).resolve().parent.parent


def _fake_lib(tmp_path: Path, series: str | None) -> Path:
    """A shared library that is not libllama: with or without the identity symbol."""
    src = tmp_path / "fake.c"
    body = (
        f'const char * {native.SYMBOL}(void) {{ return "{series}"; }}\n'
        if series
        else "int nothing(void) { return 0; }\n"
    )
    src.write_text(body)
    out = tmp_path / "libllama.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


def test_patched_library_loads(lib_dir):
    info = native.load()
    assert info.patched and info.series_id == native.expected_series_id()
    import llama_cpp

    assert b"CPU" in llama_cpp.llama_print_system_info()


def test_library_from_another_series_is_refused(tmp_path):
    lib = _fake_lib(tmp_path, "qwen35-0000000000000000")
    with pytest.raises(native.NativeLibraryError) as e:
        native.check(lib, allow_stock=False)
    msg = str(e.value)
    assert "qwen35-0000000000000000" in msg and native.expected_series_id() in msg and "make setup" in msg


def test_opt_out_accepts_a_mismatch_knowingly(tmp_path):
    info = native.check(_fake_lib(tmp_path, "qwen35-0000000000000000"), allow_stock=True)
    assert not info.patched


@pytest.fixture(scope="module")
def upstream_libllama() -> Path:
    """libllama from the same pinned sdist without the series: the Makefile's `upstream-lib`, which
    `make test` runs before the workers start (here a no-op then; it builds when pytest runs alone)."""
    subprocess.run(["make", "-s", "-C", str(ROOT), "upstream-lib", f"PYTHON={sys.executable}"], check=True)
    return ROOT / "build/upstream-stock/bin/libllama.so"


def test_stock_llama_cpp_is_refused_with_the_fix(upstream_libllama):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(upstream_libllama.parent))
    env.pop(native.ALLOW_STOCK_ENV, None)
    code = "from qwen35 import native; native.load()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "stock llama.cpp without the Qwen3.5 patch series" in r.stderr
    assert "make setup" in r.stderr and native.ALLOW_STOCK_ENV in r.stderr

    # the CLI turns it into one line and a non-zero exit
    r = subprocess.run(
        [str(Path(sys.executable).parent / "qwen35"), "build-info"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "MISMATCH" in r.stdout and "stock" in r.stdout

    # and the explicit opt-out lets a user run stock llama.cpp knowingly
    env[native.ALLOW_STOCK_ENV] = "1"
    code = "from qwen35 import native; i = native.load(); print(i.series_id)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stock"


def test_build_info_json():
    r = subprocess.run(
        [str(Path(sys.executable).parent / "qwen35"), "build-info", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["patched"] is True and info["series_id"] == native.expected_series_id()
