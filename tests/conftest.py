import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cpp_patches" / "reference"))
sys.path.insert(0, str(ROOT / "tests"))


def pytest_configure(config):
    """`make test` runs the suite on one pytest-xdist worker per CPU. Each worker is pinned here to
    its own share of the CPUs, before any test module is imported, so the bindings, the tools and
    the tests (qwen35.cpus.usable_cpus) use that many threads. Unpinned, two workers would each run
    llama.cpp with two threads on two cores, and llama.cpp's threads meet at a spinning barrier
    after every graph node: test_interrupt's turns ran about 20x slower that way on a 2-core
    machine, against 1.3x slower for one thread each instead of two threads alone."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= workers:
        share = cpus[int(worker[2:]) % workers :: workers]
        try:
            os.sched_setaffinity(0, share)
        except OSError as e:  # correct either way, only slower
            import warnings

            warnings.warn(f"pytest worker {worker} could not be pinned to CPUs {share}: {e}", stacklevel=2)


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    """Directory of the patched native libraries the bindings load (built by `make setup`)."""
    from qwen35 import native

    native.load()  # fails the test with the clear message when the build is missing or stale
    return native.library_dir().resolve()


@pytest.fixture(scope="session")
def build_bin(lib_dir) -> Path:
    """The build's bin folder (tools beside the libraries: build/$BACKEND/bin)."""
    return next(lib_dir.glob("libllama.*")).resolve().parent


@pytest.fixture(scope="session")
def tiny_f32_gguf(tmp_path_factory, lib_dir) -> Path:
    """The dense tiny checkpoint (support.tiny defaults) converted to F32 by qwen35-convert."""
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("tiny-f32")
    out = d / "f32.gguf"
    convert(tiny.make_checkpoint(d / "hf"), out, file_type="F32")
    return out


@pytest.fixture(scope="session")
def tiny_moe_f32(tmp_path_factory, lib_dir) -> tuple[Path, Path]:
    """(HF folder, F32 GGUF) of the tiny MoE checkpoint (8 experts, top-2, shared expert)."""
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("tiny-moe-f32")
    hf = tiny.make_checkpoint(d / "hf", moe=True)
    out = d / "f32.gguf"
    convert(hf, out, file_type="F32")
    return hf, out


@pytest.fixture(scope="session")
def trained_dense_gguf(tmp_path_factory, lib_dir) -> Path:
    """The trained dense demo checkpoint (examples/models/qwen35-dense-tiny) as Q8_0: real
    logits, its generation_config's recommended sampling in general.sampling.*."""
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("trained-dense-q8")
    return convert(ROOT / "examples" / "models" / "qwen35-dense-tiny", d / "dense-Q8_0.gguf", file_type="Q8_0").path
