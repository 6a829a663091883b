"""`qwen35 chat` as a real terminal program (driven through a pseudo-terminal), and -p one-shot."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

QWEN35 = str(Path(sys.executable).parent / "qwen35")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, lib_dir):
    from qwen35 import tiny
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("chatcli")
    out = d / "q8.gguf"
    convert(tiny.make_checkpoint(d / "hf"), out, file_type="Q8_0")
    return out


class Terminal:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                  env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
        os.close(slave)
        self.seen = ""

    def expect(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            r, _, _ = select.select([self.master], [], [], 0.5)
            if r:
                try:
                    self.seen += ANSI.sub("", os.read(self.master, 65536).decode(errors="replace")).replace("\r", "")
                except OSError:
                    break
        raise AssertionError(f"{pattern!r} not seen; got {self.seen[-2000:]!r}")

    def send(self, line):
        os.write(self.master, line.encode() + b"\r")


def test_interactive_chat_in_a_terminal(gguf, tmp_path):
    t = Terminal([QWEN35, "chat", str(gguf), "--ctx", "2048", "-n", "6", "--no-think", "--threads", "2"])
    t.expect(r"thinking off")
    t.expect(r"> ")
    t.send("Hello, how are you?")
    t.expect(r"\n> ")
    t.send("/stats")
    first = t.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) evaluated")
    assert int(first.group(2)) == 0 and int(first.group(3)) == int(first.group(1))
    t.send("a second line \\")          # continuation line
    t.expect(r"\. ")
    t.send("that goes on")
    t.expect(r"\n> ")
    t.send("/stats")
    second = t.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) evaluated")
    assert int(second.group(2)) > 0 and int(second.group(3)) < int(second.group(1))
    t.send(f"/save {tmp_path / 'missing' / 's.chat'}")
    t.expect(r"error: cannot save to .*does not exist")
    t.send(f"/save {tmp_path / 's.chat'}")
    t.expect(r"saved to")
    t.send("/reset")
    t.expect(r"conversation cleared")
    t.send(f"/load {tmp_path / 's.chat'}")
    t.expect(r"loaded .*: 4 messages, \d+ tokens, nothing re-evaluated")
    t.send("/think on")
    t.expect(r"thinking on")
    t.send("/bogus")
    t.expect(r"unknown command")
    t.send("/quit")
    assert t.p.wait(timeout=60) == 0


def test_one_shot_json(gguf):
    r = subprocess.run([QWEN35, "chat", str(gguf), "-p", "Hi!", "-n", "5", "--json", "--threads", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["usage"]["completion_tokens"] == 5 and out["finish_reason"] == "length"
    assert out["usage"]["evaluated_tokens"] == out["usage"]["prompt_tokens"] > 0


def test_gpu_layers_on_a_build_without_a_gpu_backend_say_so(gguf, caplog):
    """-ngl on a CPU-only build: the reply as usual, and one line on stderr saying the layers stay
    on the CPU and how to get a GPU build (llama.cpp says it only in the log the bindings silence).
    The Python API logs the same note (logger "qwen35", WARNING). With a GPU backend: no note."""
    from qwen35.bindings import devices
    from qwen35.bindings.model import Model

    r = subprocess.run([QWEN35, "chat", str(gguf), "-p", "Hi!", "-n", "3", "--json", "--threads", "2", "-ngl", "99"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] == 3
    if devices.gpu_devices():
        assert r.stderr == ""
        return
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("note: n_gpu_layers (-ngl) 99 has no effect")
    assert "make setup BACKEND=cuda" in r.stderr
    with caplog.at_level("WARNING", logger="qwen35"):
        Model.load(gguf, n_ctx=64, n_gpu_layers=-1).close()
    assert [r.name for r in caplog.records] == ["qwen35"] and "no GPU backend" in caplog.records[0].getMessage()
