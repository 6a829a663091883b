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

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

QWEN35 = str(Path(sys.executable).parent / "qwen35")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, lib_dir):
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("chatcli")
    out = d / "q8.gguf"
    convert(tiny.make_checkpoint(d / "hf"), out, file_type="Q8_0")
    return out


class Terminal:
    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.p = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
            env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
        )
        os.close(slave)
        self.seen = ""

    def expect(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.seen)
            if m:
                self.seen = self.seen[m.end() :]
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

    def wait_reading(self, timeout=60):
        """Until the program waits for a line. Ctrl-C in the instant between drawing the prompt
        and starting to wait would be lost (the handler would run once a key comes: CPython's
        readline), as no person can press it; so the tests press it while the program waits."""
        wchan = Path(f"/proc/{self.p.pid}/wchan")
        if not wchan.exists():
            time.sleep(1)
            return
        deadline = time.monotonic() + timeout
        while not any(w in wchan.read_text() for w in ("poll", "select", "wait_woken")):
            assert time.monotonic() < deadline, f"not waiting for input: {wchan.read_text()!r}"
            time.sleep(0.02)


def test_interactive_chat_in_a_terminal(gguf, tmp_path):
    t = Terminal(
        [
            QWEN35,
            "chat",
            str(gguf),
            "--ctx",
            "2048",
            "-n",
            "6",
            "--no-think",
            "--threads",
            str(usable_cpus()),
            "--top-k",
            "7",
            "--seed",
            "3",
        ]
    )
    # the banner names the sampling in use, and that images need a projector
    t.expect(r"thinking off, images off \(--mmproj\), sampling: temperature [\d.]+, top-k 7, ")
    t.expect(r"> ")
    t.send("Hello, how are you?")
    t.expect(r"\n> ")
    t.send("/stats")
    first = t.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) evaluated")
    assert int(first.group(2)) == 0 and int(first.group(3)) == int(first.group(1))
    t.expect(r"sampling: temperature [\d.]+, top-k 7, .*seed 3")
    t.send("a second line \\")  # continuation line
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
    r = subprocess.run(
        [QWEN35, "chat", str(gguf), "-p", "Hi!", "-n", "5", "--json", "--threads", str(usable_cpus())],
        capture_output=True,
        text=True,
    )
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

    r = subprocess.run(
        [QWEN35, "chat", str(gguf), "-p", "Hi!", "-n", "3", "--json", "--threads", str(usable_cpus()), "-ngl", "99"],
        capture_output=True,
        text=True,
    )
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


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(gguf):
    """Ctrl-C during a reply stops it and keeps it; Ctrl-C at the prompt drops the line; neither ends
    the chat (the terminal sends SIGINT to the foreground process: here sent to it directly)."""
    import signal

    t = Terminal(
        [QWEN35, "chat", str(gguf), "--ctx", "8192", "-n", "6000", "--no-think", "--threads", str(usable_cpus())]
    )
    t.expect(r"\n> ")
    t.send("Tell me a very long story.")
    t.expect(r"story\.\n[^\n>]{20}")  # the reply has started streaming
    t.p.send_signal(signal.SIGINT)
    t.expect(r"\[stopped: the reply so far is kept\]")
    t.expect(r"\n> ")
    t.send("/stats")
    stats = t.expect(r"prompt (\d+) tokens: (\d+) reused, (\d+) evaluated .* \| reply (\d+) tokens")
    assert 0 < int(stats.group(4)) < 6000
    t.expect(r"\n> ")
    t.wait_reading()
    t.p.send_signal(signal.SIGINT)  # at the prompt
    t.expect(r"Ctrl-D or /quit leaves")
    t.send("/reset")
    t.expect(r"conversation cleared")
    t.send("/quit")
    assert t.p.wait(timeout=60) == 0


