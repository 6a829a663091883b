"""Images: decoding (Pillow) and the vision projector (an mmproj GGUF run by llama.cpp's libmtmd).

``load_image`` takes what users hand over — an OpenAI content part (``image_url`` with a data
URL), a local path, bytes, a Pillow image — and returns an ``Image``: RGB pixels and an id that
is a hash of them, so the same picture sent twice is known to be the same. ``Projector`` binds a
projector GGUF to a loaded text model: it cuts a prompt whose images are marked into text and
image chunks (``tokenize``), encodes an image chunk into embeddings, and decodes those into a
sequence of the model's context at M-RoPE positions (an image of n tokens advances the position
by its grid side, not by n).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen35.errors import Qwen35Error

# what the chat template writes for an image (<|vision_start|><|image_pad|><|vision_end|>):
# libmtmd puts the start and end tokens around an image chunk itself
TEMPLATE_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_IMAGE_BYTES = 20 << 20  # as OpenAI's API: 20 MB per image
MAX_IMAGE_PIXELS = 50_000_000  # larger images are refused before decoding (a decompression bomb guard)


class ImageError(Qwen35Error):
    """An image that cannot be used; the message names it and what to do."""


@dataclass(frozen=True)
class Image:
    """An RGB image: height x width x 3 bytes, and an id that is a hash of its pixels."""

    width: int
    height: int
    rgb: bytes
    id: str

    @classmethod
    def from_array(cls, a: np.ndarray) -> Image:
        a = np.ascontiguousarray(a, dtype=np.uint8)
        if a.ndim != 3 or a.shape[2] != 3 or not a.shape[0] or not a.shape[1]:
            raise ImageError(f"an image array must be height x width x 3 (RGB) bytes, not {a.shape}")
        h, w = a.shape[:2]
        digest = hashlib.sha256(f"{w}x{h}:".encode() + a.tobytes()).hexdigest()
        return cls(w, h, a.tobytes(), digest)

    def array(self) -> np.ndarray:
        return np.frombuffer(self.rgb, dtype=np.uint8).reshape(self.height, self.width, 3)


def _decode(data: bytes, what: str) -> Image:
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{what} is {len(data) / 2**20:.1f} MiB; images up to {MAX_IMAGE_BYTES >> 20} MiB are taken")
    try:
        with warnings.catch_warnings():  # the size is checked below, in one line
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            im = PILImage.open(io.BytesIO(data))
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"{what} is {im.width}x{im.height} pixels; images up to {MAX_IMAGE_PIXELS // 10**6} "
                    "megapixels are taken: scale it down"
                )
            im = ImageOps.exif_transpose(im)  # as the camera held it
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                flat = PILImage.new("RGB", im.size, (255, 255, 255))  # transparency over white
                flat.paste(im, mask=im.getchannel("A"))
                im = flat
            return Image.from_array(np.asarray(im.convert("RGB")))
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise ImageError(f"{what} is not an image Pillow can read ({e!s:.80}); send a PNG, JPEG, GIF or WebP") from None


def _from_url(url: str) -> Image:
    if url.startswith("data:"):
        head, sep, body = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageError("an image data URL must be data:image/...;base64,<data>")
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data URL's base64 does not decode") from None
        return _decode(data, "the image in the data URL")
    if url.startswith(("http://", "https://")):
        raise ImageError(
            f"image URL {url[:60]!r} is remote; send the image as a data URL (data:image/png;base64,...) or a file"
        )
    return load_image(Path(url[7:] if url.startswith("file://") else url))


def load_image(src) -> Image:
    """An Image from an OpenAI content part ({"type": "image_url", "image_url": {"url": ...}} with
    a data URL or a local path), a path, bytes, a Pillow image, an RGB array, or an Image."""
    if isinstance(src, Image):
        return src
    if isinstance(src, np.ndarray):
        return Image.from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _decode(bytes(src), "the image bytes")
    if isinstance(src, Path):
        try:
            size = src.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise ImageError(f"{src} is {size / 2**20:.1f} MiB; images up to {MAX_IMAGE_BYTES >> 20} MiB are taken")
            data = src.read_bytes()
        except ImageError:
            raise
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
            raise ImageError(f"cannot read image {str(src)[:80]!r}: {getattr(e, 'strerror', None) or e}") from None
        return _decode(data, str(src))
    if isinstance(src, str):
        return _from_url(src)
    if isinstance(src, dict):
        kind = src.get("type")
        if kind == "image_url":
            inner = src.get("image_url")
            url = inner.get("url") if isinstance(inner, dict) else inner
            if not isinstance(url, str):
                raise ImageError('an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}')
            return _from_url(url)
        if kind in ("image", "input_image"):
            inner = src.get("image", src.get("image_url"))
            if isinstance(inner, dict):
                inner = inner.get("url")
            if inner is None:
                raise ImageError(f'a {kind} part needs an "image" (a path, bytes or a data URL)')
            return load_image(inner)
        raise ImageError(f"a content part of type {kind!r} is not an image")
    try:
        from PIL import Image as PILImage

        if isinstance(src, PILImage.Image):
            return Image.from_array(np.asarray(src.convert("RGB")))
    except ImportError:  # pragma: no cover - Pillow is a dependency
        pass
    raise ImageError(f"cannot make an image of a {type(src).__name__}; pass a path, bytes or a data URL")


@dataclass
class Chunk:
    """One piece of a tokenized prompt: text tokens, or an image (its id, how many embeddings it
    gives and how far it advances the position)."""

    tokens: list[int] | None = None
    image: str | None = None
    n_tokens: int = 0
    n_pos: int = 0
    _ptr: object = None  # the libmtmd chunk, valid until Projector.release of its prompt
    _owner: object = None  # the libmtmd chunk list it belongs to


def _NO_CALLBACK():
    from llama_cpp import mtmd_cpp as mt

    return ctypes.cast(None, mt.mtmd_helper_post_decode_callback)  # a NULL function pointer


class Projector:
    """A vision projector GGUF bound to a loaded Qwen3.5 model through libmtmd."""

    def __init__(self, model, path: Path, ctx_p):
        self.model, self.path, self._ctx = model, path, ctx_p
        self._held: dict = {}  # libmtmd chunk lists of tokenized prompts not yet released

    @classmethod
    def load(cls, model, path: str | Path, *, n_threads: int | None = None) -> Projector:
        from qwen35 import native
        from qwen35.gguf_scan import GGUFScanError, scan

        path = Path(path)
        if not path.is_file():
            raise ImageError(f"vision projector {path} does not exist; convert the checkpoint with qwen35-convert")
        try:
            head = scan(path)
        except (GGUFScanError, OSError) as e:
            raise ImageError(f"{path} is not a readable GGUF ({e!s:.100})") from None
        kv = {k: v.value for k, v in head.kv.items()}
        if kv.get("general.architecture") != "clip" or not kv.get("clip.has_vision_encoder"):
            raise ImageError(
                f"{path} is not a vision projector (general.architecture {kv.get('general.architecture')!r}); "
                "pass the mmproj-*.gguf qwen35-convert wrote beside the model"
            )
        if kv.get("clip.projector_type") != "qwen3vl_merger":
            raise ImageError(f"{path} is a {kv.get('clip.projector_type')!r} projector, not Qwen3.5's (qwen3vl_merger)")
        if kv.get("clip.vision.projection_dim") != model.n_embd:
            raise ImageError(
                f"{path} projects to {kv.get('clip.vision.projection_dim')} dimensions, the model has "
                f"{model.n_embd}: it belongs to another model"
            )
        native.load()
        from llama_cpp import mtmd_cpp as mt

        native.route_mtmd_log()

        p = mt.mtmd_context_params_default()
        p.use_gpu = False
        p.print_timings = False
        p.warmup = False
        p.n_threads = n_threads or max(1, os.cpu_count() or 1)
        ctx = mt.mtmd_init_from_file(str(path).encode(), model._model, p)
        native.take_interrupt()
        if not ctx:
            raise ImageError(f"llama.cpp could not load the vision projector {path}; run with QWEN35_DEBUG=1")
        return cls(model, path, ctx)

    def close(self) -> None:
        from llama_cpp import mtmd_cpp as mt

        for chunks in self._held.values():
            mt.mtmd_input_chunks_free(chunks)
        self._held.clear()
        if self._ctx:
            mt.mtmd_free(self._ctx)
            self._ctx = None

    def tokenize(self, text: str, images: list[Image]) -> list[Chunk]:
        """text with one TEMPLATE_IMAGE (or libmtmd's marker) per image, in order -> chunks.
        The image chunks hold libmtmd data until ``release`` of any of them."""
        from llama_cpp import mtmd_cpp as mt

        marker = mt.mtmd_default_marker().decode()
        text = text.replace(TEMPLATE_IMAGE, marker)
        if text.count(marker) != len(images):
            raise ImageError(f"the prompt places {text.count(marker)} images but {len(images)} were given")
        bitmaps = []
        try:
            for im in images:
                buf = (ctypes.c_uint8 * len(im.rgb)).from_buffer_copy(im.rgb)
                bm = mt.mtmd_bitmap_init(im.width, im.height, buf)
                if not bm:
                    raise ImageError(f"libmtmd could not take a {im.width}x{im.height} image")
                mt.mtmd_bitmap_set_id(bm, im.id.encode())
                bitmaps.append(bm)
            raw = text.encode()
            inp = mt.mtmd_input_text(raw, len(raw), False, True)
            chunks = mt.mtmd_input_chunks_init()
            arr = (mt.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mt.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                mt.mtmd_input_chunks_free(chunks)
                raise ImageError(f"libmtmd could not tokenize the prompt with its images (code {rc})")
        finally:
            for bm in bitmaps:
                mt.mtmd_bitmap_free(bm)
        owner = ctypes.cast(chunks, ctypes.c_void_p).value
        self._held[owner] = chunks
        out = []
        for i in range(mt.mtmd_input_chunks_size(chunks)):
            c = mt.mtmd_input_chunks_get(chunks, i)
            if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                p = mt.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                out.append(Chunk(tokens=[p[j] for j in range(n.value)], n_tokens=n.value, n_pos=n.value))
            else:
                cid = mt.mtmd_input_chunk_get_id(c)
                out.append(
                    Chunk(
                        image=cid.decode() if cid else None,
                        n_tokens=mt.mtmd_input_chunk_get_n_tokens(c),
                        n_pos=mt.mtmd_input_chunk_get_n_pos(c),
                        _ptr=c,
                        _owner=owner,
                    )
                )
        return out

    def release(self, chunk: Chunk) -> None:
        """Free the libmtmd data (preprocessed pixels) of the prompt chunk came from; its image
        chunks cannot be encoded or decoded afterwards."""
        from llama_cpp import mtmd_cpp as mt

        chunks = self._held.pop(chunk._owner, None)
        if chunks is not None:
            mt.mtmd_input_chunks_free(chunks)

    def encode(self, chunk: Chunk) -> np.ndarray:
        """The image chunk's embeddings, [n_tokens, n_embd] float32 (runs the vision tower)."""
        from llama_cpp import mtmd_cpp as mt

        rc = mt.mtmd_encode_chunk(self._ctx, chunk._ptr)
        if rc != 0:
            raise ImageError(f"the vision projector failed to encode an image (code {rc})")
        n = chunk.n_tokens * self.model.n_embd
        return np.ctypeslib.as_array(mt.mtmd_get_output_embd(self._ctx), shape=(n,)).reshape(chunk.n_tokens, -1).copy()

    def decode(self, chunk: Chunk, embd: np.ndarray, pos: int, seq_id: int, n_batch: int = 512) -> int:
        """Decode an image chunk's embeddings into sequence seq_id at position pos (the logits of
        its last embedding are not kept); returns the position after it."""
        from llama_cpp import mtmd_cpp as mt

        embd = np.ascontiguousarray(embd, dtype=np.float32)
        new = ctypes.c_int32(0)
        ptr = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = mt.mtmd_helper_decode_image_chunk(
            self._ctx, self.model._ctx, chunk._ptr, ptr, pos, seq_id, n_batch, ctypes.byref(new), _NO_CALLBACK(), None
        )
        if rc != 0:
            raise ImageError(f"decoding the image into the context failed (code {rc}); the context may be full")
        return new.value
