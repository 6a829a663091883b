"""Load test of `qwen35 serve`: many clients holding multi-turn conversations at once.

    .venv/bin/python bench/serve_load.py [--clients 16] [--minutes 5] [--slots 4] [--gguf FILE] [--json FILE]

Starts the server on a loopback port (the demo checkpoint as Q4_K_M unless --gguf), then runs
--clients threads for --minutes, each holding its own conversation with the official openai client:
every request sends the whole history (as agents do), streams a reply with sampling on (the GGUF's
recommended settings) over the full vocabulary, and adds it to the history; a conversation that
outgrows the context starts over. More clients than slots means conversations keep losing their
slot and coming back, restored from the server's RAM cache of sequence states.

Prints: requests, failures by status (5xx must be zero), p50 / p99 time to first token, aggregate
decode tokens/s, prompt tokens reused vs evaluated (from /metrics), and the server's RSS at start
and end. Bounded: it stops at --minutes, and at --max-requests.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = [
    "What does json.dumps do?",
    "How do I read a file line by line?",
    "What is a list comprehension?",
    "How do I sort a dictionary by value?",
    "What is the difference between a tuple and a list?",
    "How does the with statement work?",
    "What is a generator?",
    "How do I format a string?",
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    import openai
    from serve_bench import Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf
    if gguf is None:
        from qwen35.converter.convert import convert

        gguf = args.workdir / "demo-Q4_K_M.gguf"
        if not gguf.exists():
            convert(ROOT / "examples" / "models" / "qwen35-dense-tiny", gguf, file_type="Q4_K_M")

    import os

    server = Server("qwen35", gguf, args.slots, os.cpu_count(), args.workdir)
    rss_start = rss_kib(server.proc.pid)
    stop_at = time.monotonic() + args.minutes * 60
    lock = threading.Lock()
    ttft: list[float] = []
    statuses: Counter = Counter()
    tokens = [0]
    count = [0]

    def client(i: int) -> None:
        rnd = random.Random(i)
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="load", max_retries=0, timeout=600)
        msgs: list[dict] = []
        while time.monotonic() < stop_at:
            with lock:
                if count[0] >= args.max_requests:
                    return
                count[0] += 1
            msgs.append({"role": "user", "content": rnd.choice(QUESTIONS)})
            t0 = time.perf_counter()
            first, text, n = None, [], 0
            try:
                stream = c.chat.completions.create(
                    model="bench",
                    messages=msgs,
                    max_tokens=args.max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"chat_template_kwargs": {"enable_thinking": rnd.random() < 0.5}},
                )
                for chunk in stream:
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                    for ch in chunk.choices:
                        if ch.delta.content or (ch.delta.model_extra or {}).get("reasoning_content"):
                            first = first or time.perf_counter()
                        text.append(ch.delta.content or "")
                status = "200"
            except openai.APIStatusError as e:
                status = str(e.status_code)
            except openai.APIConnectionError:
                status = "connection"
            except openai.APIError:  # an error event inside a stream
                status = "5xx-in-stream"
            with lock:
                statuses[status] += 1
                if status == "200":
                    tokens[0] += n
                    if first is not None:
                        ttft.append(first - t0)
            if status == "200":
                msgs.append({"role": "assistant", "content": "".join(text)})
            else:
                msgs.pop()
            if len(msgs) > 16:  # long enough: a new conversation
                msgs = []

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    reused = metric(server.url, 'qwen35_prompt_tokens_total{kind="reused"}')
    evaluated = metric(server.url, 'qwen35_prompt_tokens_total{kind="evaluated"}')
    restored = metric(server.url, 'qwen35_restored_conversations{source="ram"}')
    rss_end = rss_kib(server.proc.pid)
    server.stop()
    q = statistics.quantiles(ttft, n=100) if len(ttft) >= 2 else [float("nan")] * 99
    result = {
        "clients": args.clients,
        "slots": args.slots,
        "minutes": wall / 60,
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "server_errors": sum(v for k, v in statuses.items() if k.startswith("5") or k == "connection"),
        "p50_ttft_s": statistics.median(ttft) if ttft else None,
        "p99_ttft_s": q[98],
        "aggregate_decode_tok_s": tokens[0] / wall,
        "prompt_tokens_reused": reused,
        "prompt_tokens_evaluated": evaluated,
        "restored_from_ram": restored,
        "rss_start_mib": rss_start / 1024,
        "rss_end_mib": rss_end / 1024,
    }
    print(
        f"{result['requests']} requests from {args.clients} clients on {args.slots} slots in {result['minutes']:.1f} min: "
        f"statuses {dict(statuses)}; TTFT p50 {result['p50_ttft_s']:.3f} s, p99 {result['p99_ttft_s']:.3f} s; "
        f"decode {result['aggregate_decode_tok_s']:.1f} tok/s in all; prompt tokens reused {reused:.0f}, "
        f"evaluated {evaluated:.0f}; {restored:.0f} conversations restored from RAM; "
        f"RSS {result['rss_start_mib']:.0f} -> {result['rss_end_mib']:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if result["server_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
