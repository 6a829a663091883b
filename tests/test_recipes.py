"""--recipe upstream: the per-tensor types (and bytes) llama-quantize gives, in one pass."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFWriter
from gguf import LlamaFileType as F
from gguf_compare import differences

from qwen35.converter.recipes import ModelDesc, TensorDesc, parse_overrides, upstream_types
from qwen35.cpus import usable_cpus
from qwen35.gguf_scan import scan

ROOT = Path(__file__).resolve().parent.parent
CONVERT = str(Path(sys.executable).parent / "qwen35-convert")

DENSE8 = ModelDesc(n_layer_all=8, n_expert=0, n_gqa=2)


def _types(names_ne, ftype, model=DENSE8, overrides=()):
    return upstream_types([TensorDesc(n, ne) for n, ne in names_ne], ftype, model, list(overrides))


# Each case is read off src/llama-quant.cpp of the pinned llama.cpp (function and rule named).
CASES = [
    # tied embeddings: token_embd takes the output rule -> Q6_K (llama_tensor_get_type_impl, OUTPUT branch)
    ("tied token_embd", [("token_embd.weight", (256, 1000))], F.MOSTLY_Q4_K_M, DENSE8, [Q.Q6_K]),
    # a separate output.weight: token_embd keeps the base type, output gets Q6_K
    (
        "untied",
        [("token_embd.weight", (256, 1000)), ("output.weight", (256, 1000))],
        F.MOSTLY_Q4_K_M,
        DENSE8,
        [Q.Q4_K, Q.Q6_K],
    ),
    # output row not a multiple of the block -> Q8_0 (nx % qk_k != 0)
    ("odd output", [("output.weight", (96, 1000))], F.MOSTLY_Q4_K_M, DENSE8, [Q.Q8_0]),
    # norms, 1-D, conv1d and the router are never quantized (tensor_allows_quantization)
    (
        "kept",
        [
            ("blk.0.attn_norm.weight", (256,)),
            ("blk.0.ssm_conv1d.weight", (4, 512)),
            ("blk.0.ffn_gate_inp.weight", (256, 8)),
            ("blk.0.ssm_a", (4,)),
            ("blk.0.ssm_dt.bias", (4,)),
            ("blk.0.ffn_gate_inp_shexp.weight", (256, 1)),
        ],
        F.MOSTLY_Q4_K_M,
        DENSE8,
        [None] * 6,
    ),
    # ffn_down with Q4_K_M: use_more_bits(i, 8) = i < 1 || i >= 7 || (i - 1) % 3 == 2 -> Q6_K for
    # i in {0, 3, 6, 7}, Q4_K otherwise
    (
        "ffn_down layers",
        [(f"blk.{i}.ffn_down.weight", (512, 256)) for i in range(8)],
        F.MOSTLY_Q4_K_M,
        DENSE8,
        [Q.Q6_K, Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K],
    ),
    # attn_qkv counts as attention-V-like: Q3_K_M gives Q5_K to the first two, Q4_K after
    (
        "qkv Q3_K_M",
        [(f"blk.{i}.attn_qkv.weight", (256, 512)) for i in range(3)],
        F.MOSTLY_Q3_K_M,
        DENSE8,
        [Q.Q5_K, Q.Q5_K, Q.Q4_K],
    ),
    # 8 experts: attention V/QKV and K to Q8_0
    (
        "8 experts",
        [("blk.0.attn_v.weight", (256, 64)), ("blk.0.attn_k.weight", (256, 64))],
        F.MOSTLY_Q4_K_M,
        ModelDesc(8, 8, 2),
        [Q.Q8_0, Q.Q8_0],
    ),
    # fallbacks for rows that do not fill 256-blocks (tensor_type_fallback): Q4_K -> Q5_0, Q2_K -> Q4_0
    ("fallback", [("blk.0.ssm_alpha.weight", (96, 4))], F.MOSTLY_Q4_K_S, DENSE8, [Q.Q5_0]),
    ("fallback Q2_K", [("blk.0.ssm_out.weight", (96, 256))], F.MOSTLY_Q2_K, DENSE8, [Q.Q4_0]),
    # not even 32-divisible -> F16
    ("F16 fallback", [("blk.0.ssm_beta.weight", (48, 4))], F.MOSTLY_Q4_K_M, DENSE8, [Q.F16]),
    # very-low-bit i-quants: tied token_embd takes the output rule -> Q5_K; untied token_embd -> Q2_K
    ("IQ2_XXS tied", [("token_embd.weight", (256, 1000))], F.MOSTLY_IQ2_XXS, DENSE8, [Q.Q5_K]),
    (
        "IQ2_XXS untied",
        [("token_embd.weight", (256, 1000)), ("output.weight", (256, 1000))],
        F.MOSTLY_IQ2_XXS,
        DENSE8,
        [Q.Q2_K, Q.Q5_K],
    ),
    # IQ2_S/IQ2_M: attention-V-like and attn_output to IQ3_S when gqa < 4 and no experts
    (
        "IQ2_M qkv/output",
        [("blk.0.attn_qkv.weight", (256, 512)), ("blk.3.attn_output.weight", (256, 256))],
        F.MOSTLY_IQ2_M,
        DENSE8,
        [Q.IQ3_S, Q.IQ3_S],
    ),
    # ...but Q4_K with >= 4 experts
    ("IQ2_XS qkv MoE", [("blk.0.attn_qkv.weight", (256, 512))], F.MOSTLY_IQ2_XS, ModelDesc(8, 4, 2), [Q.Q4_K]),
    # first n/8 ffn_down counted by tensor (not by layer) -> Q2_K, then the base IQ2_XS
    (
        "IQ2_XS ffn_down",
        [(f"blk.{i}.ffn_down.weight", (512, 256)) for i in range(2)],
        F.MOSTLY_IQ2_XS,
        DENSE8,
        [Q.Q2_K, Q.IQ2_XS],
    ),
    # IQ3_XXS: attn_q/attn_k to IQ2_S, attention-V-like to IQ3_XXS only with an imatrix (see below)
    (
        "IQ3_XXS q/k",
        [("blk.3.attn_q.weight", (256, 512)), ("blk.3.attn_k.weight", (256, 64))],
        F.MOSTLY_IQ3_XXS,
        DENSE8,
        [Q.IQ2_S, Q.IQ2_S],
    ),
    # IQ3_XS: ffn gate/up in the middle layers (n/8 <= i < 7n/8) to IQ3_XXS
    (
        "IQ3_XS gate",
        [(f"blk.{i}.ffn_gate.weight", (256, 512)) for i in range(2)],
        F.MOSTLY_IQ3_XS,
        DENSE8,
        [Q.IQ3_S, Q.IQ3_XXS],
    ),
    # an i-quant row that does not fill 256-blocks falls back to IQ4_NL
    ("IQ fallback", [("blk.0.ssm_alpha.weight", (96, 4))], F.MOSTLY_IQ2_XXS, DENSE8, [Q.IQ4_NL]),
]


@pytest.mark.quick
@pytest.mark.parametrize("name,tensors,ftype,model,expected", CASES, ids=[c[0] for c in CASES])
def test_recipe_table(name, tensors, ftype, model, expected):
    assert _types(tensors, ftype, model) == expected


@pytest.mark.quick
def test_imatrix_changes_the_choice_where_llama_quantize_does():
    qkv = [("blk.0.attn_qkv.weight", (256, 512))]
    assert upstream_types([TensorDesc(*qkv[0])], F.MOSTLY_IQ3_XXS, DENSE8, has_imatrix=False) == [Q.IQ3_S]
    assert upstream_types([TensorDesc(*qkv[0])], F.MOSTLY_IQ3_XXS, DENSE8, has_imatrix=True) == [Q.IQ3_XXS]
    down = [TensorDesc("blk.0.ffn_down.weight", (512, 256))]
    assert upstream_types(down, F.MOSTLY_Q4_0, DENSE8, has_imatrix=True) == [Q.Q4_1]
    assert upstream_types(down, F.MOSTLY_Q4_0, DENSE8, has_imatrix=False) == [Q.Q4_0]


@pytest.mark.quick
def test_overrides_win_and_skip_the_mixture_rules():
    t = [("blk.0.ffn_down.weight", (512, 256)), ("blk.1.ffn_down.weight", (512, 256))]
    # a manual type skips llama_tensor_get_type_impl, so i_ffn_down does not advance: blk.1 is
    # judged as layer 0 of the dense counter (use_more_bits(0, 8) -> Q6_K)
    assert _types(t, F.MOSTLY_Q4_K_M, overrides=parse_overrides(["blk\\.0\\.ffn_down=q8_0"])) == [Q.Q8_0, Q.Q6_K]
    with pytest.raises(ValueError, match="REGEX=TYPE"):
        parse_overrides(["ffn_down"])


@pytest.fixture(scope="module")
def wide(tmp_path_factory, lib_dir):
    """Rows that fill 256-blocks, so the K-quant rules (not only the fallbacks) are exercised."""
    from support import tiny

    from qwen35.converter.convert import convert

    cfg = tiny.TinyConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
    )
    d = tmp_path_factory.mktemp("wide")
    out = {}
    for name, kw in (("dense", {}), ("moe", dict(moe=True, mtp=True))):
        hf = tiny.make_checkpoint(d / name, cfg, **kw)
        f32 = d / f"{name}-f32.gguf"
        convert(hf, f32, file_type="F32")
        out[name] = (hf, f32)
    f32 = d / "moe-nomtp-f32.gguf"  # llama-imatrix does not run the MTP block: low-bit files drop it
    convert(out["moe"][0], f32, file_type="F32", mtp="drop")
    out["moe-nomtp"] = (out["moe"][0], f32)
    return out


@pytest.fixture(scope="module")
def imatrices(wide, tmp_path_factory, build_bin):
    """Importance matrices from the patched llama-imatrix over a short text, both file formats."""
    d = tmp_path_factory.mktemp("imatrix")
    text = d / "text.txt"
    text.write_text((ROOT / "README.md").read_text() * 2)
    out = {}
    for model, fmt in (("dense", "gguf"), ("dense", "dat"), ("moe-nomtp", "gguf")):
        path = d / f"{model}.{fmt}"
        r = subprocess.run(
            [
                str(build_bin / "llama-imatrix"),
                "-m",
                str(wide[model][1]),
                "-f",
                str(text),
                "-o",
                str(path),
                "--output-format",
                fmt,
                "-c",
                "128",
                "--chunks",
                "6",
                "-t",
                str(usable_cpus()),
                "--no-repack",
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and path.exists(), r.stderr[-2000:]
        out[model, fmt] = path
    return out


@pytest.mark.parametrize(
    "model,fmt,type_,mtp",
    [
        ("dense", "gguf", "IQ2_XS", "keep"),
        ("dense", "gguf", "IQ3_XXS", "keep"),
        ("dense", "dat", "IQ1_M", "keep"),
        ("dense", "dat", "Q4_K_M", "keep"),
        ("moe-nomtp", "gguf", "IQ2_XXS", "drop"),
        ("moe-nomtp", "gguf", "Q4_0", "drop"),
    ],
)
def test_imatrix_quantization_equals_llama_quantize(wide, imatrices, tmp_path, model, fmt, type_, mtp, build_bin):
    """Per-expert importance weights, the imatrix-dependent type choices and the quantize.imatrix.*
    keys, all as llama-quantize --imatrix writes them from our F32 output."""
    hf, f32 = wide[model]
    im = imatrices[model, fmt]
    ref = tmp_path / "llama-quantize.gguf"
    r = subprocess.run(
        [str(build_bin / "llama-quantize"), "--imatrix", str(im), str(f32), str(ref), type_, "2"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:]
    ours = tmp_path / "ours.gguf"
    r = subprocess.run(
        [CONVERT, str(hf), "-o", str(ours), "--type", type_, "--imatrix", str(im), "--mtp", mtp],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert differences(ours, ref) == []
    assert scan(ours).kv["quantize.imatrix.file"].value == str(im)


def _imatrix_file(path, n, value=1.0):
    """A one-entry imatrix in llama-imatrix's GGUF layout, written with gguf-py."""
    w = GGUFWriter(path, arch="", endianess=GGUFEndian.LITTLE)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["x.txt"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 128)
    w.add_tensor("blk.0.attn_qkv.weight.in_sum2", np.full((1, n), value, dtype=np.float32))
    w.add_tensor("blk.0.attn_qkv.weight.counts", np.ones((1, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_imatrix_errors_are_caught_before_writing(wide, imatrices, tmp_path):
    hf, _ = wide["moe"]
    out = tmp_path / "x.gguf"

    def run(*args):
        r = subprocess.run([CONVERT, str(hf), "-o", str(out), *args], capture_output=True, text=True)
        assert r.returncode == 1 and not out.exists() and not list(tmp_path.iterdir()), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr

    # the MTP block has no importance weights: llama-quantize fails mid-file, we say so up front,
    # every uncovered tensor at once, led by fixes that work as given
    nomtp = str(imatrices["moe-nomtp", "gguf"])
    msg = run("--type", "IQ2_XS", "--imatrix", nomtp)
    assert "--mtp drop" in msg and re.search(r"no weights for \d+ tensors", msg), msg
    fixes = re.findall(r"--tensor-type '([^']+)'", msg)
    assert fixes
    r = subprocess.run(
        [
            CONVERT,
            str(hf),
            "-o",
            str(out),
            "--type",
            "IQ2_XS",
            "--imatrix",
            nomtp,
            *[a for f in fixes for a in ("--tensor-type", f)],
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out.unlink()
    # without an imatrix: the command that computes one, which is on PATH
    assert "qwen35 quant imatrix" in run("--type", "IQ2_XS")
    # importance weights that do not fit the tensor, and non-finite ones
    assert "another model" in run("--type", "Q4_K_M", "--imatrix", str(_imatrix_file(tmp_path.parent / "a.gguf", 17)))
    assert "non-finite" in run(
        "--type", "Q4_K_M", "--imatrix", str(_imatrix_file(tmp_path.parent / "b.gguf", 256, np.nan))
    )
    assert "does not exist" in run("--type", "IQ2_XS", "--imatrix", str(tmp_path.parent / "none.gguf"))
    bad = tmp_path.parent / "bad-imatrix.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    assert "imatrix" in run("--type", "IQ2_XS", "--imatrix", str(bad))
    assert "no effect" in run("--type", "Q8_0", "--imatrix", str(imatrices["dense", "gguf"]))
    # a dense model's imatrix on the MoE model fits only the attention and DeltaNet tensors: the
    # experts go without, as in llama-quantize, and the user is told
    r = subprocess.run(
        [
            CONVERT,
            str(hf),
            "-o",
            str(out),
            "--type",
            "Q4_K_M",
            "--mtp",
            "drop",
            "--imatrix",
            str(imatrices["dense", "gguf"]),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "no weights for" in r.stderr and "ffn_" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "model,type_,extra",
    [
        ("dense", "Q4_K_M", []),
        ("dense", "Q3_K_M", []),
        ("dense", "IQ4_XS", []),
        ("moe", "Q4_K_M", []),
        ("moe", "Q2_K", []),
        ("moe", "Q5_K_S", ["--tensor-type", "ffn_down_exps=q8_0"]),
    ],
)
def test_one_pass_equals_llama_quantize_on_our_f32(wide, tmp_path, model, type_, extra, build_bin):
    hf, f32 = wide[model]
    ref = tmp_path / "llama-quantize.gguf"
    lq_extra = []
    if extra:
        lq_extra = ["--tensor-type", extra[1]]
    r = subprocess.run(
        [str(build_bin / "llama-quantize"), *lq_extra, str(f32), str(ref), type_, "2"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ours = tmp_path / "ours.gguf"
    r = subprocess.run(
        [CONVERT, str(hf), "-o", str(ours), "--type", type_, "--recipe", "upstream", *extra],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert differences(ours, ref) == []


def test_low_bit_iquants_refuse_without_imatrix(wide, tmp_path):
    hf, _ = wide["dense"]
    r = subprocess.run(
        [CONVERT, str(hf), "-o", str(tmp_path / "x.gguf"), "--type", "IQ2_XS"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "importance matrix" in r.stderr and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("split", [[], ["--split-max-size", "40M"]], ids=["whole", "split"])
def test_ctrl_c_leaves_nothing_behind(wide, tmp_path, split):
    """SIGINT while tensors are being written: exit 130, one line, no output, no partial file."""
    import signal
    import time

    hf, _ = wide["moe"]
    out = tmp_path / "x.gguf"
    p = subprocess.Popen(
        [CONVERT, str(hf), "-o", str(out), "--type", "Q4_K_M", *split],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(tmp_path.iterdir()) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.3)  # into the tensor data
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["error: interrupted; no output was written"]
    assert list(tmp_path.iterdir()) == []
