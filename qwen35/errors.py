"""Shared entry-point behaviour of the console scripts: known errors become one line."""

from __future__ import annotations

import os
import signal
import sys


class Qwen35Error(RuntimeError):
    """A known failure with a message that says what to do; the commands print it as one line."""


class Interrupted(BaseException):
    """Ctrl-C, raised instead of KeyboardInterrupt so that click does not turn it into its own
    "Aborted!" exit before our cleanup message."""


def _interrupt(signum, frame):
    raise Interrupted()


def run_app(app) -> None:
    """Run a typer app; known errors print one line on stderr and exit 1 (a traceback instead
    with QWEN35_DEBUG=1); Ctrl-C exits 130 after the command's cleanup has run."""
    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Qwen35Error as e:
        if os.environ.get("QWEN35_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted):
        print("error: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
