"""Model placement: ggml RPC servers on loopback, experts kept in CPU memory, the fit check."""

import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from qwen35.bindings.model import Model, ModelError
from qwen35.cpus import usable_cpus

TOKENS = list(range(3000, 3040))


@pytest.fixture(scope="module")
def moe_f32(tiny_moe_f32):
    return tiny_moe_f32[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc_server(build_bin) -> tuple[subprocess.Popen, int]:
    """A ggml-rpc-server listening on loopback. The port is picked free, then released for the
    server to bind; if something took it in between, the server exits ("Failed to create server
    socket") and another port is tried."""
    for _ in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [str(build_bin / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise AssertionError("rpc-server did not start listening in 30 s") from None
                time.sleep(0.1)
    raise AssertionError(f"rpc-server exited at start five times (last exit status {proc.returncode})")


def _logits(path, **kw):
    with Model.load(path, n_ctx=128, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, **kw) as m:
        return m.logits(TOKENS)


def test_rpc_on_loopback_gives_the_local_logits(moe_f32, caplog, build_bin):
    local = _logits(moe_f32)
    servers, ports = [], []
    try:
        for _ in range(2):
            proc, port = _rpc_server(build_bin)
            servers.append(proc)
            ports.append(port)
        with caplog.at_level(logging.DEBUG, logger="qwen35.llama_cpp"):
            remote = _logits(moe_f32, n_gpu_layers=99, rpc_servers=[f"127.0.0.1:{p}" for p in ports])
        # llama.cpp put weights on both servers (its load log names each RPC buffer)
        log = caplog.text
        assert "RPC0" in log and "RPC1" in log, log[-3000:]
    finally:
        for s in servers:
            s.terminate()
            s.wait(timeout=30)
    assert np.abs(remote - local).max() <= 1e-4 * max(1.0, np.abs(local).max())
    assert (remote.argmax(-1) == local.argmax(-1)).all()
    # a later local load is not affected by the RPC servers (which are gone)
    assert np.array_equal(_logits(moe_f32), local)


def test_unreachable_rpc_server_is_a_clear_error(moe_f32):
    with pytest.raises(ModelError, match=r"not reachable.*ggml-rpc-server"):
        Model.load(moe_f32, n_gpu_layers=99, rpc_servers=[f"127.0.0.1:{_free_port()}"])
    with pytest.raises(ModelError, match="HOST:PORT"):
        Model.load(moe_f32, rpc_servers=["nohostport"])


def test_n_cpu_moe_loads_and_computes_the_same(moe_f32, caplog):
    """The routed experts of the first n_cpu_moe blocks, and only those, are placed on the CPU by
    llama.cpp (its load log names each tensor whose buffer type was overridden)."""
    import re

    from qwen35.gguf_scan import scan

    with caplog.at_level(logging.DEBUG, logger="qwen35.llama_cpp"):
        kept = _logits(moe_f32, n_cpu_moe=4)
    moved = set(re.findall(r"tensor (\S+) \(.*\) buffer type overridden to", caplog.text))
    experts = {t.name for t in scan(moe_f32).tensors if re.search(r"ffn_(gate|up|down)_exps", t.name)}
    assert moved == {n for n in experts if int(n.split(".")[1]) < 4}, sorted(moved)
    assert np.array_equal(kept, _logits(moe_f32))


def test_a_model_that_does_not_fit_is_refused_with_numbers(moe_f32, monkeypatch):
    from qwen35.bindings import devices

    monkeypatch.setattr(devices, "host_memory", lambda: (1 << 20, 1 << 20))
    with pytest.raises(ModelError, match=r"GiB of weights, this machine 0\.0 GiB of RAM; use a smaller"):
        Model.load(moe_f32)
    fake_gpu = 12345
    monkeypatch.setattr(devices, "gpu_devices", lambda: [fake_gpu])
    monkeypatch.setattr(devices, "device_memory", lambda d: (1 << 20, 8 << 30))
    with pytest.raises(ModelError, match="offload fewer layers"):
        Model.load(moe_f32, n_gpu_layers=99)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_default_threads_are_the_cpus_the_process_may_run_on(lib_dir):
    """A process pinned to one CPU (taskset, a cpuset, a pytest worker) gets one thread by default
    in llama.cpp contexts and the converter's quantization; unpinned, as many as its affinity
    allows (the oracle: os.sched_getaffinity, asked in the same child process)."""
    code = (
        "import os; from qwen35.bindings.model import _context_params; "
        "from qwen35.converter.quantize import default_threads; from qwen35.cpus import usable_cpus; "
        "cp = _context_params(n_ctx=64, n_seq_max=1, n_rs_seq=1, n_threads=None, kv_type='f16', flash_attn=None); "
        "print(len(os.sched_getaffinity(0)), cp.n_threads, cp.n_threads_batch, default_threads(), usable_cpus())"
    )
    first = min(os.sched_getaffinity(0))
    pinned = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {first}),
    )
    assert pinned.stdout.split() == ["1"] * 5
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert mine.stdout.split() == [str(len(os.sched_getaffinity(0)))] * 5
