"""The converter's fast paths against gguf-py's numpy quantizers (what upstream's converter uses):
same-type copies, ggml's F16/BF16 rounding, and the vectorised metadata packer."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf import quants as gquants

from qwen35.converter.checkpoint import widen
from qwen35.converter.quantize import bf16_has_nan, encode


def _bf16_bits(rng, n):
    x = rng.integers(0, 2**16, size=n, dtype=np.uint16)
    # every special pattern: signalling and quiet NaNs with payloads, infinities, zeros, subnormals
    x[:10] = [0x7F81, 0xFF81, 0x7FC0, 0x7FFF, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x807F]
    return x


@pytest.mark.parametrize("n", [4096, 4099])  # the vectorised NaN scan and its fallback
def test_bf16_copy_equals_widen_and_round(n, lib_dir):
    x = _bf16_bits(np.random.default_rng(0), n)
    ref = gquants.quantize(widen(x), Q.BF16).view(np.uint16)
    assert np.array_equal(encode(x, Q.BF16).view(np.uint16).reshape(-1), ref)
    clean = x[10:].copy()
    clean[(clean & 0x7FFF) > 0x7F80] = 0
    assert np.shares_memory(encode(clean, Q.BF16), clean)  # NaN-free data is passed through, not copied


def test_bf16_nan_scan_equals_isnan():
    """The blockwise scan against numpy's isnan of the widened values: one NaN pattern at a time,
    at the start, inside and at the end of a block, and infinities (not NaN) everywhere."""
    block = 64
    clean = np.full(3 * block + 5, 0x7F80, np.uint16)  # +inf
    clean[1::2] = 0xFF80  # -inf
    assert not bf16_has_nan(clean, block) and not np.isnan(widen(clean)).any()
    for pattern in (0x7F81, 0xFF81, 0x7FC0, 0xFFFF, 0x7FFF):
        for pos in (0, block - 1, block, 2 * block + 7, clean.size - 1):
            x = clean.copy()
            x[pos] = pattern
            assert bf16_has_nan(x, block) == bool(np.isnan(widen(x)).any()) is True, (hex(pattern), pos)
    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 2**16, size=1000, dtype=np.uint16)
        x[(x & 0x7FFF) > 0x7F80] = 0 if rng.random() < 0.5 else x[(x & 0x7FFF) > 0x7F80]
        assert bf16_has_nan(x.reshape(10, 100), 128) == bool(np.isnan(widen(x)).any())


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16], ids=["F16", "BF16"])
def test_ggml_rounding_equals_gguf_py(qtype, lib_dir):
    rng = np.random.default_rng(1)
    f = np.concatenate([rng.standard_normal(1 << 16).astype(np.float32) * s for s in (1e-8, 1e-5, 1, 1e4, 7e4)])
    f[:6] = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0]  # 65520 rounds to inf in f16
    bits = f.view(np.uint32)
    bits[6:1000] = (bits[6:1000] & 0xFFFFE000) | 0x1000  # exact f16 ties: round half to even
    ours = encode(f.reshape(-1, 256), qtype).reshape(-1).view(np.uint8)
    ref = np.ascontiguousarray(gquants.quantize(f.reshape(-1, 256), qtype)).reshape(-1).view(np.uint8)
    assert np.array_equal(ours, ref)


def test_f16_and_f32_sources_copy_exactly(lib_dir):
    rng = np.random.default_rng(2)
    h = rng.standard_normal(1000).astype(np.float16)
    assert np.array_equal(encode(h, Q.F16).view(np.uint16), gquants.quantize(widen(h), Q.F16).view(np.uint16))
    f = rng.standard_normal(1000).astype(np.float32)
    assert encode(f, Q.F32) is f


def test_fast_metadata_packing_equals_gguf_writer(tmp_path):
    from qwen35.converter.convert import _Writer

    tokens = [f"tok{i}" for i in range(3000)] + ["ĠĠ", "日本", "\u0120a b", ""]
    values = {
        "t.tokens": tokens,
        "t.types": [i % 6 for i in range(5000)],
        "t.small": [1, 2, 3],
        "t.floats": [0.5] * 2000,
        "t.neg": list(range(-1500, 1500)),
    }
    files = []
    for cls in (GGUFWriter, _Writer):
        path = tmp_path / f"{cls.__name__}.gguf"
        w = cls(path, arch="qwen35")
        for k, v in values.items():
            w.add_array(k, v)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_span_blocks_cover_the_range_and_a_late_nan_is_found(tmp_path):
    """Span.blocks yields the range's bytes in order (oracle: the file itself), and the copy
    decision sees a NaN in the last block of a multi-block range (oracle: numpy's isnan)."""
    import os

    from qwen35.converter.checkpoint import Span
    from qwen35.converter.convert import _encode

    rng = np.random.default_rng(4)
    x = rng.integers(0, 0x7F80, size=5000, dtype=np.uint16)  # finite bf16, sign bit clear
    path = tmp_path / "shard"
    path.write_bytes(b"HEAD" + x.tobytes() + b"TAIL")
    fd = os.open(path, os.O_RDONLY)
    try:
        sp = Span(fd, 4, x.nbytes, "bf16")
        blocks = [b.copy() for b in sp.blocks(block_bytes=1024)]
        assert len(blocks) == -(-x.nbytes // 1024) and np.array_equal(np.concatenate(blocks), x)

        class Piece:
            def __init__(self, data):
                self.data = data

            def span(self):
                return sp

            def __call__(self):
                return self.data

        assert _encode(Piece(x), Q.BF16, None, 0) is sp  # no NaN: copied in the kernel
        y = x.copy()
        y[-1] = 0x7F81  # a signalling NaN in the last of 10 blocks
        path.write_bytes(b"HEAD" + y.tobytes() + b"TAIL")
        assert np.isnan(widen(y)).any()
        got = _encode(Piece(y), Q.BF16, None, 0)
        assert not isinstance(got, Span)
        assert np.array_equal(got.view(np.uint16), gquants.quantize(widen(y), Q.BF16).view(np.uint16))
    finally:
        os.close(fd)
