"""Fuzz every parser that takes outside bytes with many inputs (tests/support/fuzz.py targets).

    .venv/bin/python bench/fuzz.py                      # 100,000 inputs per target
    .venv/bin/python bench/fuzz.py --count 2000 --target gguf --target reply
    .venv/bin/python bench/fuzz.py --target gguf-load --seed 123   # replay one input

Each target runs in a worker process of its own: a native crash (an abort in llama.cpp) ends
only that worker, and the input it was running is reported and skipped. Inputs are numbered;
input N of a target is the same on every machine. Prints a table (``--json`` for a script):
inputs, how many were taken and how many refused with the one-line error, findings (anything
else: another exception, a 5xx, a crash), and the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = [
    "checkpoint-config",
    "checkpoint-index",
    "checkpoint-safetensors",
    "checkpoint-tokenizer",
    "gguf",
    "gguf-load",
    "imatrix-gguf",
    "imatrix-dat",
    "saved-chat",
    "saved-chat-sealed",
    "reply",
    "image",
    "server-body",
]


def build(names: list[str], work: Path):
    """The targets named, with what they need built once in work."""
    from support import fuzz

    wanted = set(names)
    out = {}
    if wanted & {"checkpoint-config", "checkpoint-index", "checkpoint-safetensors", "checkpoint-tokenizer"}:
        out.update({t.name: t for t in fuzz.checkpoint_targets(work)})
    if wanted & {"gguf", "gguf-load", "imatrix-gguf", "imatrix-dat", "saved-chat", "saved-chat-sealed", "server-body"}:
        gguf = fuzz.micro_gguf(fuzz.micro_checkpoint(work / "micro-hf"), work / "micro.gguf")
        out["gguf"] = fuzz.gguf_target(work, gguf)
        out["gguf-load"] = fuzz.gguf_load_target(work, gguf)
        from qwen35.gguf_scan import scan

        names2 = [(t.name, t.ne[0]) for t in scan(gguf).tensors if len(t.ne) == 2][:6]
        out.update({t.name: t for t in fuzz.imatrix_targets(work, names2)})
        if wanted & {"saved-chat", "saved-chat-sealed"}:
            from qwen35.bindings.model import Model

            model = Model.load(gguf, n_ctx=256, n_threads=1)
            out.update({t.name: t for t in fuzz.saved_chat_targets(work, model)})
        if "server-body" in wanted:
            out["server-body"] = fuzz.server_target(fuzz.server_client(gguf))
    out["reply"] = fuzz.reply_target()
    if "image" in wanted:
        out["image"] = fuzz.image_target()
    return {n: out[n] for n in names}


def worker(name: str, start: int, count: int, progress: Path, result: Path) -> None:
    """Run inputs start.. of one target; write the stats and findings to result. The number of the
    input being run is kept in progress (before a native one runs), for the parent to report a crash."""
    import logging

    logging.disable(logging.WARNING)  # errors (a 5xx's traceback) still reach stderr
    os.environ.setdefault("QWEN35_QUIET", "1")
    with tempfile.TemporaryDirectory(prefix="qwen35-fuzz-") as tmp:
        target = build([name], Path(tmp))[name]
        from support.fuzz import Finding

        findings = []
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # created once the target is built
        t0 = time.perf_counter()
        for seed in range(start, start + count):
            if target.native or seed % 1000 == 0:
                os.pwrite(fd, f"{seed:<20d}".encode(), 0)
            try:
                target.check(seed)
            except Finding as e:
                findings.append({"seed": seed, "what": str(e)[:400]})
        result.write_text(
            json.dumps({"stats": target.stats, "findings": findings, "seconds": time.perf_counter() - t0})
        )


def run_target(name: str, count: int, first: int = 0) -> dict:
    """All count inputs of one target, in workers; a crashed worker is reported and restarted
    after the input that crashed it."""
    total = {"inputs": 0, "accepted": 0, "refused": 0}
    findings, seconds, start = [], 0.0, first
    with tempfile.TemporaryDirectory() as tmp:
        progress, result = Path(tmp) / "progress", Path(tmp) / "result.json"
        while start < first + count:
            result.unlink(missing_ok=True)
            progress.unlink(missing_ok=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", name, "--seed", str(start), "--count"]
            p = subprocess.run([*cmd, str(first + count - start), "--progress", str(progress), "--result", str(result)])
            seconds += time.perf_counter() - t0
            if p.returncode == 0 and result.exists():
                r = json.loads(result.read_text())
                for k in total:
                    total[k] += r["stats"][k]
                findings += r["findings"]
                break
            if not progress.exists() or not progress.read_text().strip():
                findings.append(
                    {"seed": start, "what": f"the worker failed before its first input (exit {p.returncode})"}
                )
                break
            crashed = int(progress.read_text().strip())
            findings.append({"seed": crashed, "what": f"the process died (exit {p.returncode}) on this input"})
            total["inputs"] += crashed - start + 1  # the inputs before it ran; their split is lost
            start = crashed + 1
    return {"target": name, **total, "findings": findings, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", action="append", choices=TARGETS, help="a target (default: all)")
    ap.add_argument("--count", type=int, default=100_000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=0, help="the first input's number (with --count 1: replay it)")
    ap.add_argument("--json", action="store_true", help="results as JSON on stdout")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.seed, a.count, a.progress, a.result)
        return
    rows = []
    for name in a.target or TARGETS:
        rows.append(run_target(name, a.count, a.seed))
        r = rows[-1]
        if not a.json:
            print(
                f"{r['target']:24s} {r['inputs']:>8,d} inputs {r['accepted']:>7,d} taken {r['refused']:>8,d} refused "
                f"{len(r['findings']):>3d} findings {r['seconds']:>7.1f} s",
                flush=True,
            )
            for f in r["findings"][:5]:
                print(f"    seed {f['seed']}: {f['what']}", flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))
    sys.exit(1 if any(r["findings"] for r in rows) else 0)


if __name__ == "__main__":
    main()
