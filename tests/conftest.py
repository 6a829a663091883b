import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cpp_patches" / "reference"))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    """Directory of the patched native libraries the bindings load (built by `make setup`)."""
    from qwen35.bindings import native

    native.load()  # fails the test with the clear message when the build is missing or stale
    return native.library_dir().resolve()


@pytest.fixture(scope="session")
def build_bin(lib_dir) -> Path:
    """The build's bin folder (tools beside the libraries: build/$BACKEND/bin)."""
    return next(lib_dir.glob("libllama.*")).resolve().parent


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory, lib_dir) -> Path:
    """The dense tiny checkpoint (qwen35.tiny defaults) converted to F32 by qwen35-convert."""
    from qwen35 import tiny
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("tiny-f32")
    out = d / "f32.gguf"
    convert(tiny.make_checkpoint(d / "hf"), out, file_type="F32")
    return out


@pytest.fixture(scope="session")
def tiny_moe_f32(tmp_path_factory, lib_dir) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of the tiny MoE checkpoint (8 experts, top-2, shared expert)."""
    from qwen35 import tiny
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("tiny-moe-f32")
    hf = tiny.make_checkpoint(d / "hf", moe=True)
    out = d / "f32.gguf"
    convert(hf, out, file_type="F32")
    return hf, out
