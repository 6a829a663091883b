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
