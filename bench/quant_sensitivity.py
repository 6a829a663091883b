"""Which Qwen3.5 tensor groups are sensitive to quantization: the measurement behind the qwen35 recipe.

Starting from llama-quantize's own mix for a base type (``--recipe upstream``), each tensor group
of converter/recipes.py (DeltaNet gates, attention, DeltaNet in/out projections, shared and
routed experts, MLP, output, embeddings) is moved up to a richer type and down to a poorer one,
one group at a time; every file is scored against the F32 conversion on held-out text. The table
gives, per group, the change in mean KLD and in file size, and the KLD removed per extra KiB:
where bits buy the most quality.

    .venv/bin/python bench/quant_sensitivity.py examples/models/qwen35-dense-tiny \\
        --text examples/models/text/heldout.txt [--base Q4_K_M] [--up Q8_0] [--down Q3_K] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--base", default="Q4_K_M")
    ap.add_argument("--up", default="Q8_0", help="the richer type each group is moved to")
    ap.add_argument("--down", default="Q3_K", help="the poorer type each group is moved to")
    ap.add_argument("--chunks", type=int, default=48, help="512-token chunks of --text to score")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from qwen35.converter import recipes
    from qwen35.converter.convert import convert, make_plan
    from qwen35.quant import evaluate

    text = args.text.read_text(encoding="utf-8")
    names = [t.out.name for t in make_plan(args.hf, args.base).tensors]
    groups = {g: rx for g, rx in recipes.QWEN35_GROUPS.items() if any(re.search(rx, n) for n in names)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ref = d / "ref-F32.gguf"
        convert(args.hf, ref, file_type="F32", mtp="drop")
        files = {("base", ""): d / "base.gguf"}
        convert(args.hf, files[("base", "")], file_type=args.base, mtp="drop")
        for g, rx in groups.items():
            for way, q in (("up", args.up), ("down", args.down)):
                out = d / f"{g}-{way}.gguf"
                convert(args.hf, out, file_type=args.base, mtp="drop", tensor_types=[f"{rx}={q}"])
                files[(g, way)] = out
        if args.base in recipes.QWEN35_TABLE:
            files[("qwen35 recipe", "")] = d / "qwen35.gguf"
            convert(args.hf, files[("qwen35 recipe", "")], file_type=args.base, mtp="drop", recipe="qwen35")
        res = dict(zip(files, evaluate(ref, list(files.values()), text, max_chunks=args.chunks, n_threads=None)))
    base = res[("base", "")]
    rows = []
    for (g, way), r in res.items():
        dk = r.kld_mean - base.kld_mean
        db = r.bytes - base.bytes
        rows.append(
            {
                "group": g,
                "move": way and (args.up if way == "up" else args.down),
                "bytes": r.bytes,
                "delta_kib": db / 1024,
                "kld_mean": r.kld_mean,
                "kld_ratio": r.kld_mean / base.kld_mean,
                "kld_removed_per_kib": (-dk / (db / 1024)) if way == "up" and db > 0 else None,
                "kld_added_per_kib_saved": (dk / (-db / 1024)) if way == "down" and db < 0 else None,
                "top1": r.top1_agreement,
            }
        )
    if args.json:
        print(json.dumps({"model": args.hf.name, "base": args.base, "tokens": base.tokens, "rows": rows}))
        return 0
    print(
        f"{args.hf.name}: {args.base} (upstream mix) = {base.bytes / 2**20:.2f} MiB, mean KLD {base.kld_mean:.5f} "
        f"over {base.tokens} positions (F32 reference, MTP dropped)"
    )
    print(f"{'group':14s} {'to':6s} {'dKiB':>8s} {'KLD':>9s} {'xbase':>6s} {'KLD/KiB':>9s} {'top-1':>7s}")
    for row in rows:
        per = row["kld_removed_per_kib"] if row["kld_removed_per_kib"] is not None else row["kld_added_per_kib_saved"]
        print(
            f"{row['group']:14s} {row['move'] or '':6s} {row['delta_kib']:8.1f} {row['kld_mean']:9.5f} "
            f"{row['kld_ratio']:6.3f} {'' if per is None else f'{per:9.2e}'} {100 * row['top1']:6.2f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
