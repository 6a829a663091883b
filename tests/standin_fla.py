"""A stand-in for flash-linear-attention's chunk_gated_delta_rule, for the tests of the GPU
session's FLA steps on a machine without a GPU (or FLA). Each call is recorded (its process, the
environment Triton and FLA read, the arguments' shapes, dtypes and layout) as a line of JSON in
$STANDIN_LOG, "compiles" a kernel into $TRITON_CACHE_DIR as Triton would (a .cubin file), sleeps
$STANDIN_SLEEP seconds, and fails for the dtype named by $STANDIN_FAIL_DTYPE."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CODE = r"""
import json, os, time
from pathlib import Path
import torch

def chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, state_v_first):
    start = time.time()
    args = [[list(x.shape), str(x.dtype), x.is_contiguous(), x.device.type] for x in (q, k, v, g, beta, initial_state)]
    if str(q.dtype) == os.environ.get("STANDIN_FAIL_DTYPE"):
        raise RuntimeError("PTXASError: stand-in failure for " + str(q.dtype))
    time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))
    cache = Path(os.environ["TRITON_CACHE_DIR"]) / ("k%d-%d" % (os.getpid(), time.time_ns()))
    cache.mkdir(parents=True)
    (cache / "chunk_fwd_kernel_o.cubin").write_bytes(b"stand-in")
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(json.dumps(dict(pid=os.getpid(), start=start, end=time.time(), args=args, scale=scale,
                                flags=[output_final_state, state_v_first],
                                fla_cache_results=os.environ.get("FLA_CACHE_RESULTS"))) + "\n")
    return torch.zeros_like(v), torch.zeros_like(initial_state)
"""


def install(root: Path) -> Path:
    """Write the stand-in package `fla` under root/site; returns that folder (for PYTHONPATH)."""
    pkg = root / "site" / "fla" / "ops" / "gated_delta_rule"
    pkg.mkdir(parents=True)
    for d in (pkg.parent.parent, pkg.parent):
        (d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text(CODE)
    return root / "site"


def imported(site: Path):
    """The stand-in's chunk_gated_delta_rule, imported into this process."""
    sys.path.insert(0, str(site))
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    finally:
        sys.path.remove(str(site))
        for mod in [m for m in sys.modules if m == "fla" or m.startswith("fla.")]:
            del sys.modules[mod]
    return chunk_gated_delta_rule


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
