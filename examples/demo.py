"""`make demo`: a Qwen3.5 checkpoint to a chat reply through the patched llama.cpp, with timings.

Until a trained checkpoint ships, the checkpoint is a tiny one generated deterministically with
random weights (qwen35.tiny): the reply is gibberish, every step on the way is real.

    .venv/bin/python examples/demo.py [--hf DIR] [--prompt TEXT] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "build" / "demo"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, help="a Hugging Face Qwen3.5 checkpoint directory (default: the tiny one)")
    ap.add_argument("--prompt", default="Give me one sentence about llamas.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args()

    from qwen35 import tiny
    from qwen35.bindings.model import Model, SamplingParams
    from qwen35.converter.convert import convert

    t = {}
    hf = args.hf
    if hf is None:
        hf = DEMO_DIR / "tiny-qwen35"
        start = time.perf_counter()
        if not (hf / "config.json").exists():
            tiny.make_checkpoint(hf)
        t["checkpoint_s"] = time.perf_counter() - start
    gguf = DEMO_DIR / f"{hf.name}-Q8_0.gguf"
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    convert(hf, gguf, file_type="Q8_0", force=True)
    t["convert_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with Model.load(gguf, n_ctx=1024) as model:
        t["load_s"] = time.perf_counter() - start
        res = model.chat([{"role": "user", "content": args.prompt}],
                         SamplingParams(max_tokens=args.max_tokens), enable_thinking=False)
    tm = res.timings
    if args.json:
        print(json.dumps({"gguf": str(gguf), "reply": res.text, "finish_reason": res.finish_reason,
                          "prompt_tokens": tm.prompt_tokens, "generated_tokens": tm.generated_tokens,
                          "prompt_tok_s": tm.prompt_tok_s, "generate_tok_s": tm.generate_tok_s, **t}))
        return 0
    print(f"checkpoint  {hf}")
    print(f"gguf        {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB, converted in {t['convert_s']:.1f} s)")
    print(f"user        {args.prompt}")
    print(f"assistant   {res.text!r}  [{res.finish_reason}]")
    print(f"timings     load {t['load_s'] * 1e3:.0f} ms | prompt {tm.prompt_tokens} tok at {tm.prompt_tok_s:.0f} tok/s"
          f" | generate {tm.generated_tokens} tok at {tm.generate_tok_s:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
