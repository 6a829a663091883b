"""The patch pipeline: series applies as commits, a broken patch stops `make setup` naming it,
and `make patches-export` regenerates byte-identical patch files from the prepared tree."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "cpp_patches" / "tree.py"


def _patches(d: Path) -> list[Path]:
    return [
        d / line.strip()
        for line in (d / "series").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _env(patch_dir: Path) -> dict:
    return dict(os.environ, QWEN35_PATCH_DIR=str(patch_dir), QWEN35_CACHE_DIR=str(ROOT / ".cache"))


@pytest.fixture()
def patch_copy(tmp_path) -> Path:
    d = tmp_path / "patches"
    shutil.copytree(ROOT / "cpp_patches", d, ignore=shutil.ignore_patterns("__pycache__", "reference", "cuda"))
    return d


def test_series_applies_as_one_commit_per_patch(tmp_path, patch_copy):
    src = tmp_path / "src"
    r = subprocess.run(
        ["python3", str(TREE), "prepare", str(src)], env=_env(patch_copy), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    llama = src / "vendor" / "llama.cpp"
    log = subprocess.run(
        ["git", "log", "--format=%s", "base..HEAD"], cwd=llama, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    subjects = [p.read_text().split("Subject: [PATCH] ", 1)[1].splitlines()[0] for p in _patches(patch_copy)]
    assert list(reversed(log)) == subjects
    assert "llama_qwen35_patch_series" in (llama / "include" / "llama-qwen35.h").read_text()

    # export from the prepared tree reproduces the patch files byte for byte
    out = tmp_path / "exported"
    out.mkdir()
    (out / "series").write_text("")
    r = subprocess.run(["python3", str(TREE), "export", str(src)], env=_env(out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in _patches(out)] == [p.name for p in _patches(patch_copy)]
    for a, b in zip(_patches(out), _patches(patch_copy)):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_corrupted_patch_stops_make_setup_naming_it(tmp_path, patch_copy):
    victim = _patches(patch_copy)[0]
    text = victim.read_text()
    # break a context line of the first hunk so it no longer matches llama.cpp's source
    broken = text.replace(" set(LLAMA_PUBLIC_HEADERS", " set(LLAMA_PUBLIC_HEADERS_RENAMED", 1)
    assert broken != text
    victim.write_text(broken)
    r = subprocess.run(
        ["make", "-C", str(ROOT), "setup", f"SRC={tmp_path / 'src'}", f"BUILD={tmp_path / 'build'}", "BACKEND=cpu"],
        env=_env(patch_copy),
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    err = r.stderr
    assert f"patch {victim.name} does not apply" in err
    assert "CMakeLists.txt" in err  # the hunk's file, from git's message
    assert "make patches-export" in err
    assert not (tmp_path / "src").exists()  # nothing half-patched left behind
    assert not (tmp_path / "build").exists()


def test_missing_patch_file_is_named(tmp_path, patch_copy):
    (patch_copy / "series").write_text((patch_copy / "series").read_text() + "0099-missing.patch\n")
    r = subprocess.run(
        ["python3", str(TREE), "prepare", str(tmp_path / "src")], env=_env(patch_copy), capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "0099-missing.patch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_series_id_tracks_patch_content(patch_copy):
    def sid():
        return subprocess.run(
            ["python3", str(TREE), "series-id"], env=_env(patch_copy), capture_output=True, text=True, check=True
        ).stdout.strip()

    before = sid()
    victim = _patches(patch_copy)[0]
    victim.write_text(victim.read_text() + "\n")
    assert sid() != before and sid().startswith("qwen35-")