def test_a_message_that_does_not_fit_is_not_sent(gguf):
    """Over --ctx: one error line naming the command's own fixes, and the conversation is as before
    (the next, shorter message is answered); --overflow drop-oldest drops instead, with a note."""
    long = "word " * 300
    r = subprocess.run(
        [QWEN35, "chat", str(gguf), "--ctx", "256", "-n", "8", "--no-think", "--threads", str(usable_cpus())],
        input=f"{long}\nHello\n/stats\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was not sent" in errors[0], r.stderr
    assert "--ctx" in errors[0] and "--overflow drop-oldest" in errors[0] and "n_ctx" not in errors[0]
    stats = re.search(r"prompt (\d+) tokens", r.stderr)
    assert stats and int(stats.group(1)) < 60, r.stderr  # only "Hello" was sent
    r = subprocess.run(
        [QWEN35, "chat", str(gguf), "-p", long, "--ctx", "256", "--threads", str(usable_cpus())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and r.stdout.strip() == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "was not sent; use a larger --ctx" in r.stderr
    msgs = "".join(f"Question {i}: " + "tell me more " * 12 + "\n" for i in range(6))
    r = subprocess.run(
        [
            QWEN35,
            "chat",
            str(gguf),
            "--ctx",
            "256",
            "-n",
            "24",
            "--no-think",
            "--threads",
            str(usable_cpus()),
            "--overflow",
            "drop-oldest",
        ],
        input=msgs,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    assert re.search(r"note: the \d+ oldest messages were left out to fit the 256-token context", r.stderr)
    # llama.cpp allocates 256 tokens for --ctx 128; the limit and the message are the 128 asked for
    r = subprocess.run(
        [QWEN35, "chat", str(gguf), "-p", "word " * 120, "--ctx", "128", "--threads", str(usable_cpus())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "128-token context" in r.stderr, r.stderr


def test_ctrl_c_in_one_shot_mode_exits_130(gguf):
    """During the reply: what came is printed, then one error line. While the model loads
    (llama.cpp logging through its Python callback, where ctypes used to drop the interrupt and
    the whole reply went on): the load stops, the same exit."""
    import signal

    argv = [
        QWEN35,
        "chat",
        str(gguf),
        "-p",
        "Tell me a very long story.",
        "--ctx",
        "8192",
        "-n",
        "8000",
        "--threads",
        str(usable_cpus()),
    ]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.read(1)  # the reply has started
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines() == ["error: interrupted"], err
    assert len(first + out) < 8000
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "QWEN35_DEBUG": "1"}
    )  # llama.cpp's log on stderr
    p.stderr.readline()  # the load has started
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err[-2000:]
    assert out.strip() == "" and "Exception ignored" not in err


def test_reasoning_and_replies_are_shown_verbatim():
    """Model text is never read as rich markup: "list[int]" keeps its brackets and a stray "[/x]"
    does not end the chat (rich raises MarkupError on it)."""
    import io

    from rich.console import Console

    from qwen35.bindings.chat import ContentDelta, ReasoningDelta
    from qwen35.bindings.chat_cli import _turn

    class Session:
        last = None

        def stream(self, text, sampling, images=None):
            yield ReasoningDelta("x is list[int], [bold]not bold[/bold] and [/x] ")
            yield ContentDelta("dict[str, int] [/y]")

    buf = io.StringIO()
    out = Console(file=buf, highlight=False, soft_wrap=True, force_terminal=False)
    session = Session()
    session.last = type("R", (), {"usage": type("U", (), {"dropped_messages": 0})()})()
    _turn(session, "q", None, out, out)
    assert buf.getvalue() == "x is list[int], [bold]not bold[/bold] and [/x] \ndict[str, int] [/y]\n"


def test_a_checkpoint_folder_is_named_with_the_command_that_converts_it(tmp_path):
    hf = Path(__file__).resolve().parent.parent / "examples" / "models" / "qwen35-dense-tiny"
    text = tmp_path / "t.txt"
    text.write_text("hello")
    for argv in (
        [QWEN35, "chat", str(hf), "-p", "hi"],
        [QWEN35, "quant", "eval", str(hf), str(hf), "--text", str(text)],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "Hugging Face checkpoint folder" in r.stderr and f"qwen35-convert {hf}" in r.stderr


def test_help_shows_flags_as_flags():
    convert = str(Path(sys.executable).parent / "qwen35-convert")
    for argv in (
        [convert, "--help"],
        [QWEN35, "chat", "--help"],
        [QWEN35, "quant", "imatrix", "--help"],
        [QWEN35, "verify", "--help"],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "--" in r.stdout and "<bool>" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def vision_gguf(tmp_path_factory, lib_dir):
    """A multimodal checkpoint converted as users do: the projector lands beside the model."""
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("chatcli-vision")
    (d / "models").mkdir()
    out = d / "models" / "q8.gguf"
    s = convert(tiny.make_checkpoint(d / "hf", layout="multimodal"), out, file_type="Q8_0")
    assert s.mmproj and Path(s.mmproj["path"]).parent == out.parent
    png = d / "picture.png"
    from PIL import Image as PILImage

    PILImage.fromarray(np.random.default_rng(5).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(png)
    return out, Path(s.mmproj["path"]), png


def test_one_shot_with_an_image_answers_as_the_python_api(vision_gguf):
    """--image finds the projector beside the model; the reply and its usage are the Chat API's."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model
    from qwen35.bindings.sampling import SamplingParams

    gguf, mmproj, png = vision_gguf
    argv = [QWEN35, "chat", str(gguf), "-p", "What is it?", "--image", str(png), "-n", "5", "--temp", "0", "--json"]
    r = subprocess.run([*argv, "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with Model.load(gguf, n_ctx=8192, n_threads=1, mmproj=mmproj) as m:
        ref = Chat(m).send("What is it?", SamplingParams(temperature=0, max_tokens=5), images=[png])
    assert out["content"] == ref.content and out["reasoning"] == ref.reasoning
    assert out["usage"]["prompt_tokens"] == ref.usage.prompt_tokens
    # the image is in the prompt: 12 embeddings (96x128 pixels, 32-pixel merged patches)
    r = subprocess.run([*argv[:5], *argv[7:], "--threads", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["prompt_tokens"] == ref.usage.prompt_tokens - 12 - 2  # and vision start, end
    # without a projector to find: one line naming the fix
    lone = gguf.parent.parent / "lone.gguf"
    os.link(gguf, lone)  # a hard link: the same file, in a folder without a projector
    r = subprocess.run([QWEN35, "chat", str(lone), "-p", "Hi", "--image", str(png)], capture_output=True, text=True)
    assert r.returncode == 1 and "pass --mmproj FILE" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_image_command_in_a_terminal(vision_gguf, tmp_path):
    gguf, mmproj, png = vision_gguf
    t = Terminal([QWEN35, "chat", str(gguf), "--mmproj", str(mmproj), "-n", "3", "--no-think", "--threads", "1"])
    t.expect(r"images on \(" + re.escape(mmproj.name) + r"\)")
    t.expect(r"> ")
    t.send(f"/image {tmp_path / 'nope.png'}")
    t.expect(r"error: cannot read image")
    t.send(f"/image {png}")
    t.expect(r"\(128x96\) goes with your next message")
    t.send("What is it?")
    t.expect(r"\n> ")
    t.send("/stats")
    with_image = t.expect(r"prompt (\d+) tokens")
    t.send("/reset")
    t.expect(r"conversation cleared")
    t.send("What is it?")
    t.expect(r"\n> ")
    t.send("/stats")
    without = t.expect(r"prompt (\d+) tokens")
    assert int(with_image.group(1)) == int(without.group(1)) + 12 + 2
    t.send("/quit")
    assert t.p.wait(timeout=60) == 0
