"""The pinned upstream converter (``convert_hf_to_gguf.py`` from the prepared llama.cpp tree).

Used as the reference that ``qwen35-convert`` must match byte for byte, and by ``make demo``.
It runs in a subprocess with the tree's own ``gguf-py``; output is written atomically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LLAMA_DIR = ROOT / "build" / "src" / "vendor" / "llama.cpp"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class UpstreamError(RuntimeError):
    pass


def _has_mtp(hf_dir: Path) -> bool:
    cfg = json.loads((hf_dir / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return bool(text.get("mtp_num_hidden_layers") or cfg.get("mtp_num_hidden_layers"))


def convert(hf_dir: Path, out: Path, outtype: str = "f16", mtp: str = "keep", mmproj: bool = False) -> Path:
    """Convert hf_dir to out with upstream's converter; raises UpstreamError with its last lines.

    mtp: keep (the nextn block when the checkpoint has one), drop (--no-mtp), only (--mtp).
    mmproj: the vision projector instead of the text model (--mmproj); out may then be a folder,
    where upstream names the file itself (the path written is returned)."""
    script = LLAMA_DIR / "convert_hf_to_gguf.py"
    if not script.exists():
        raise UpstreamError(f"{script} is missing; run `make setup` to prepare the pinned llama.cpp tree")
    if outtype not in OUTTYPES:
        raise UpstreamError(f"upstream's converter writes {', '.join(OUTTYPES)}, not {outtype!r}")
    if mmproj and out.is_dir():
        before = set(out.iterdir())
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(out), "--outtype", outtype, "--mmproj"]
        r = subprocess.run(
            cmd, env=dict(os.environ, PYTHONPATH=str(LLAMA_DIR / "gguf-py")), capture_output=True, text=True
        )
        if r.returncode != 0:
            raise UpstreamError(f"upstream convert_hf_to_gguf.py --mmproj failed on {hf_dir}:\n{r.stderr[-600:]}")
        (made,) = set(out.iterdir()) - before
        return made
    tmp = out.with_name(out.name + ".partial")
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    elif mtp == "only":
        cmd.append("--mtp")
    elif mtp == "drop" or not _has_mtp(hf_dir):
        cmd.append("--no-mtp")  # upstream asserts on a checkpoint without MTP otherwise
    env = dict(os.environ, PYTHONPATH=str(LLAMA_DIR / "gguf-py"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        raise UpstreamError(f"upstream convert_hf_to_gguf.py failed on {hf_dir}:\n{tail}")
    os.replace(tmp, out)
    return out
