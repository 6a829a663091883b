"""Where the weights go: local GPUs, ggml RPC servers on other machines, expert tensors kept in
CPU memory (``n_cpu_moe``), and whether the model fits before llama.cpp tries.

ggml's device API is not in llama-cpp-python's bindings; it is called here through ctypes on the
libggml / libggml-cpu of the patched build the bindings load.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
from pathlib import Path

from qwen35 import native

DEVICE_TYPE_GPU, DEVICE_TYPE_IGPU = 1, 2
# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h): the routed experts of a block
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


class DeviceError(RuntimeError):
    pass


def _lib(name: str) -> ctypes.CDLL:
    d = native.library_dir()
    for cand in (f"lib{name}.so", f"lib{name}.dylib"):
        if (d / cand).exists():
            return ctypes.CDLL(str(d / cand))
    raise DeviceError(f"lib{name} not found in {d}; run `make setup`")


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib = _lib("ggml")
    vp = ctypes.c_void_p
    for fn, res, args in (
        ("ggml_backend_reg_by_name", vp, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
        ("ggml_backend_reg_dev_count", ctypes.c_size_t, [vp]),
        ("ggml_backend_reg_dev_get", vp, [vp, ctypes.c_size_t]),
        ("ggml_backend_dev_count", ctypes.c_size_t, []),
        ("ggml_backend_dev_get", vp, [ctypes.c_size_t]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


@functools.cache
def cpu_buffer_type() -> int:
    lib = _lib("ggml-cpu")
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    return lib.ggml_backend_cpu_buffer_type()


def gpu_devices() -> list[int]:
    """Local GPU devices (pointers) of the build: CUDA, Metal, Vulkan... none on a CPU build."""
    g = _ggml()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(d) in (DEVICE_TYPE_GPU, DEVICE_TYPE_IGPU):
            out.append(d)
    return out


def device_memory(dev: int) -> tuple[int, int]:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def device_name(dev: int) -> str:
    g = _ggml()
    return f"{g.ggml_backend_dev_name(dev).decode()} ({g.ggml_backend_dev_description(dev).decode()})"


def rpc_devices(endpoints: list[str]) -> list[int]:
    """The devices of ggml RPC servers (``ggml-rpc-server -H HOST -p PORT`` on each machine).

    Each endpoint is checked with a plain TCP connection first: ggml aborts the process when
    it cannot reach a server."""
    g = _ggml()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise DeviceError("this build has no RPC backend; rebuild with `make setup` (GGML_RPC=ON)")
    addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
    out = []
    for ep in endpoints:
        host, _, port = ep.rpartition(":")
        if not host or not port.isdigit():
            raise DeviceError(f"RPC server {ep!r}: write HOST:PORT, e.g. 192.168.1.20:50052")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
        except OSError as e:
            raise DeviceError(
                f"RPC server {ep} is not reachable ({e.strerror or e}); start "
                f"`ggml-rpc-server -H 0.0.0.0 -p {port}` on that machine"
            ) from None
        r = add_server(ep.encode())
        if not r:
            raise DeviceError(f"RPC server {ep} reports no devices")
        out += [g.ggml_backend_reg_dev_get(r, i) for i in range(g.ggml_backend_reg_dev_count(r))]
    return out


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of RAM."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def n_cpu_moe_patterns(n: int) -> list[str]:
    """--n-cpu-moe N: the expert tensors of blocks 0..N-1 stay in CPU memory."""
    return [rf"blk\.{i}{FFN_EXPS_REGEX}" for i in range(n)]
