"""How many CPU threads the toolkit uses when it is not told."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a container's cpuset, a
    pinned test worker), else the machine's count where the platform has no affinity (macOS,
    Windows); at least 1. More threads than this only wait for each other: llama.cpp's threads
    meet at a spinning barrier after every graph node."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
