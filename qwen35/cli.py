"""The ``qwen35`` command. The root only mounts subcommands; each is a thin wrapper."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Qwen3.5 checkpoints to fast local inference with llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """Qwen3.5 checkpoints to fast local inference with llama.cpp."""


@app.command("build-info")
def build_info(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Show which native library the bindings load and whether it carries the patch series."""
    from qwen35 import native

    lib = native._libllama(native.library_dir())
    info = native.NativeInfo(path=lib, series_id=native.probe(lib), expected=native.expected_series_id(), patched=False)
    patched = info.series_id == info.expected
    if as_json:
        print(
            json.dumps(
                {"library": str(lib), "series_id": info.series_id, "expected": info.expected, "patched": patched}
            )
        )
    else:
        print(f"library   {lib}")
        print(f"series    {info.series_id}")
        print(f"expected  {info.expected}")
        print(f"status    {'patched' if patched else 'MISMATCH: run `make setup`'}")
    if not patched:
        raise typer.Exit(1)


@app.command("inspect")
def inspect_cmd(
    path: str = typer.Argument(..., help="A Qwen3.5 .gguf file or Hugging Face model directory."),
    ctx: int = typer.Option(4096, "--ctx", help="Total context (llama.cpp -c) for the memory plan."),
    kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f32, f16, bf16, q8_0, q4_0."),
    parallel: int = typer.Option(1, "--parallel", help="Sequences served at once (each keeps its own state)."),
    file_type: str = typer.Option("BF16", "--type", help="For a HF directory: plan as if converted to this type."),
    mmproj: str = typer.Option(
        None,
        "--mmproj",
        help="The vision projector to count (default: the one mmproj-*.gguf beside the model; 'none' for none).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Architecture, block map, tensor types and sizes, and a memory plan."""
    from qwen35.converter.inspect import as_dict, inspect, render

    try:
        rep = inspect(
            path,
            ctx=ctx,
            kv_type=kv_type,
            parallel=parallel,
            file_type=file_type.upper(),
            mmproj=False if mmproj == "none" else mmproj,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(json.dumps(as_dict(rep)) if as_json else render(rep))


def _quiet_transformers() -> None:
    """transformers is only the reference here: its notes (kernel fallbacks, load reports) are not
    the user's business, and its weight-loading bar belongs on a terminal only."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # verify() says what to install
    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


@app.command("verify")
def verify_cmd(
    hf_dir: str = typer.Argument(..., help="The Hugging Face checkpoint the GGUF was made from."),
    gguf: str = typer.Argument(..., help="The .gguf file to check."),
    text: Path = typer.Option(None, "--text", help="UTF-8 text file to run (default: a built-in sample)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens of the text to use."),
    max_kld: float = typer.Option(
        0.1, "--max-kld", help="Verdict: pass when the mean KL divergence is at most this (nats)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Compare the GGUF's logits with transformers' on the same tokens (for small checkpoints); exit 1
    when the mean KL divergence is over --max-kld."""
    from qwen35.verify import DEFAULT_TEXT, verify

    _quiet_transformers()
    try:
        sample = text.read_text(encoding="utf-8") if text is not None else DEFAULT_TEXT
        m = verify(hf_dir, gguf, text=sample, max_tokens=max_tokens, max_kld=max_kld)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(m))
        if not m["passed"]:
            raise typer.Exit(1)
        return
    print(f"tokens          {m['n_tokens']}")
    print(f"max |dlogit|    {m['max_abs']:.3g}   ({m['max_abs'] / max(m['logit_std'], 1e-12):.2g} x logit std)")
    print(f"mean |dlogit|   {m['mean_abs']:.3g}")
    print(f"top-1 agreement {100 * m['top1_agreement']:.1f} %")
    print(f"KLD mean / max  {m['kld_mean']:.3g} / {m['kld_max']:.3g} nats")
    print(
        f"verdict         {'PASS' if m['passed'] else 'FAIL'} (mean KLD {m['kld_mean']:.3g} "
        f"{'<=' if m['passed'] else '>'} {m['max_kld']:g} nats)"
    )
    if not m["passed"]:
        raise typer.Exit(1)


def _mount_convert() -> None:
    from qwen35.converter.cli import convert

    app.command("convert", help="Convert a Qwen3.5 checkpoint to GGUF (same as qwen35-convert).")(convert)


_mount_convert()


def _mount_chat() -> None:
    from qwen35.bindings.chat_cli import chat

    app.command("chat", help="Chat with a Qwen3.5 GGUF; each turn evaluates only what is new.")(chat)


_mount_chat()


def _mount_serve() -> None:
    from qwen35.bindings.server import serve

    app.command("serve", help="Serve a Qwen3.5 GGUF over the OpenAI API.")(serve)


_mount_serve()


def _mount_quant() -> None:
    from qwen35.quant_cli import app as quant_app

    app.add_typer(quant_app, name="quant")


_mount_quant()


def main() -> None:
    from qwen35.errors import run_app

    run_app(app)
