"""OpenAI-server benchmark: `qwen35 serve` against llama-server and llama-cpp-python's server.

    .venv/bin/python bench/serve_bench.py [--turns 8] [--clients 4] [--reps 3] [--only NAME,...] [--json FILE]

All three serve the same GGUF on this machine, one after another, with the same slots, context and
threads, and are driven with the official openai client over loopback:

- llama-server from the pinned llama.cpp built unpatched (`make llama-upstream`; the web UI is not
  used);
- llama-cpp-python's `examples/server/server.py` from the pinned sdist (build/src, `make setup`),
  on the same unpatched build (which has the libmtmd it loads);
- `qwen35 serve`.

The GGUF is bench/chat_bench.py's tiny-but-wide Qwen3.5 (hidden 768, 8 layers 3:1, the real 248K
vocabulary and chat template, BF16; random weights, so replies are noise but every cost is real).

(a) Agent replay: a system prompt and two tools, a ~2.4K-token document in the first message, then
    questions; every other assistant turn is a tool call with its result. The whole history goes
    with every request, as the openai SDK sends it (the assistant turns are scripted, so every
    server sees the same prompts); thinking on, sampling on (temperature 0.6, top-p 0.95,
    top-k 20) over the full vocabulary, 48 tokens a reply, streamed. Per turn:
    time to the first streamed token, and prompt tokens the server evaluated (its own report:
    usage.prompt_tokens_details.cached_tokens, or llama-server's timings.prompt_n).
(b) N concurrent conversations (--clients), each a short warm-up turn, then a 128-token reply at
    the same time: aggregate decode tokens/s over the concurrent phase and p50 time to first token.

Medians over --reps runs; ratios are against each peer measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the tiny-checkpoint helpers
sys.path.insert(0, str(ROOT / "bench"))

SLOTS_CTX = 8192
# sampling on, as users run it, sent explicitly so that every server draws alike (thinking-mode values)
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "extra_body": {"top_k": 20, "min_p": 0.0}}
REPLY = 48
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search_notes",
            "description": "Search the notes for a word.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "count_word",
            "description": "Count how often a word occurs.",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
        },
    },
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_commands(name: str, gguf: Path, port: int, slots: int, threads: int, work: Path) -> list[str]:
    if name == "qwen35":
        return [
            str(ROOT / ".venv/bin/qwen35"), "serve", str(gguf), "--port", str(port), "--alias", "bench",
            "--parallel", str(slots), "--ctx", str(SLOTS_CTX), "--threads", str(threads),
        ]  # fmt: skip
    if name == "llama-server":
        exe = ROOT / "build" / "upstream-cpu" / "bin" / "llama-server"
        if not exe.exists():
            sys.exit(f"error: {exe} is missing; build it with `make llama-upstream`")
        return [
            str(exe), "-m", str(gguf), "--port", str(port), "-a", "bench", "-np", str(slots),
            "-c", str(SLOTS_CTX * slots), "-t", str(threads), "-tb", str(threads), "--jinja", "--no-webui",
        ]  # fmt: skip
    if name == "llama-cpp-python":
        script = ROOT / "build" / "src" / "examples" / "server" / "server.py"
        if not script.exists():
            sys.exit(f"error: {script} is missing; run `make setup`")
        cfg = work / "lcp-server.json"
        cfg.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": port},
                    "model": {
                        "path": str(gguf),
                        "alias": "bench",
                        "n_ctx": SLOTS_CTX * slots,
                        "n_seq_max": slots,
                        "threads": threads,
                        "threads_batch": threads,
                    },
                }
            )
        )
        return [sys.executable, str(script), "-C", str(cfg)]
    raise ValueError(name)


class Server:
    def __init__(self, name: str, gguf: Path, slots: int, threads: int, work: Path):
        import httpx

        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(work / f"{name}.log", "wb")  # noqa: SIM115
        cmd = server_commands(name, gguf, self.port, slots, threads, work)
        env = dict(os.environ)
        if name == "llama-cpp-python":
            # the pinned sdist's server on the same llama.cpp built unpatched, which also has the
            # libmtmd it loads at start (`make llama-upstream`)
            lib = ROOT / "build" / "upstream-cpu" / "bin"
            if not list(lib.glob("libmtmd.*")):
                sys.exit(f"error: {lib} has no libmtmd; build it with `make llama-upstream`")
            env["LLAMA_CPP_LIB_PATH"] = env["MTMD_CPP_LIB"] = str(lib)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: {name} exited at start; see {self.log.name}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        sys.exit(f"error: {name} did not start in 300 s; see {self.log.name}")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="bench", max_retries=0, timeout=600)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def evaluated_of(usage, extra: dict) -> int | None:
    """Prompt tokens the server evaluated for this request, from what it reports."""
    timings = extra.get("timings")
    if isinstance(timings, dict) and "prompt_n" in timings:
        return int(timings["prompt_n"])
    if usage is not None:
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) if details is not None else None
        if cached is not None:
            return usage.prompt_tokens - cached
    return None


def stream_once(client, messages, *, max_tokens: int, tools=None) -> dict:
    t0 = time.perf_counter()
    first, usage, extra, n = None, None, {}, 0
    stream = client.chat.completions.create(
        model="bench",
        messages=messages,
        tools=tools,
        max_tokens=max_tokens,
        stream=True,
        **SAMPLING,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        more = chunk.model_extra or {}
        if "timings" in more:
            extra = more
        for ch in chunk.choices:
            d = ch.delta
            got = d.content or getattr(d, "reasoning_content", None) or d.tool_calls
            if not got and ch.delta.model_extra:
                got = ch.delta.model_extra.get("reasoning_content")
            if got:
                n += 1
                first = first or time.perf_counter()
    t1 = time.perf_counter()
    return {
        "ttft_s": (first or t1) - t0,
        "wall_s": t1 - t0,
        "first_at": first or t1,
        "end_at": t1,
        "prompt": usage.prompt_tokens if usage else None,
        "completion": usage.completion_tokens if usage else n,
        "evaluated": evaluated_of(usage, extra),
    }


def agent_replay(server: Server, turns: int) -> list[dict]:
    import openai
    from chat_bench import user_message

    c = server.client()
    msgs = [{"role": "system", "content": "You are a careful assistant. Use the tools when they help."}]
    rows = []
    for t in range(turns):
        msgs.append({"role": "user", "content": user_message(t)})
        try:
            rows.append(stream_once(c, msgs, max_tokens=REPLY, tools=TOOLS))
        except openai.APIError as e:  # a server that cannot take this request: noted, not timed
            why = f"HTTP {e.status_code}" if isinstance(e, openai.APIStatusError) else type(e).__name__
            rows.append({"error": why, "ttft_s": float("nan"), "prompt": None, "evaluated": None})
        if t % 2:  # a tool call and its result
            word = ["river", "stone", "cloud", "ember"][t % 4]
            name = TOOLS[t % 2]["function"]["name"]
            call = {
                "id": f"call_{t}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps({"word": word})},
            }
            msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
            msgs.append({"role": "tool", "tool_call_id": f"call_{t}", "content": json.dumps({"hits": t + 2})})
            msgs.append({"role": "assistant", "content": f"The notes mention {word} {t + 2} times."})
        else:
            msgs.append({"role": "assistant", "content": f"I read it; the notes keep coming back to item {t}."})
    return rows


def concurrent(server: Server, clients: int) -> dict:
    c = server.client()
    convs = [
        [
            {
                "role": "user",
                "content": f"Conversation {i}: " + " ".join(["harbor", "willow", "ember"][i % 3] for _ in range(200)),
            }
        ]
        for i in range(clients)
    ]
    for m in convs:  # warm-up: each conversation's prompt is in the server's cache
        stream_once(c, m, max_tokens=8)
        m += [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": "Now write a long answer."}]
    results: list[dict] = [None] * clients  # type: ignore[list-item]
    start = threading.Barrier(clients)

    def run(i):
        start.wait()
        results[i] = stream_once(c, convs[i], max_tokens=128)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(r["first_at"] for r in results)
    end = max(r["end_at"] for r in results)
    tokens = sum(r["completion"] - 1 for r in results)
    return {
        "aggregate_decode_tok_s": tokens / max(end - first, 1e-9),
        "p50_ttft_s": statistics.median(r["ttft_s"] for r in results),
        "completion_tokens": [r["completion"] for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", default="qwen35,llama-server,llama-cpp-python")
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from chat_bench import make_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf = make_model(args.workdir)
    names = args.only.split(",")
    runs: dict[str, list] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names:
            s = Server(name, gguf, args.clients, args.threads, args.workdir)
            try:
                replay = agent_replay(s, args.turns)
                conc = concurrent(s, args.clients)
            finally:
                s.stop()
            runs[name].append({"replay": replay, "concurrent": conc})
            errors = sum(1 for r in replay if r.get("error"))
            print(
                f"rep {rep + 1} {name:17s} ({errors} turns failed) turn {args.turns} TTFT {replay[-1]['ttft_s']:.2f} s "
                f"(evaluated {replay[-1]['evaluated']}), {args.clients} concurrent: "
                f"{conc['aggregate_decode_tok_s']:.1f} tok/s, p50 TTFT {conc['p50_ttft_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    med = statistics.median
    summary = {}
    for name in names:
        turns = [
            {
                "turn": t + 1,
                "prompt": runs[name][0]["replay"][t]["prompt"],
                "evaluated": runs[name][0]["replay"][t]["evaluated"],
                "ttft_s": med(r["replay"][t]["ttft_s"] for r in runs[name]),
                "error": runs[name][0]["replay"][t].get("error"),
            }
            for t in range(args.turns)
        ]
        summary[name] = {
            "turns": turns,
            "aggregate_decode_tok_s": med(r["concurrent"]["aggregate_decode_tok_s"] for r in runs[name]),
            "p50_ttft_s": med(r["concurrent"]["p50_ttft_s"] for r in runs[name]),
        }
    print("| turn | prompt tokens | " + " | ".join(f"{n}: evaluated, TTFT" for n in names) + " |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for t in range(args.turns):
        cells = []
        for n in names:
            row = summary[n]["turns"][t]
            if row.get("error"):
                cells.append(row["error"])
            else:
                cells.append(f"{row['evaluated'] if row['evaluated'] is not None else '?'}, {row['ttft_s']:.2f} s")
        prompt = next((summary[n]["turns"][t]["prompt"] for n in names if summary[n]["turns"][t]["prompt"]), "?")
        print(f"| {t + 1} | {prompt} | " + " | ".join(cells) + " |")
    print()
    print(f"| {args.clients} concurrent | aggregate decode tok/s | p50 TTFT |")
    print("| --- | ---: | ---: |")
    for n in names:
        print(f"| {n} | {summary[n]['aggregate_decode_tok_s']:.1f} | {summary[n]['p50_ttft_s']:.2f} s |")
    if "qwen35" in summary:
        ours = summary["qwen35"]
        for n in names:
            if n == "qwen35":
                continue
            peer = summary[n]
            if peer["turns"][-1].get("error"):
                print(
                    f"qwen35 vs {n}: {n} failed turn {args.turns} ({peer['turns'][-1]['error']}); aggregate decode "
                    f"{ours['aggregate_decode_tok_s'] / peer['aggregate_decode_tok_s']:.2f}x"
                )
                continue
            print(
                f"qwen35 vs {n}: turn-{args.turns} TTFT {peer['turns'][-1]['ttft_s'] / ours['turns'][-1]['ttft_s']:.1f}x sooner, "
                f"aggregate decode {ours['aggregate_decode_tok_s'] / peer['aggregate_decode_tok_s']:.2f}x"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
