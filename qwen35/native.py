"""Load the patched llama.cpp library and check that it carries this toolkit's patch series.

The check runs before ``llama_cpp`` binds its functions, so a stock or stale library gives one
clear error instead of a missing-symbol traceback or, worse, silently different kernels.

>>> from qwen35 import native
>>> native.expected_series_id().startswith("qwen35-")
True
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qwen35.errors import Qwen35Error

log = logging.getLogger(__name__)

ALLOW_STOCK_ENV = "QWEN35_ALLOW_STOCK_LLAMA"
LIB_PATH_ENV = "LLAMA_CPP_LIB_PATH"  # llama-cpp-python's own override, honoured here too
SYMBOL = "llama_qwen35_patch_series"
REPO_ROOT = Path(__file__).resolve().parent.parent


class NativeLibraryError(Qwen35Error):
    """The native library is missing, stock, or built from another patch series."""


@dataclass(frozen=True)
class NativeInfo:
    path: Path  # the libllama that was loaded
    series_id: str  # what the library reports ("stock" when it lacks the symbol)
    expected: str  # what cpp_patches/ in this source tree hashes to
    patched: bool  # series_id == expected


def _tree_module():
    path = REPO_ROOT / "cpp_patches" / "tree.py"
    if not path.exists():
        raise NativeLibraryError(
            f"cannot find {path}: qwen35.bindings must be installed from the source tree "
            "(`make setup` installs it in editable mode)"
        )
    spec = importlib.util.spec_from_file_location("qwen35_cpp_tree", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected_series_id() -> str:
    """Content hash of ``cpp_patches/series`` and its patches (the id the build embeds)."""
    return _tree_module().series_id()


def library_dir() -> Path:
    """Directory llama-cpp-python loads ``libllama`` from (honours ``LLAMA_CPP_LIB_PATH``)."""
    override = os.environ.get(LIB_PATH_ENV)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise NativeLibraryError("llama-cpp-python is not installed; run `make setup`")
    return Path(spec.origin).parent / "lib"


def _libllama(directory: Path) -> Path:
    names = {"darwin": ["libllama.dylib", "libllama.so"], "win32": ["llama.dll", "libllama.dll"]}
    for name in names.get(sys.platform, ["libllama.so"]):
        if (directory / name).exists():
            return directory / name
    raise NativeLibraryError(f"no libllama in {directory}; run `make setup` to build the patched library")


def probe(lib_path: Path) -> str:
    """Series id reported by the library at lib_path, or ``"stock"`` when it has no id symbol."""
    lib = ctypes.CDLL(str(lib_path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    try:
        fn = getattr(lib, SYMBOL)
    except AttributeError:
        return "stock"
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return fn().decode()


def check(lib_path: Path, expected: str | None = None, allow_stock: bool | None = None) -> NativeInfo:
    """Raise :class:`NativeLibraryError` unless lib_path carries the expected patch series."""
    expected = expected or expected_series_id()
    if allow_stock is None:
        allow_stock = os.environ.get(ALLOW_STOCK_ENV, "") not in ("", "0")
    got = probe(lib_path)
    info = NativeInfo(path=lib_path, series_id=got, expected=expected, patched=got == expected)
    if info.patched:
        return info
    if allow_stock:
        log.warning("using %s (series %s, expected %s) because %s is set", lib_path, got, expected, ALLOW_STOCK_ENV)
        return info
    if got == "stock":
        raise NativeLibraryError(
            f"{lib_path} is a stock llama.cpp without the Qwen3.5 patch series; run `make setup` "
            f"to build the patched library, or set {ALLOW_STOCK_ENV}=1 to use it knowingly"
        )
    raise NativeLibraryError(
        f"{lib_path} was built from patch series {got} but cpp_patches/ is {expected}; run "
        f"`make setup` to rebuild, or set {ALLOW_STOCK_ENV}=1 to use it knowingly"
    )


_LOG_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_llama_log = logging.getLogger("qwen35.llama_cpp")
_log_callback = None  # keeps the ctypes callback alive


def _route_native_log() -> None:
    """llama.cpp's log goes to the ``qwen35.llama_cpp`` logger (stderr only with QWEN35_DEBUG=1)."""
    global _log_callback
    import llama_cpp

    def cb(level, text, _user):
        _llama_log.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = llama_cpp.llama_log_callback(cb)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    sys.unraisablehook = _keeping_interrupts(sys.unraisablehook)
    if os.environ.get("QWEN35_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
    else:
        _llama_log.setLevel(logging.ERROR)


def route_mtmd_log() -> None:
    """libmtmd's (and its vision encoder's) log to the same logger as llama.cpp's; call once
    libmtmd is loaded."""
    from llama_cpp import mtmd_cpp

    if _log_callback is not None:
        mtmd_cpp.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))


