"""qwen35-convert when things go wrong mid-run, each fault made for real: a disk that fills up (a
small tmpfs mounted here), SIGKILL, Ctrl-C (SIGINT), a shard cut short while it is being read.
Each ends in one line naming the problem, and never leaves a file that looks like a model."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONVERT = str(Path(sys.executable).parent / "qwen35-convert")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, lib_dir):
    from support import tiny

    return tiny.make_checkpoint(tmp_path_factory.mktemp("faults") / "hf")


def _start(src: Path, out: Path, type_: str = "F32", *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [CONVERT, str(src), "-o", str(out), "--type", type_, "--threads", "1", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _when_writing(p: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Wait until the conversion has begun writing OUT.partial (and is still running)."""
    partial = out.with_name(out.name + ".partial")
    t0 = time.monotonic()
    while not (partial.exists() and partial.stat().st_size > 0):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < timeout, "the conversion never started writing"
        time.sleep(0.002)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_sigkill_leaves_only_the_partial_which_the_next_run_names_and_replaces(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    p = _start(ckpt, out)
    _when_writing(p, out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.gguf.partial"]
    r = subprocess.run([CONVERT, str(ckpt), "-o", str(out), "--type", "F32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"note: replacing {partial}" in r.stderr
    assert out.exists() and not partial.exists()
    from qwen35.gguf_scan import qwen35_hparams, scan

    assert qwen35_hparams(scan(out))["n_layer"] == 8  # a whole model, not the killed run's bytes


def test_ctrl_c_exits_130_and_leaves_nothing(ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    p = _start(ckpt, out)
    _when_writing(p, out)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in _one_line(err)
    assert os.listdir(tmp_path) == []


def test_a_shard_cut_short_while_it_is_read_is_one_line(ckpt, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(ckpt, src)
    shard = next(src.glob("*.safetensors"))
    out = tmp_path / "m.gguf"
    # BF16 -> BF16 copies each tensor from the shard as it is written: the cut is met mid-copy
    p = _start(src, out, "BF16")
    _when_writing(p, out)
    os.truncate(shard, shard.stat().st_size // 2)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    line = _one_line(err)
    assert shard.name in line and "truncated" in line, line
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_a_full_disk_is_one_line_naming_it_and_leaves_nothing(ckpt, tmp_path):
    """A real tmpfs with room for the output when the conversion starts; another writer takes the
    room while it is writing (as a download or a log would)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    need = 140 << 20  # the F32 output is ~127 MiB; the converter asks for it + 64 MiB up front
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={need + (80 << 20)}", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        out = mnt / "m.gguf"
        p = _start(ckpt, out)
        _when_writing(p, out)
        # everything that is left (tmpfs may round the last pages)
        with open(mnt / "filler", "wb") as f, contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(mnt).free)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        line = _one_line(err)
        assert "is full" in line and str(mnt) in line, line
        assert sorted(os.listdir(mnt)) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
