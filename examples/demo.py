"""`make demo`: a Qwen3.5 checkpoint to a chat reply through the patched llama.cpp, with timings.

The checkpoint is the small trained one shipped in examples/models/qwen35-dense-tiny (a 10M
parameter Qwen3.5 trained on the Python documentation): it is converted to Q4_K_M in one pass,
loaded through the bindings and asked one question in the chat format. Its answers are fluent-
looking and often wrong; every step on the way is the real one.

    .venv/bin/python examples/demo.py [--hf DIR] [--type Q4_K_M] [--prompt TEXT] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "build" / "demo"
DEFAULT_HF = ROOT / "examples" / "models" / "qwen35-dense-tiny"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, default=DEFAULT_HF, help="a Hugging Face Qwen3.5 checkpoint directory")
    ap.add_argument("--type", default="Q4_K_M", help="GGUF type to convert to (default Q4_K_M)")
    ap.add_argument("--prompt", default="What does json.dumps do?")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = ap.parse_args()

    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model, SamplingParams
    from qwen35.converter.convert import convert

    t = {}
    gguf = DEMO_DIR / f"{args.hf.name}-{args.type}.gguf"
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    convert(args.hf, gguf, file_type=args.type, force=True)
    t["convert_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with Model.load(gguf, n_ctx=1024) as model:
        t["load_s"] = time.perf_counter() - start
        chat = Chat(model, enable_thinking=False)
        reply = chat.send(args.prompt, SamplingParams(max_tokens=args.max_tokens))
    tm = reply.timings
    result = {
        "gguf": str(gguf),
        "reply": reply.content,
        "finish_reason": reply.finish_reason,
        "prompt_tokens": reply.usage.prompt_tokens,
        "generated_tokens": tm.completion_tokens,
        "first_token_ms": tm.first_token_ms,
        "prompt_tok_s": tm.prefill_tok_s,
        "generate_tok_s": tm.decode_tok_s,
        **t,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"checkpoint  {args.hf}")
    print(
        f"gguf        {gguf} ({gguf.stat().st_size / 2**20:.1f} MiB {args.type}, converted in {t['convert_s']:.1f} s)"
    )
    print(f"user        {args.prompt}")
    print(f"assistant   {reply.content}  [{reply.finish_reason}]")
    print(
        f"timings     load {t['load_s'] * 1e3:.0f} ms | first token {tm.first_token_ms:.0f} ms | prompt "
        f"{reply.usage.prompt_tokens} tok at {tm.prefill_tok_s:.0f} tok/s | generate {tm.completion_tokens} tok "
        f"at {tm.decode_tok_s:.0f} tok/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