@contextmanager
def quiet_errors():
    """Around a llama.cpp call that reports failure in its log or on stderr (the grammar parser
    prints there): what it said is collected in the yielded list instead of being shown."""
    import tempfile

    said: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler, propagate = _Collect(), _llama_log.propagate
    _llama_log.addHandler(handler)
    _llama_log.propagate = False
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            _llama_log.removeHandler(handler)
            _llama_log.propagate = propagate
            tmp.seek(0)
            said[:0] = [line for line in tmp.read().decode("utf-8", "replace").splitlines() if "error" in line.lower()][
                :1
            ]


_interrupted = False  # a Ctrl-C landed in a callback during the C call in progress


def _keeping_interrupts(hook):
    """Python runs a Ctrl-C handler wherever the main thread next executes Python: while a model
    loads, that is mostly inside llama.cpp's log callback (hundreds of lines), and ctypes prints
    an exception raised in a callback and drops it: the load, and the command, went on. This
    hook notes the interrupt instead; take_interrupt() raises it once the C call has returned,
    and a load in progress stops at its next tensor (load_progress). Any other unraisable
    exception goes to the previous hook."""
    from qwen35.errors import Interrupted

    def unraisable(u):
        global _interrupted
        if u.exc_type is not None and issubclass(u.exc_type, (KeyboardInterrupt, Interrupted)):
            _interrupted = True
        else:
            hook(u)

    return unraisable


def take_interrupt() -> None:
    """Call after a C call that may call back into Python (llama.cpp logs while loading a model,
    creating a context, saving or restoring state): a Ctrl-C that landed in a callback during it
    is raised here, by the SIGINT handler in force, as the keypress would have been."""
    global _interrupted
    if _interrupted:
        _interrupted = False
        import signal

        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, sys._getframe())


def load_progress(progress: float, user) -> bool:
    """llama_model_params.progress_callback: false (stop loading) once a Ctrl-C has landed."""
    return not _interrupted


class _Ext:
    """The C entry points patch 0002 adds (include/llama-qwen35.h), bound on llama_cpp's library."""

    def __init__(self, lib):
        c = ctypes
        self.set_embeddings_nextn = self._fn(
            lib, "llama_qwen35_set_embeddings_nextn", [c.c_void_p, c.c_bool, c.c_bool], None
        )
        self.get_embeddings_nextn = self._fn(
            lib, "llama_qwen35_get_embeddings_nextn", [c.c_void_p], c.POINTER(c.c_float)
        )
        self.get_embeddings_nextn_ith = self._fn(
            lib, "llama_qwen35_get_embeddings_nextn_ith", [c.c_void_p, c.c_int32], c.POINTER(c.c_float)
        )

    @staticmethod
    def _fn(lib, name, argtypes, restype):
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeLibraryError(
                f"{name} is missing from the loaded libllama (a stock or older build); "
                "run `make setup` to build the patched library"
            ) from None
        fn.argtypes, fn.restype = argtypes, restype
        return fn


@functools.cache
def ext() -> _Ext:
    """The toolkit's own C functions (MTP hidden states) from the loaded patched library."""
    load()
    import llama_cpp.llama_cpp as lc

    return _Ext(lc._lib)


@functools.cache
def load() -> NativeInfo:
    """Check the library, then import ``llama_cpp`` bound to it. Cached: runs once per process."""
    info = check(_libllama(library_dir()))
    import llama_cpp  # noqa: F401  (binds every function; must come after the check)

    _route_native_log()
    return info
