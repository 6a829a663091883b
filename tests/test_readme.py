"""The README's Python examples run as written (against the GGUF `make demo` writes, made here the
same way), and print what they say they print."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, lib_dir):
    """A folder laid out like the repository after `make demo`."""
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("readme")
    (d / "build" / "demo").mkdir(parents=True)
    convert(
        ROOT / "examples" / "models" / "qwen35-dense-tiny",
        d / "build" / "demo" / "qwen35-dense-tiny-Q4_K_M.gguf",
        file_type="Q4_K_M",
    )
    return d


def test_there_are_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs_as_written(workdir, i):
    r = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=workdir, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if "chat.save(" in BLOCKS[i]:
        assert (workdir / "paris.chat").is_file()
        assert "ToolCall(name='get_weather'" in r.stdout.splitlines()[-1], r.stdout[-500:]
    if "reply.speculation" in BLOCKS[i]:
        assert "Speculation(steps=" in r.stdout
