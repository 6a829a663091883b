"""Run gpu_session.sh's steps in one device call, within a time budget, and keep what they leave.

    bash cpp_patches/cuda/gpu_session.sh --budget 480 all
    bash cpp_patches/cuda/gpu_session.sh --budget 150 build warm fla sanitize

A device call has a hard limit (10 minutes a command, 15 minutes of device time a session with
the machine's start), returns at most 8 files from $OUT, and a command killed at its limit leaves
only what is already there. So:

* each step runs as `gpu_session.sh --one STEP`, in its own process group, cut at the deadline
  (--budget seconds from the start, less a few for the last write);
* steps that need the CUDA build (ops, e2e, model) or prep's GGUF (model) are put off while those
  run in the background; the next step given that needs neither runs first, so the build's
  minutes are spent on the harness's checks and timings;
* after each step, $OUT holds summary.txt (all that was printed), steps.json (each step: ok,
  failed, cut, not run; seconds) and gdn-logs.tar.gz (every log and JSON the steps wrote, the
  build's and prep's logs too), each written whole and renamed into place;
* the last lines name the steps that did not finish, as the arguments of a next call.

`probe` (the machine's facts) always runs first. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = HERE / "gpu_session.sh"

STEPS = ("probe", "build", "prep", "check", "bench", "ops", "e2e", "model", "warm", "fla", "precision", "sanitize",
         "wait")
ALL = ("probe", "build", "prep", "check", "bench", "ops", "e2e", "model", "warm", "fla", "sanitize")
NEEDS = {"ops": ("build",), "e2e": ("build",), "model": ("build", "prep")}
# warm only fills Triton's cache for fla: a fresh machine (the next call) needs it again before
# fla, and a warm that failed is not worth repeating once fla has run (it compiled for itself)
SERVES = {"warm": "fla"}
REDO = {**NEEDS, "fla": ("warm",)}
RESERVE_S = 8          # kept back from the budget for the last pack
MIN_START_S = 10       # a step is not started with less than this left
POLL_S = 2.0
MAX_LOG_BYTES = 12 << 20   # a larger log goes into the pack cut to its last 12 MiB


@dataclass
class Background:
    """A job a step starts in the background: its log, and its exit status once done."""
    name: str
    log: Path
    rc: Path

    def state(self) -> str:
        """'none' (never started on this machine), 'running', 'ok' or 'failed'."""
        if self.rc.exists():
            text = self.rc.read_text().strip()
            return "ok" if text == "0" else "failed" if text else "running"
        return "running" if self.log.exists() else "none"

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def backgrounds(root: Path) -> dict[str, Background]:
    return {"build": Background("build", root / "build" / "cuda-build.log", root / "build" / "cuda-build.rc"),
            "prep": Background("prep", root / "build" / "model-prep.log", root / "build" / "model-prep.rc")}


@dataclass
class Result:
    step: str
    status: str          # ok, failed, cut, not run
    seconds: float
    note: str = ""


class Session:
    def __init__(self, steps: list[str], budget: float | None, out: Path, logs: Path, root: Path = ROOT,
                 script: Path = SCRIPT, clock=time.monotonic, echo=print):
        self.steps = steps
        self.start = clock()
        self.deadline = None if budget is None else self.start + budget - RESERVE_S
        self.budget = budget
        self.out, self.logs, self.root, self.script = out, logs, root, script
        self.clock, self._echo = clock, echo
        self.bg = backgrounds(root)
        self.results: list[Result] = []
        self.lines: list[str] = []
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ output
    def say(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)
            self._echo(line)
            sys.stdout.flush()

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.out / f".{name}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, self.out / name)

    def pack(self) -> None:
        """summary.txt, steps.json and gdn-logs.tar.gz in $OUT, each replaced whole."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._write("summary.txt", ("\n".join(self.lines) + "\n").encode())
        self._write("steps.json", json.dumps({"budget_s": self.budget,
                                              "elapsed_s": round(self.clock() - self.start, 1),
                                              "steps": [asdict(r) for r in self.results]}, indent=1).encode())
        tmp = self.out / ".gdn-logs.tar.gz.partial"
        with tarfile.open(tmp, "w:gz") as tar:
            files = sorted(p for p in self.logs.rglob("*") if p.is_file()) if self.logs.is_dir() else []
            files += [b.log for b in self.bg.values() if b.log.exists()]
            for path in files:
                arc = path.relative_to(self.logs) if path.is_relative_to(self.logs) else Path(path.name)
                _add_capped(tar, path, str(arc))
        os.replace(tmp, self.out / "gdn-logs.tar.gz")

    # ------------------------------------------------------------------ steps
    def waiting_on(self, step: str) -> list[str]:
        """The background jobs step needs that are still running."""
        return [b for b in NEEDS.get(step, ()) if self.bg[b].state() == "running"]

    def run_step(self, step: str) -> Result:
        left = self.left()
        self.say(f"== {step}" + ("" if left == float("inf") else f" ({left:.0f} s left)"))
        t0 = self.clock()
        env = dict(os.environ, LOGS=str(self.logs), PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(["bash", str(self.script), "--one", step], cwd=self.root, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        reader = threading.Thread(target=self._relay, args=(proc.stdout,), daemon=True)
        reader.start()
        cut = False
        try:
            proc.wait(timeout=None if left == float("inf") else max(left, 1.0))
        except subprocess.TimeoutExpired:
            cut = True
            _kill_group(proc)
        reader.join(timeout=5)
        dt = self.clock() - t0
        if cut:
            res = Result(step, "cut", round(dt, 1), "stopped at the deadline")
            self.say(f"== {step}: cut at the deadline after {dt:.0f} s")
        elif proc.returncode == 0:
            res = Result(step, "ok", round(dt, 1))
            self.say(f"== {step}: ok in {dt:.0f} s")
        else:
            res = Result(step, "failed", round(dt, 1), f"exit {proc.returncode}")
            self.say(f"== {step}: FAILED (exit {proc.returncode}) in {dt:.0f} s")
        return res

    def _relay(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self.say(raw.decode(errors="replace").rstrip("\n"))
        stream.close()

    def run(self) -> int:
        pending = list(self.steps)
        last_wait_note = None
        while pending:
            if self.left() < MIN_START_S:
                for step in pending:
                    self.results.append(Result(step, "not run", 0.0, "out of time"))
                self.say(f"== out of time: not run: {' '.join(pending)}")
                break
            ready = [s for s in pending if not self.waiting_on(s)]
            if not ready:   # everything left needs a background job that is still running
                jobs = sorted({b for s in pending for b in self.waiting_on(s)})
                now = self.clock()
                if last_wait_note is None or now - last_wait_note >= 60:
                    self.say(f"== waiting for {' and '.join(jobs)} ({' '.join(pending)} need it; "
                             f"{self.left():.0f} s left)")
                    last_wait_note = now
                time.sleep(POLL_S)
                continue
            step = ready[0]
            pending.remove(step)
            self.results.append(self.run_step(step))
            self.pack()
        for name, job in self.bg.items():
            state = job.state()
            if state == "failed" or (state == "running" and any(r.status == "not run" for r in self.results)):
                self.say(f"== {name} (background): {state}; the end of {job.log.relative_to(self.root)}:")
                for line in job.tail().splitlines():
                    self.say("   " + line)
        self.summary()
        self.pack()
        return 0 if all(r.status == "ok" for r in self.results) else 1

    def summary(self) -> None:
        self.say("== summary")
        for r in self.results:
            self.say(f"   {r.step:9s} {r.status:8s} {r.seconds:6.0f} s  {r.note}")
        self.say(f"   total {self.clock() - self.start:.0f} s" +
                 ("" if self.budget is None else f" of a {self.budget:.0f} s budget"))
        done = {r.step for r in self.results if r.status == "ok"}
        left = [r.step for r in self.results if r.status != "ok" and r.step != "probe"
                and SERVES.get(r.step) not in done]
        if left:
            needs = sorted({b for s in left for b in REDO.get(s, ())} - set(left),
                           key=ALL.index)
            self.say("   next call: bash cpp_patches/cuda/gpu_session.sh --budget SECONDS "
                     + " ".join(needs + left))


def _add_capped(tar: tarfile.TarFile, path: Path, arcname: str) -> None:
    size = path.stat().st_size
    if size <= MAX_LOG_BYTES:
        tar.add(path, arcname=arcname)
        return
    import io

    with open(path, "rb") as f:
        f.seek(size - MAX_LOG_BYTES)
        data = b"[... the first %d bytes are left out ...]\n" % (size - MAX_LOG_BYTES) + f.read()
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mtime = int(path.stat().st_mtime)
    tar.addfile(info, io.BytesIO(data))


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_steps(names: list[str]) -> list[str]:
    steps: list[str] = []
    for name in names:
        for step in ALL if name == "all" else (name,):
            if step not in STEPS:
                raise SystemExit(f"error: unknown step '{step}' (all, {', '.join(STEPS)})")
            if step not in steps:
                steps.append(step)
    if "probe" in steps:
        steps.remove("probe")
    # in the order of STEPS whatever order they are named in (warm must come before fla)
    return ["probe"] + sorted(steps, key=STEPS.index)


def bundle_sources(root: Path) -> dict[str, str]:
    """sha256 of the tree's files that .device's llama.cpp source is made from, beyond the pinned
    sdist: the series and its patches, the chunked kernel header and the pending patches."""
    cpp = root / "cpp_patches"
    files = [cpp / "series", *sorted(cpp.glob("*.patch")), cpp / "cuda" / "gated_delta_net_chunked.cuh",
             *sorted((cpp / "pending").glob("*.patch"))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def bundle_problem(root: Path) -> str | None:
    """Why .device cannot serve this tree (missing, or packed from other sources: the build
    would then not be of the kernel the harness times), or None."""
    device = root / ".device"
    if not (device / "llama-src.tar.xz").exists():
        return ".device/ is missing"
    try:
        packed = json.loads((device / "MANIFEST.json").read_text()).get("sources")
    except (OSError, ValueError):
        packed = None
    if not isinstance(packed, dict):
        return ".device/ has no record of the sources it was packed from"
    now = bundle_sources(root)
    changed = sorted(f for f in set(now) | set(packed) if now.get(f) != packed.get(f))
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f".device/ was packed before {changed[0]}{more} changed"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, help="seconds for the whole call (default: no limit)")
    ap.add_argument("steps", nargs="+", metavar="STEP", help=f"all, or some of: {' '.join(STEPS)}")
    args = ap.parse_args(argv)
    steps = parse_steps(args.steps)
    if args.budget is not None and args.budget <= RESERVE_S + MIN_START_S:
        ap.error(f"--budget must be more than {RESERVE_S + MIN_START_S} seconds")
    problem = bundle_problem(ROOT) if set(steps) - {"probe", "wait"} else None
    if problem:
        print(f"error: {problem}: run `make cuda-bundle` here and name .device in the device call's carry",
              file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or "/tmp/gdn-out")
    logs = Path(os.environ.get("LOGS") or "/tmp/gdn-logs")
    logs.mkdir(parents=True, exist_ok=True)
    return Session(steps, args.budget, out, logs).run()


if __name__ == "__main__":
    sys.exit(main())
