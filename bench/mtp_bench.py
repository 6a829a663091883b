"""MTP speculative decoding vs plain decoding on the trained demo checkpoints (their MTP heads are
trained, so acceptance rates are real ones).

    .venv/bin/python bench/mtp_bench.py [--types F32 Q8_0 Q4_K_M] [--draft-max 1 2 3] [--p-min 0]
                                        [--reps 3] [--max-tokens 128] [--json]

For each model (dense, MoE) and GGUF type: the same six-question chat (thinking on, greedy) with
plain decoding and with ``speculative="mtp"`` at each --draft-max; decode tok/s as medians over
--reps runs (the load and the prompts are outside the timing), the ratio to plain decoding
measured in the same run, the draft acceptance rate, tokens per target step, and whether the
tokens were the plain ones (they must be).

Whether drafting pays depends on what verifying k+1 tokens in one batch costs against decoding
one. ``--verify-cost GGUF`` measures that on any (bigger) GGUF: median time of a batch of 1..4
tokens after a short prompt, as ratios to one token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from qwen35.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
QUESTIONS = [
    "What does json.dumps do?",
    "How do I read a file line by line?",
    "What is a generator?",
    "Explain the with statement.",
    "How do I sort a list of dictionaries by a key?",
    "What is the difference between a list and a tuple?",
]


def make_gguf(work: Path, name: str, ftype: str) -> Path:
    from qwen35.converter.convert import convert

    out = work / f"{name}-{ftype}.gguf"
    if not out.exists():
        convert(MODELS / f"qwen35-{name}-tiny", out, file_type=ftype)
    return out


def run(path: Path, threads: int, max_tokens: int, draft_max: int | None, p_min: float) -> dict:
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model, SamplingParams

    spec = draft_max is not None
    with Model.load(path, n_ctx=4096, n_threads=threads, load_mtp=spec, n_rs_seq=draft_max if spec else None) as m:
        chat = Chat(m, speculative="mtp" if spec else None, draft_max=draft_max or 1, draft_p_min=p_min)
        tokens, n, ms, st = [], 0, 0.0, [0, 0, 0]
        for q in QUESTIONS:
            r = chat.send(q, SamplingParams(temperature=0, max_tokens=max_tokens))
            tokens.append(r.tokens)
            n += r.usage.completion_tokens
            ms += r.timings.generate_ms
            if r.speculation:
                st = [st[0] + r.speculation.steps, st[1] + r.speculation.drafted, st[2] + r.speculation.accepted]
    return {"tok_s": n / ms * 1e3, "tokens": tokens, "n": n, "steps": st[0], "drafted": st[1], "accepted": st[2]}


def verify_cost(path: Path, threads: int, reps: int = 12) -> dict[int, float]:
    """Median ms to evaluate a batch of n tokens (n = 1..4) at the end of a 64-token sequence."""
    from qwen35.bindings.model import Model

    with Model.load(path, n_ctx=1024, n_threads=threads) as m:
        prompt = m.tokenize("The quick brown fox jumps over the lazy dog. " * 7)[:64]
        out = {}
        for n in (1, 2, 3, 4):
            m.clear()
            m._decode(prompt, 0)
            pos, times = len(prompt), []
            for i in range(reps):
                t0 = time.perf_counter()
                m.eval_all(prompt[i : i + n], pos, 0)
                times.append(time.perf_counter() - t0)
                pos += n
            out[n] = statistics.median(times) * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    ap.add_argument("--types", nargs="+", default=["F32", "Q8_0", "Q4_K_M"])
    ap.add_argument("--draft-max", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--p-min", type=float, default=0.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-mtp")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    ap.add_argument(
        "--verify-cost", type=Path, metavar="GGUF", help="only measure the cost of verification batches on this GGUF"
    )
    a = ap.parse_args()
    if a.verify_cost:
        cost = verify_cost(a.verify_cost, a.threads)
        if a.json:
            print(json.dumps(cost))
        else:
            print(
                f"{a.verify_cost.name}, {a.threads} threads: "
                + ", ".join(
                    f"{n} token{'s' if n > 1 else ''} {ms:.1f} ms ({ms / cost[1]:.2f}x)" for n, ms in cost.items()
                )
            )
        return 0
    a.workdir.mkdir(parents=True, exist_ok=True)
    table = []
    if not a.json:
        print(
            f"{len(QUESTIONS)} questions, thinking on, greedy, <= {a.max_tokens} tokens each, {a.threads} threads, "
            f"p_min {a.p_min}, medians of {a.reps}"
        )
        print(
            f"{'model':<6} {'type':<7} {'draft':>5} | {'tok/s':>7} {'vs plain':>8} | {'accepted':>8} "
            f"{'tok/step':>8} | same tokens"
        )
    for name in a.models:
        for ftype in a.types:
            path = make_gguf(a.workdir, name, ftype)
            configs = [None, *a.draft_max]
            runs = {c: [run(path, a.threads, a.max_tokens, c, a.p_min) for _ in range(a.reps)] for c in configs}
            plain = statistics.median(r["tok_s"] for r in runs[None])
            for c in configs:
                rs = runs[c]
                tok_s = statistics.median(r["tok_s"] for r in rs)
                r0 = rs[0]
                row = {
                    "model": name,
                    "type": ftype,
                    "draft_max": c,
                    "tok_s": tok_s,
                    "ratio": tok_s / plain,
                    "tokens": r0["n"],
                    "acceptance": r0["accepted"] / r0["drafted"] if r0["drafted"] else None,
                    "tokens_per_step": (r0["steps"] + r0["accepted"]) / r0["steps"] if r0["steps"] else None,
                    "same_tokens": all(r["tokens"] == runs[None][0]["tokens"] for r in rs),
                }
                table.append(row)
                if not a.json:
                    acc = f"{row['acceptance']:.0%}" if row["acceptance"] is not None else "-"
                    tps = f"{row['tokens_per_step']:.2f}" if row["tokens_per_step"] is not None else "-"
                    print(
                        f"{name:<6} {ftype:<7} {c if c else 'plain':>5} | {tok_s:>7.1f} {row['ratio']:>7.2f}x | "
                        f"{acc:>8} {tps:>8} | {'yes' if row['same_tokens'] else 'NO'}",
                        flush=True,
                    )
    if a.json:
        print(json.dumps(table, indent=1))
    return 0 if all(r["same_tokens"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
