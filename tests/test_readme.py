"""The README's examples run as written: its Python blocks (against the GGUF `make demo` writes, made
here the same way) print what they say they print, and its shell commands, in order, in a folder laid
out like the repository, exit 0 with the output they promise. `make` lines name real targets (they
are what runs the suite itself)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
COMMANDS = [
    line.split("  #")[0].strip()
    for block in re.findall(r"```sh\n(.*?)```", README, re.S)
    for line in block.splitlines()
    if line.strip()
]
SHELL = [c for c in COMMANDS if not c.startswith("make ")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, lib_dir):
    """A folder laid out like the repository after `make demo`."""
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("readme")
    (d / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (d / "build" / "demo").mkdir(parents=True)
    convert(
        ROOT / "examples" / "models" / "qwen35-dense-tiny",
        d / "build" / "demo" / "qwen35-dense-tiny-Q4_K_M.gguf",
        file_type="Q4_K_M",
    )
    return d


def test_there_are_examples():
    assert len(BLOCKS) >= 2


def _make_serve(workdir):
    """What `make serve` starts (the README's server example runs beside it)."""
    import httpx

    gguf = workdir / "build" / "demo" / "qwen35-dense-tiny-Q4_K_M.gguf"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "qwen35"), "serve", str(gguf), "--alias", "qwen35-demo"])
    for _ in range(600):
        try:
            if httpx.get("http://127.0.0.1:8000/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("qwen35 serve did not start on port 8000")


def test_make_serve_serves_the_demo_model_as_the_readme_says():
    makefile = (ROOT / "Makefile").read_text()
    assert "qwen35 serve $(DEMO_GGUF) --alias qwen35-demo" in makefile
    assert "DEMO_GGUF := build/demo/qwen35-dense-tiny-Q4_K_M.gguf" in makefile


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example_runs_as_written(workdir, i):
    server = _make_serve(workdir) if "openai.OpenAI(" in BLOCKS[i] else None
    try:
        r = subprocess.run([sys.executable, "-c", BLOCKS[i]], cwd=workdir, capture_output=True, text=True, timeout=600)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    assert r.returncode == 0, r.stderr[-3000:]
    if "chat.save(" in BLOCKS[i]:
        assert (workdir / "paris.chat").is_file()
        assert "ToolCall(name='get_weather'" in r.stdout.splitlines()[-1], r.stdout[-500:]
    if "reply.speculation" in BLOCKS[i]:
        assert "Speculation(steps=" in r.stdout
    if "openai.OpenAI(" in BLOCKS[i]:  # the server example: two replies, the second reusing the first
        lines = [line for line in r.stdout.splitlines() if "| cached tokens:" in line]
        assert len(lines) == 2 and int(lines[1].rsplit(":", 1)[1]) > 0, r.stdout


def test_readme_make_lines_name_real_targets():
    makefile = (ROOT / "Makefile").read_text()
    targets = {m for m in re.findall(r"^([a-z][\w-]*):", makefile, re.M)}
    used = [c.split()[1] for c in COMMANDS if c.startswith("make ")]
    assert used and set(used) <= targets, set(used) - targets


@pytest.fixture(scope="module")
def shell_results(tmp_path_factory, lib_dir):
    """Every shell command of the README, in order, in one folder with the repository's .venv and
    examples/ (as a user runs them from a checkout)."""
    d = tmp_path_factory.mktemp("readme-sh")
    (d / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (d / "examples").symlink_to(ROOT / "examples")
    results = {}
    for c in SHELL:
        results[c] = subprocess.run(["bash", "-c", c], cwd=d, capture_output=True, text=True, timeout=900)
    return d, results


def test_readme_shell_commands_run_as_written(shell_results):
    d, results = shell_results
    assert len(SHELL) >= 8
    for c, r in results.items():
        assert r.returncode == 0, f"{c}\n{r.stderr[-2000:]}"
    for f in ("dense-Q4_K_M.gguf", "dense-F32.gguf", "imatrix.gguf", "dense-IQ4_XS.gguf"):
        assert (d / f).is_file(), f
    assert not (d / "moe-Q8_0.gguf").exists()  # --dry-run writes nothing


def test_readme_shell_commands_print_what_they_promise(shell_results):
    _, results = shell_results
    by = lambda prefix: next(r.stdout for c, r in results.items() if c.startswith(prefix))
    assert "Q4_K_M" in by(".venv/bin/qwen35 inspect") and "recurrent" in by(".venv/bin/qwen35 inspect").lower()
    assert re.search(r"^verdict +PASS", by(".venv/bin/qwen35 verify"), re.M)
    reply = json.loads(by(".venv/bin/qwen35 chat"))
    assert reply["content"] and reply["finish_reason"] in ("stop", "length")
    ev = by(".venv/bin/qwen35 quant eval")
    assert "dense-Q4_K_M.gguf" in ev and "dense-IQ4_XS.gguf" in ev
