"""The ``qwen35`` command. The root only mounts subcommands; each is a thin wrapper."""

from __future__ import annotations

import json
import os
import sys

import typer

app = typer.Typer(help="Qwen3.5 checkpoints to fast local inference with llama.cpp.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """Qwen3.5 checkpoints to fast local inference with llama.cpp."""


@app.command("build-info")
def build_info(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """Show which native library the bindings load and whether it carries the patch series."""
    from qwen35.bindings import native

    lib = native._libllama(native.library_dir())
    info = native.NativeInfo(path=lib, series_id=native.probe(lib),
                             expected=native.expected_series_id(), patched=False)
    patched = info.series_id == info.expected
    if as_json:
        print(json.dumps({"library": str(lib), "series_id": info.series_id,
                          "expected": info.expected, "patched": patched}))
    else:
        print(f"library   {lib}")
        print(f"series    {info.series_id}")
        print(f"expected  {info.expected}")
        print(f"status    {'patched' if patched else 'MISMATCH: run `make setup`'}")
    if not patched:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: known errors become one line on stderr (traceback with QWEN35_DEBUG=1)."""
    from qwen35.bindings.native import NativeLibraryError

    try:
        app()
    except NativeLibraryError as e:
        if os.environ.get("QWEN35_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
