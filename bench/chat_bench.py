"""Multi-turn chat benchmark: qwen35.bindings.chat.Chat vs llama-cpp-python's Llama.create_chat_completion.

    .venv/bin/python bench/chat_bench.py [--turns 8] [--reps 3] [--workdir build/bench-chat]

Makes a tiny-but-wide Qwen3.5 (hidden 768, 8 layers 3:1, the real 248K vocabulary and template,
random weights), converts it to BF16 (Q8_0 weights crash the pinned llama.cpp in the extra CPU
buffers that llama-cpp-python enables on AMX CPUs), and runs the same 8-turn conversation through both on the
same file and thread count: a chat about a document — turn 1 hands over ~2.4K tokens of notes,
turns 2-8 ask ~100-token questions, every reply is 100 tokens (greedy, thinking off for both:
llama-cpp-python gets the GGUF's template with enable_thinking=False through its own
Jinja2ChatFormatter) — so the history passes 4K tokens by turn 8. Per turn: prompt tokens,
tokens evaluated, time to first token; and decode tok/s. Medians over --reps runs; ratios
printed against llama-cpp-python.

Each turn Chat evaluates the new question plus the previous answer: the Qwen3.5 template renders
earlier answers without the empty think block the generation prompt had, so that answer's
tokens change and are re-evaluated (from the checkpoint at its start); llama-cpp-python's prefix
reuse fails on the recurrent memory and re-evaluates the whole history.

Decode is also measured on its own, greedy and with sampling as users run it (temperature 0.7,
top-k 20, top-p 0.8, min-p 0, over the full vocabulary): one question, DECODE_TOKENS tokens
generated, tok/s after the first token, both tools on the same file in the same run.
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
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the tiny-checkpoint helpers
REPLY_TOKENS = 100
DECODE_TOKENS = 128
SAMPLING = {"greedy": dict(temperature=0.0), "sampling": dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0)}
WORDS = [
    "river",
    "stone",
    "cloud",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "violin",
    "orchard",
    "glacier",
    "thunder",
    "pepper",
    "compass",
    "ember",
    "willow",
    "marble",
    "canyon",
    "falcon",
    "saddle",
    "velvet",
]


def user_message(turn: int) -> str:
    """Turn 1 hands over a ~2.4K-token document, later turns ask ~100-token questions about it."""
    n = 2400 if turn == 0 else 90
    words = [WORDS[(turn * 7 + i * 3) % len(WORDS)] for i in range(n)]
    head = "Here are my notes; I will ask about them." if turn == 0 else f"Question {turn}: what about these?"
    return head + " " + " ".join(words)


def make_model(work: Path) -> Path:
    from support import tiny

    from qwen35.converter.convert import convert

    out = work / "wide-bf16.gguf"
    if not out.exists():
        cfg = tiny.TinyConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_num_key_heads=4,
            linear_num_value_heads=8,
        )
        hf = tiny.make_checkpoint(work / "wide-hf", cfg)
        convert(hf, out, file_type="BF16", force=True)
    return out


def run_ours(path: Path, turns: int, threads: int) -> list[dict]:
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model, SamplingParams

    rows = []
    with Model.load(path, n_ctx=8192, n_threads=threads) as m:
        chat = Chat(m, enable_thinking=False)
        for t in range(turns):
            r = chat.send(user_message(t), SamplingParams(temperature=0, max_tokens=REPLY_TOKENS))
            rows.append(
                {
                    "prompt": r.usage.prompt_tokens,
                    "evaluated": r.usage.evaluated_tokens,
                    "ttft_s": r.timings.first_token_ms / 1e3,
                    "decode_tok_s": r.timings.decode_tok_s,
                }
            )
    return rows


def decode_ours(path: Path, threads: int, mode: str) -> float:
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model, SamplingParams

    with Model.load(path, n_ctx=2048, n_threads=threads) as m:
        r = Chat(m, enable_thinking=False).send(
            user_message(1), SamplingParams(**SAMPLING[mode], seed=1, max_tokens=DECODE_TOKENS)
        )
        return r.timings.decode_tok_s


def decode_llama_cpp_python(path: Path, threads: int, mode: str) -> float:
    import llama_cpp

    from qwen35 import native

    native.load()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False, seed=1)
    fmt = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="", stop_token_ids=[llm.token_eos()]
    )
    fmt._environment.globals["enable_thinking"] = False
    llm.chat_handler = fmt.to_chat_handler()
    opts = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0, **SAMPLING[mode]}
    first, n = None, 0
    for chunk in llm.create_chat_completion(
        [{"role": "user", "content": user_message(1)}], max_tokens=DECODE_TOKENS, stream=True, **opts
    ):
        if chunk["choices"][0]["delta"].get("content") is not None:
            first = first or time.perf_counter()
            n += 1
    t2 = time.perf_counter()
    llm.close()
    return (n - 1) / max(t2 - (first or t2), 1e-9)


def run_llama_cpp_python(path: Path, turns: int, threads: int) -> list[dict]:
    import llama_cpp

    from qwen35 import native

    native.load()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(str(path), n_ctx=8192, n_threads=threads, n_threads_batch=threads, verbose=False)
    fmt = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="", stop_token_ids=[llm.token_eos()]
    )
    fmt._environment.globals["enable_thinking"] = False  # its __call__ passes no template variables
    llm.chat_handler = fmt.to_chat_handler()
    messages, rows = [], []
    state = {"prompt_phase": True, "evaluated": 0}
    orig_eval = llm.eval

    def counting_eval(tokens):
        if state["prompt_phase"]:
            state["evaluated"] += len(tokens)
        return orig_eval(tokens)

    llm.eval = counting_eval
    for t in range(turns):
        messages.append({"role": "user", "content": user_message(t)})
        state.update(prompt_phase=True, evaluated=0)
        t0 = time.perf_counter()
        first, n = None, 0
        text = []
        for chunk in llm.create_chat_completion(messages, max_tokens=REPLY_TOKENS, temperature=0.0, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta is not None:  # one chunk per generated token: the first marks the first token
                if first is None:
                    first = time.perf_counter()
                    state["prompt_phase"] = False
                n += 1
                text.append(delta)
        t2 = time.perf_counter()
        # the same assistant message as Chat keeps (reasoning apart), so both render the same prompts
        reply = "".join(text)
        reasoning, sep, content = reply.partition("</think>")
        if not sep:
            reasoning, content = reply, ""
        messages.append({"role": "assistant", "content": content.strip(), "reasoning_content": reasoning.strip()})
        rows.append(
            {
                "prompt": None,
                "evaluated": state["evaluated"],
                "ttft_s": (first or t2) - t0,
                "decode_tok_s": (n - 1) / max(t2 - (first or t2), 1e-9),
            }
        )
    llm.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench-chat")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    path = make_model(a.workdir)
    runs = {"ours": [], "llama-cpp-python": []}
    decode = {(tool, mode): [] for tool in runs for mode in SAMPLING}
    for _ in range(a.reps):
        for mode in SAMPLING:
            decode["ours", mode].append(decode_ours(path, a.threads, mode))
            decode["llama-cpp-python", mode].append(decode_llama_cpp_python(path, a.threads, mode))
        if a.turns:
            runs["ours"].append(run_ours(path, a.turns, a.threads))
            runs["llama-cpp-python"].append(run_llama_cpp_python(path, a.turns, a.threads))
    dec = {f"{tool} {mode}": statistics.median(v) for (tool, mode), v in decode.items()}
    print(f"decode, {DECODE_TOKENS} tokens, {a.threads} threads, medians of {a.reps}:")
    for mode, opts in SAMPLING.items():
        ours, lcp = dec[f"ours {mode}"], dec[f"llama-cpp-python {mode}"]
        print(
            f"  {mode:<8} ({', '.join(f'{k} {v:g}' for k, v in opts.items())}): ours {ours:.1f} tok/s, "
            f"llama-cpp-python {lcp:.1f} tok/s ({ours / lcp:.2f}x)"
        )
    if not a.turns:
        (a.workdir / "result.json").write_text(json.dumps({"decode_tok_s": dec}, indent=1))
        return 0

    def med(name, turn, key):
        vals = [r[turn][key] for r in runs[name] if r[turn][key] is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"{path.name}, {a.turns} turns, replies of {REPLY_TOKENS} tokens, {a.threads} threads, medians of {a.reps}")
    print(
        f"{'turn':>4} {'prompt':>7} | {'ours eval':>9} {'ttft':>8} | {'llama-cpp-python eval':>21} {'ttft':>8} | ttft ratio"
    )
    table = []
    for t in range(a.turns):
        row = {
            "turn": t + 1,
            "prompt": med("ours", t, "prompt"),
            "ours_evaluated": med("ours", t, "evaluated"),
            "ours_ttft_s": med("ours", t, "ttft_s"),
            "lcp_evaluated": med("llama-cpp-python", t, "evaluated"),
            "lcp_ttft_s": med("llama-cpp-python", t, "ttft_s"),
        }
        row["ttft_ratio"] = row["lcp_ttft_s"] / row["ours_ttft_s"]
        table.append(row)
        print(
            f"{t + 1:>4} {row['prompt']:>7.0f} | {row['ours_evaluated']:>9.0f} {row['ours_ttft_s']:>7.3f}s | "
            f"{row['lcp_evaluated']:>21.0f} {row['lcp_ttft_s']:>7.3f}s | {row['ttft_ratio']:.1f}x"
        )
    dec_ours = statistics.median(r["decode_tok_s"] for run in runs["ours"] for r in run)
    dec_lcp = statistics.median(r["decode_tok_s"] for run in runs["llama-cpp-python"] for r in run)
    print(f"decode: ours {dec_ours:.1f} tok/s, llama-cpp-python {dec_lcp:.1f} tok/s ({dec_ours / dec_lcp:.2f}x)")
    (a.workdir / "result.json").write_text(
        json.dumps(
            {"turns": table, "decode_tok_s": dec, "chat_decode_tok_s": {"ours": dec_ours, "llama-cpp-python": dec_lcp}},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
