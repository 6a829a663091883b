"""Load a Qwen3.5 GGUF and generate chat replies through the patched llama.cpp.

>>> from qwen35.bindings.model import SamplingParams
>>> SamplingParams(temperature=0).temperature   # greedy; None fields take the GGUF's recommendation
0
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qwen35 import native
from qwen35.errors import Qwen35Error

from .sampling import Sampler, SamplingParams, recommended

if TYPE_CHECKING:
    import numpy as np

    from .chat import Reply

log = logging.getLogger(__name__)

ARCHITECTURES = ("qwen35", "qwen35moe")
DRAFT_MAX = 3  # default tokens drafted per speculative step (llama.cpp's --draft-max default)
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}  # ggml_type of the full-attention KV cache


class ModelError(Qwen35Error):
    """A model that cannot be used, with the reason and the fix."""


def _meta(model_p, key: str) -> str | None:
    import llama_cpp

    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_model_meta_val_str(model_p, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        llama_cpp.llama_model_meta_val_str(model_p, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace")


def _number(text: str | None) -> float | int | None:
    """A metadata value as llama.cpp prints it, as a number (None when absent or not a number)."""
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if v.is_integer() and "." not in text else v


def _gguf_header(path: Path):
    """The model's GGUF header (no tensor data is read): all parts of a split model, any part
    given, with ``.path`` its first part (the one llama.cpp loads)."""
    from qwen35.gguf_scan import GGUFScanError, scan, scan_model

    try:
        head = scan(path)
    except (GGUFScanError, ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({e}); convert the checkpoint first") from e
    try:
        head = scan_model(path, head)
    except (GGUFScanError, ValueError, OSError) as e:
        raise ModelError(str(e)) from e
    if not isinstance(head.get("general.architecture"), str):
        raise ModelError(f"{path} has no general.architecture; it is not a llama.cpp model file")
    return head


def _check_fit(info, devs: list, n_gpu_layers: int, n_cpu_moe: int) -> None:
    """Refuse a model (info: its _gguf_header) whose weights cannot fit: on the offload devices
    (by the share of blocks offloaded; experts kept on the CPU by n_cpu_moe do not count), else
    in RAM."""
    from . import devices as dv

    path = info.path
    n_layer = int(info.get(f"{info.get('general.architecture')}.block_count") or 1)
    sizes = {t.name: t.nbytes for t in info.tensors}
    total = sum(sizes.values())
    gib = 2**30
    if devs:
        import re

        cpu_moe = [re.compile(p) for p in dv.n_cpu_moe_patterns(n_cpu_moe)]
        share = 1.0 if n_gpu_layers < 0 else min(1.0, n_gpu_layers / n_layer)
        blocks = sum(b for n, b in sizes.items() if n.startswith("blk.") and not any(r.search(n) for r in cpu_moe))
        need = int(blocks * share + (total - sum(b for n, b in sizes.items() if n.startswith("blk."))) * (share >= 1))
        free = sum(dv.device_memory(d)[0] for d in devs)
        if need > free:
            raise ModelError(
                f"{path.name} needs ~{need / gib:.1f} GiB on the offload devices for n_gpu_layers="
                f"{n_gpu_layers}, they have {free / gib:.1f} GiB free; offload fewer layers, keep experts "
                "on the CPU with n_cpu_moe, or use a smaller quantization"
            )
    else:
        _avail, total_ram = dv.host_memory()
        if total > total_ram:
            raise ModelError(
                f"{path.name} has {total / gib:.1f} GiB of weights, this machine {total_ram / gib:.1f} GiB "
                "of RAM; use a smaller quantization or offload layers to a GPU (n_gpu_layers)"
            )


def _cpu_has_amx() -> bool:
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def _model_params(
    head, *, n_gpu_layers: int, rpc_servers, n_cpu_moe: int, check_fit: bool, repack: bool | None, load_mtp: bool
):
    """llama_model_params for Model.load (head: the model's _gguf_header), and the ctypes
    buffers they point to (keep them alive until the model is loaded)."""
    import llama_cpp

    from . import devices as dv

    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = n_gpu_layers
    keep = []
    try:
        devs = dv.gpu_devices() + (dv.rpc_devices(rpc_servers) if rpc_servers else [])
    except dv.DeviceError as e:
        raise ModelError(str(e)) from None
    if n_gpu_layers and not devs:  # llama.cpp would say so only in the log the bindings keep quiet
        import logging

        logging.getLogger("qwen35").warning(
            "n_gpu_layers (-ngl) %d has no effect: this llama.cpp build has no GPU backend and the model runs on "
            "the CPU; rebuild with `make setup BACKEND=cuda` (or metal, vulkan) to offload",
            n_gpu_layers,
        )
    if rpc_servers:
        arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
        keep.append(arr)
        mp.devices = ctypes.cast(arr, ctypes.c_void_p)
    if n_cpu_moe:
        patterns = [p.encode() for p in dv.n_cpu_moe_patterns(n_cpu_moe)]

        class _Override(ctypes.Structure):
            _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

        arr = (_Override * (len(patterns) + 1))(
            *[_Override(p, dv.cpu_buffer_type()) for p in patterns], _Override(None, None)
        )
        keep += [arr, patterns]
        mp.tensor_buft_overrides = ctypes.cast(arr, ctypes.c_void_p)
    if check_fit:
        _check_fit(head, devs if n_gpu_layers else [], n_gpu_layers, n_cpu_moe)
    if repack is None:
        repack = not _cpu_has_amx()
        if not repack:
            log.info("AMX CPU: loading without extra buffer types (llama.cpp --no-repack)")
    mp.use_extra_bufts = repack
    mp.load_mtp = load_mtp
    progress = llama_cpp.llama_progress_callback(native.load_progress)  # Ctrl-C stops the load
    keep.append(progress)
    mp.progress_callback = progress
    return mp, keep


def _context_params(
    *, n_ctx: int, n_seq_max: int, n_rs_seq: int, n_threads: int | None, kv_type: str, flash_attn: bool | None
):
    import llama_cpp

    from qwen35.cpus import usable_cpus

    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_seq_max = n_seq_max
    cp.n_rs_seq = n_rs_seq
    cp.n_batch = cp.n_ubatch = min(512, n_ctx)
    cp.n_threads = cp.n_threads_batch = n_threads or usable_cpus()
    cp.type_k = cp.type_v = KV_TYPES[kv_type]
    cp.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]  # auto / disabled / enabled
    return cp


class Model:
    """A loaded Qwen3.5 GGUF. Use as a context manager, or call close()."""

    def __init__(self, path: Path, model_p, ctx_p, n_ctx: int, mtp=None):
        self.path, self._model, self._ctx, self.n_ctx = path, model_p, ctx_p, n_ctx
        self._one, self._n_vocab = None, 0  # the single-token batch of generation
        self.mtp = mtp  # MTPHead when loaded with load_mtp=True: drafts for speculative decoding
        import llama_cpp

        self._vocab = llama_cpp.llama_model_get_vocab(model_p)
        self.architecture = _meta(model_p, "general.architecture")
        self.chat_template = _meta(model_p, "tokenizer.chat_template")
        self._template = None
        self.projector = None  # vision.Projector when loaded with mmproj=
        # general.sampling.* of the GGUF: what SamplingParams fields left None resolve to
        self.recommended_sampling = recommended(
            {
                k: _number(_meta(model_p, k))
                for k in (
                    "general.sampling.temp",
                    "general.sampling.top_k",
                    "general.sampling.top_p",
                    "general.sampling.min_p",
                    "general.sampling.penalty_repeat",
                    "general.sampling.penalty_last_n",
                )
            }
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        repack: bool | None = None,
        n_seq_max: int = 1,
        n_rs_seq: int | None = None,
        n_cpu_moe: int = 0,
        rpc_servers: list[str] | None = None,
        check_fit: bool = True,
        load_mtp: bool = False,
        mmproj: str | Path | None = None,
    ) -> Model:
        """repack: let llama.cpp move weights into its CPU extra buffer types (AMX, repacked
        layouts; llama.cpp's default). None = on, except on CPUs with AMX, where the pinned
        llama.cpp crashes (SIGSEGV) evaluating Qwen3.5 Q8_0 models from such buffers — reproduced
        with its own llama-perplexity — so weights stay in their file layout there.

        n_seq_max: independent sequences (sessions) the context holds. n_rs_seq: recurrent-state
        snapshots kept per sequence, so that the last n_rs_seq tokens can be undone without a
        checkpoint (llama.cpp's experimental rollback); default 0, or DRAFT_MAX with load_mtp, the
        longest draft a speculative step can reject. n_cpu_moe: keep the routed experts of the
        first n_cpu_moe blocks in CPU memory (llama.cpp's --n-cpu-moe), for MoE models that do
        not fit the GPU. rpc_servers: "HOST:PORT" of ggml-rpc-server processes on other machines;
        offloaded layers (n_gpu_layers) are spread over them and the local GPUs. check_fit: refuse
        up front, with the numbers, a model whose weights do not fit where they would go.
        load_mtp: also load the GGUF's MTP (NextN) block and give it a draft context, for
        speculative decoding (``Chat(..., speculative="mtp")``); the GGUF must have one
        (``qwen35-convert --mtp keep``, the default). mmproj: the vision projector GGUF
        (``mmproj-*.gguf``, written by qwen35-convert beside the model): images in prompts."""
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            raise ModelError(
                f"{path} is a Hugging Face checkpoint folder, not a GGUF; convert it first: "
                f"qwen35-convert {path} -o {path.name}-Q8_0.gguf --type Q8_0"
            )
        if path.is_dir():
            raise ModelError(f"{path} is a folder; pass the path of a .gguf file")
        if not path.is_file():
            raise ModelError(f"{path} does not exist; pass the path of a .gguf file")
        head = _gguf_header(path)
        path, arch = head.path, head.get("general.architecture")  # a split model loads from its first part
        if arch not in ARCHITECTURES:
            raise ModelError(f"{path} is a {arch!r} model, not Qwen3.5 ({' or '.join(ARCHITECTURES)})")
        from qwen35.gguf_scan import GGUFScanError, qwen35_hparams

        try:  # what would abort llama.cpp's loader is refused here first
            qwen35_hparams(head)
        except GGUFScanError as e:
            raise ModelError(str(e)) from None
        if kv_type not in KV_TYPES:
            raise ModelError(f"kv_type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
        native.load()
        import llama_cpp

        llama_cpp.llama_backend_init()
        mp, keep = _model_params(
            head,
            n_gpu_layers=n_gpu_layers,
            rpc_servers=rpc_servers,
            n_cpu_moe=n_cpu_moe,
            check_fit=check_fit,
            repack=repack,
            load_mtp=load_mtp,
        )
        model_p = ctx_p = mtp_ctx = mtp = None
        try:  # whatever was created goes again on any error, Ctrl-C included
            model_p = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
            native.take_interrupt()
            del keep
            if not model_p:
                raise ModelError(f"llama.cpp could not load {path}; run with QWEN35_DEBUG=1 to see its log")
            if load_mtp and llama_cpp.llama_model_n_layer_nextn(model_p) < 1:
                raise ModelError(
                    f"{path.name} has no MTP block to draft with; convert the checkpoint with "
                    "`qwen35-convert --mtp keep` (the default), or decode without speculation"
                )
            if n_rs_seq is None:
                n_rs_seq = DRAFT_MAX if load_mtp else 0
            cp = _context_params(
                n_ctx=n_ctx,
                n_seq_max=n_seq_max,
                n_rs_seq=n_rs_seq,
                n_threads=n_threads,
                kv_type=kv_type,
                flash_attn=flash_attn,
            )
            ctx_p = llama_cpp.llama_init_from_model(model_p, cp)
            native.take_interrupt()
            if not ctx_p:
                raise ModelError(f"could not create a {n_ctx}-token context for {path}; lower n_ctx")
            if load_mtp:
                from .mtp import MTPHead

                cp.ctx_type = llama_cpp.LLAMA_CONTEXT_TYPE_MTP
                cp.n_rs_seq = 0
                mtp_ctx = llama_cpp.llama_init_from_model(model_p, cp)
                native.take_interrupt()
                if not mtp_ctx:
                    raise ModelError(f"could not create the MTP draft context for {path}; lower n_ctx")
                native.ext().set_embeddings_nextn(ctx_p, True, False)  # the target's hidden row of every token
                mtp = MTPHead(model_p, mtp_ctx, n_seq_max)
            m = cls(path, model_p, ctx_p, n_ctx, mtp)
            if mmproj is not None:
                from .vision import ImageError, Projector

                try:  # on failure the handler below frees what m holds
                    m.projector = Projector.load(m, mmproj, n_threads=n_threads)
                except ImageError as e:
                    raise ModelError(str(e)) from None
            return m
        except BaseException:
            if mtp is not None:
                mtp.close()
            elif mtp_ctx:
                llama_cpp.llama_free(mtp_ctx)
            if ctx_p:
                llama_cpp.llama_free(ctx_p)
            if model_p:
                llama_cpp.llama_model_free(model_p)
            raise

    def close(self) -> None:
        import llama_cpp

        if self.projector is not None:
            self.projector.close()
            self.projector = None
        if self._one is not None:
            llama_cpp.llama_batch_free(self._one)
            self._one = None
        if self.mtp is not None:
            self.mtp.close()
            self.mtp = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
        native.take_interrupt()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ text

    def render(self, messages: list[dict], *, enable_thinking: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt for messages, rendered with the GGUF's own chat template (jinja2)."""
        if not self.chat_template:
            raise ModelError(f"{self.path} has no tokenizer.chat_template; re-convert it with a template")
        if self._template is None:  # compiled once: compiling costs more than rendering
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise jinja2.TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking
        )

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        import llama_cpp

        data = text.encode()
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, False, special)
        if n < 0:
            buf = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character)."""
        return self._piece(token)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def n_vocab(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_n_tokens(self._vocab))

    @property
    def n_embd(self) -> int:
        """Width of the hidden rows the MTP head pairs with (llama_model_n_embd_out)."""
        import llama_cpp

        return int(llama_cpp.llama_model_n_embd_out(self._model))

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold: n_ctx split over n_seq_max. llama.cpp rounds the context it
        allocates up (to a multiple of 256); the limit is what was asked for."""
        import llama_cpp

        asked = self.n_ctx // max(int(llama_cpp.llama_n_seq_max(self._ctx)), 1)
        return min(int(llama_cpp.llama_n_ctx_seq(self._ctx)), asked)

    @property
    def n_rs_seq(self) -> int:
        """Tokens a sequence can be rolled back without a checkpoint (recurrent snapshots kept)."""
        import llama_cpp

        return int(llama_cpp.llama_n_rs_seq(self._ctx))

    def identity(self) -> str:
        """What a saved session must match: the model file's name and size (of all its parts)."""
        from qwen35.gguf_scan import split_parts

        return f"{self.path.name} ({sum(p.stat().st_size for p in split_parts(self.path))} bytes)"

    def seq_state(self, seq_id: int) -> bytes:
        """The whole state of one sequence (KV cache and recurrent state)."""
        import llama_cpp

        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        native.take_interrupt()
        return ctypes.string_at(buf, n)  # buf[:n] would build a list of n ints first

    def set_seq_state(self, seq_id: int, data: bytes) -> None:
        import llama_cpp

        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), seq_id)
        native.take_interrupt()
        if ok == 0:
            raise ModelError("llama.cpp could not restore the saved state (different model or context settings)")

    def _piece(self, token: int) -> bytes:
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of tokens, evaluated from an empty context: [n_tokens, n_vocab]."""
        if len(tokens) > self.n_ctx:
            raise ModelError(f"{len(tokens)} tokens exceed n_ctx={self.n_ctx}")
        self.clear()
        return self.eval_all(tokens, 0, 0)

    def clear(self) -> None:
        """Empty every sequence (target and MTP draft caches)."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        if self.mtp is not None:
            for seq in range(llama_cpp.llama_n_seq_max(self._ctx)):
                self.mtp.remove(seq, 0)

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        """Drop positions [p0, end) of a sequence (p0 <= 0: all of it). False when the recurrent
        state cannot go back that far (more than n_rs_seq tokens, no checkpoint): nothing changed."""
        import llama_cpp

        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq_id, p0 if p0 > 0 else -1, -1):
            return False
        if self.mtp is not None:
            self.mtp.remove(seq_id, p0)
        return True

    def eval_prompt(self, text: str, images: list = (), *, seq_id: int = 0, pos: int = 0) -> tuple[np.ndarray, int]:
        """Evaluate a rendered prompt whose images the chat template placed
        (``<|vision_start|><|image_pad|><|vision_end|>`` each) at position pos of a sequence: the
        logits after its last token and the position after it (an image advances it by its grid
        side, not its token count: M-RoPE). images: anything ``vision.load_image`` takes."""
        from .vision import ImageError, load_image

        if not images:
            tokens = self.tokenize(text)
            return self._decode_seq(tokens, pos, seq_id), pos + len(tokens)
        if self.projector is None:
            raise ModelError(f"{self.path.name} was loaded without a vision projector; pass mmproj= to take images")
        try:
            chunks = self.projector.tokenize(text, [load_image(i) for i in images])
        except ImageError as e:
            raise ModelError(str(e)) from None
        logits = None
        try:
            for c in chunks:
                if c.tokens is not None:
                    if c.tokens:
                        logits = self._decode_seq(c.tokens, pos, seq_id)
                        pos += len(c.tokens)
                else:
                    pos = self.projector.decode(c, self.projector.encode(c), pos, seq_id)
                    logits = None
        finally:
            self.projector.release(next(c for c in chunks if c.image is not None))
        if logits is None:
            raise ModelError("a prompt must end with text after its last image")
        return logits, pos

    def eval_all(self, tokens: list[int], pos: int, seq_id: int) -> np.ndarray:
        """Evaluate tokens at positions pos.. of a sequence; the logits of every one [n, n_vocab]
        (a speculative step's verification batch)."""
        import llama_cpp
        import numpy as np

        out = np.empty((len(tokens), llama_cpp.llama_vocab_n_tokens(self._vocab)), np.float32)
        self._decode(tokens, pos, all_logits=True, sink=out, seq_id=seq_id)
        return out

    def _observe(self, tokens: list[int], pos: int, seq_id: int) -> None:
        """Hand the target's hidden rows of the batch just decoded to the MTP head."""
        import numpy as np

        if self.mtp is None:
            return
        ptr = native.ext().get_embeddings_nextn(self._ctx)
        h = np.ctypeslib.as_array(ptr, shape=(len(tokens), self.mtp.n_embd)).copy()
        self.mtp.observe(seq_id, pos, tokens, h)

    def _decode_seq(self, tokens: list[int], pos: int, seq_id: int) -> np.ndarray:
        """Evaluate tokens at positions pos.. of sequence seq_id; the logits after the last one."""
        import llama_cpp
        import numpy as np

        if len(tokens) == 1:  # generation: one persistent batch, no per-token allocation
            if self._one is None:
                self._one = llama_cpp.llama_batch_init(1, 0, 1)
                self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
            b = self._one
            b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0], b.n_tokens = (
                tokens[0],
                pos,
                1,
                seq_id,
                True,
                1,
            )
            rc = llama_cpp.llama_decode(self._ctx, b)
            native.take_interrupt()
            if rc != 0:
                raise ModelError("llama_decode failed")
            self._observe(tokens, pos, seq_id)
        else:
            self._decode(tokens, pos, seq_id=seq_id)
        n_vocab = self._n_vocab or llama_cpp.llama_vocab_n_tokens(self._vocab)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(n_vocab,)).copy()

    def _decode(
        self,
        tokens: list[int],
        pos: int,
        all_logits: bool = False,
        sink=None,
        seq_id: int = 0,
        last_logits: bool = True,
    ) -> None:
        import llama_cpp
        import numpy as np

        step = 512
        for i in range(0, len(tokens), step):
            part = tokens[i : i + step]
            batch = llama_cpp.llama_batch_init(len(part), 0, 1)
            try:
                for j, tok in enumerate(part):
                    batch.token[j] = tok
                    batch.pos[j] = pos + i + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = seq_id
                    batch.logits[j] = all_logits or (last_logits and i + j == len(tokens) - 1)
                batch.n_tokens = len(part)
                rc = llama_cpp.llama_decode(self._ctx, batch)
                native.take_interrupt()
                if rc != 0:
                    raise ModelError("llama_decode failed")
                self._observe(part, pos + i, seq_id)
                if sink is not None:
                    for j in range(len(part)):
                        ptr = llama_cpp.llama_get_logits_ith(self._ctx, j)
                        sink[i + j] = np.ctypeslib.as_array(ptr, shape=(sink.shape[1],))
            finally:
                llama_cpp.llama_batch_free(batch)

    def sampler(self, params: SamplingParams, *, grammar: str | None = None) -> Sampler:
        """A llama.cpp sampler chain over this model's vocabulary, for params (fields left None: the
        GGUF's recommendation); close it after use."""
        import llama_cpp

        return Sampler(
            self._vocab,
            llama_cpp.llama_vocab_n_tokens(self._vocab),
            params.resolve(self.recommended_sampling),
            grammar=grammar,
        )

    def chat(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        *,
        enable_thinking: bool = True,
        tools: list[dict] | None = None,
        response_format: dict | None = None,
        tool_choice: str | dict | None = None,
    ) -> Reply:
        """The assistant's reply to messages, from a fresh conversation on sequence 0 (a ``Chat``
        with these messages: the same sampling, parsing and structured output)."""
        from .chat import Chat

        chat = Chat(self, tools=tools, enable_thinking=enable_thinking)
        chat.messages = list(messages)
        return chat.send(None, sampling, response_format=response_format, tool_choice=tool_choice)
