"""Shared entry-point behaviour of the console scripts: known errors become one line."""

from __future__ import annotations

import os
import signal
import sys


class Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt so that click does not turn it into its own
    "Aborted!" exit before our cleanup message."""


def _interrupt(signum, frame):
    raise Interrupted()


def run_app(app) -> None:
    """Run a typer app; known errors print one line on stderr and exit 1 (a traceback instead
    with QWEN35_DEBUG=1); Ctrl-C exits 130 after the command's cleanup has run."""
    from qwen35.bindings.model import ModelError
    from qwen35.bindings.native import NativeLibraryError
    from qwen35.converter.convert import ConvertError

    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except (NativeLibraryError, ConvertError, ModelError) as e:
        if os.environ.get("QWEN35_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted):
        print("error: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
