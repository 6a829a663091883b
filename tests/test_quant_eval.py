"""`qwen35 quant eval` against an independent numpy computation over logits from the bindings."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

QWEN35 = str(Path(sys.executable).parent / "qwen35")
N_CTX = 64
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 12
    + "Sphinx of black quartz, judge my vow; how vexingly quick daft zebras jump! " * 12
)


@pytest.fixture(scope="module")
def files(tmp_path_factory, lib_dir):
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("quant-eval")
    hf = tiny.make_checkpoint(d / "hf")
    out = {}
    for t in ("F32", "Q8_0", "Q4_0"):
        out[t] = d / f"{t}.gguf"
        convert(hf, out[t], file_type=t)
    (d / "text.txt").write_text(TEXT)
    out["text"] = d / "text.txt"
    out["hf"] = hf
    return out


def _oracle(ref, cand):
    """Softmax probabilities, their logs, KL and NLL written out plainly (no shared helpers)."""
    from qwen35.bindings.model import Model

    with Model.load(ref, n_ctx=N_CTX, n_threads=usable_cpus(), kv_type="f32", flash_attn=False) as m:
        toks = m.tokenize(TEXT, special=False)
        chunks = [toks[i : i + N_CTX] for i in range(0, len(toks) - N_CTX + 1, N_CTX)]
        ref_logits = [m.logits(c) for c in chunks]
    with Model.load(cand, n_ctx=N_CTX, n_threads=usable_cpus(), kv_type="f32", flash_attn=False) as m:
        cand_logits = [m.logits(c) for c in chunks]
    kl, nll, same = [], [], []
    half = N_CTX // 2
    for c, a, b in zip(chunks, ref_logits, cand_logits):
        for t in range(half - 1, N_CTX - 1):
            p = np.exp(a[t].astype(np.float64) - a[t].max())
            p /= p.sum()
            q = np.exp(b[t].astype(np.float64) - b[t].max())
            q /= q.sum()
            nz = p > 0
            kl.append(float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz])))))
            nll.append(-np.log(q[c[t + 1]]))
            same.append(a[t].argmax() == b[t].argmax())
    return np.array(kl), float(np.exp(np.mean(nll))), float(np.mean(same))


def test_eval_numbers_equal_a_plain_numpy_computation(files):
    from qwen35.quant import evaluate

    results = evaluate(
        files["F32"], [files["Q8_0"], files["Q4_0"], files["F32"]], TEXT, n_ctx=N_CTX, n_threads=usable_cpus()
    )
    for r, cand in zip(results[:2], ("Q8_0", "Q4_0")):
        kl, ppl, top1 = _oracle(files["F32"], files[cand])
        assert r.tokens == kl.size > 0
        assert r.kld_mean == pytest.approx(kl.mean(), rel=1e-6, abs=1e-9)
        assert r.kld_max == pytest.approx(kl.max(), rel=1e-6, abs=1e-9)
        assert r.kld_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-6, abs=1e-9)
        assert r.ppl == pytest.approx(ppl, rel=1e-9) and r.top1_agreement == pytest.approx(top1)
    assert results[1].kld_mean > results[0].kld_mean > 0  # 4-bit further from the reference than 8-bit
    self_ = results[2]
    assert self_.kld_max == pytest.approx(0, abs=1e-9) and self_.top1_agreement == 1 and self_.ppl == self_.ref_ppl


def test_cli_json_and_short_text(files, tmp_path):
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "eval",
            str(files["F32"]),
            str(files["Q8_0"]),
            "--text",
            str(files["text"]),
            "--ctx",
            str(N_CTX),
            "--chunks",
            "2",
            "--json",
            "--threads",
            str(usable_cpus()),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["tokens"] == 2 * (N_CTX // 2) and 0 < row["kld_mean"] < row["kld_max"]
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    r = subprocess.run(
        [QWEN35, "quant", "eval", str(files["F32"]), str(files["Q8_0"]), "--text", str(short)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "--ctx" in r.stderr


@pytest.fixture(scope="module")
def moe_f32(tiny_moe_f32):
    return tiny_moe_f32


def test_imatrix_command_reports_the_expert_coverage_in_the_file(moe_f32, files, tmp_path):
    """Coverage read back independently from the file's *.counts tensors (gguf-py), and the
    imatrix is usable by qwen35-convert --imatrix."""
    from gguf import GGUFReader

    hf, model = moe_f32
    out = tmp_path / "imatrix.gguf"
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "imatrix",
            str(model),
            "--text",
            str(files["text"]),
            "-o",
            str(out),
            "--ctx",
            "64",
            "--json",
            "--threads",
            str(usable_cpus()),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    counts = {
        t.name[: -len(".counts")]: np.asarray(t.data).reshape(-1)
        for t in GGUFReader(out).tensors
        if t.name.endswith(".counts")
    }
    expected = {k: [int((c > 0).sum()), int(c.size)] for k, c in counts.items() if c.size > 1}
    assert rep["moe_tensors"] == expected and len(expected) > 0
    assert rep["tensors"] == len(counts)
    worst = min(expected.items(), key=lambda kv: kv[1][0] / kv[1][1])
    assert [rep["worst"]["covered"], rep["worst"]["experts"]] == worst[1]
    q = subprocess.run(
        [
            str(Path(sys.executable).parent / "qwen35-convert"),
            str(hf),
            "-o",
            str(tmp_path / "q.gguf"),
            "--type",
            "Q4_K_M",
            "--mtp",
            "drop",
            "--imatrix",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert q.returncode == 0, q.stderr
    # refusals: existing output, too little text for one chunk
    r = subprocess.run(
        [QWEN35, "quant", "imatrix", str(model), "--text", str(files["text"]), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "--force" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    r = subprocess.run(
        [QWEN35, "quant", "imatrix", str(model), "--text", str(short), "-o", str(tmp_path / "x.gguf"), "--ctx", "64"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "llama-imatrix failed" in r.stderr and "you need at least 128 tokens" in r.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
    # any part of a split model, as the other commands take
    from qwen35.converter.convert import convert

    parts = convert(hf, tmp_path / "split.gguf", file_type="F32", split_max_size=1_000_000).files
    assert len(parts) > 1
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "imatrix",
            parts[-1],
            "--text",
            str(files["text"]),
            "-o",
            str(tmp_path / "split-imatrix.gguf"),
            "--ctx",
            "64",
            "--chunks",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and (tmp_path / "split-imatrix.gguf").is_file(), r.stderr


def _one_line_error(r):
    return r.returncode != 0 and r.stderr.strip().splitlines() == [r.stderr.strip()]


def test_plot_is_a_png_of_every_file(files, tmp_path):
    import matplotlib.image

    png = tmp_path / "kld.png"
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "eval",
            str(files["F32"]),
            str(files["Q8_0"]),
            str(files["Q4_0"]),
            "--text",
            str(files["text"]),
            "--ctx",
            str(N_CTX),
            "--chunks",
            "2",
            "--threads",
            str(usable_cpus()),
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kld.png"]  # no partial file left
    for bad in (tmp_path / "kld.jpg", tmp_path / "missing" / "kld.png"):
        r = subprocess.run(
            [
                QWEN35,
                "quant",
                "eval",
                str(files["F32"]),
                str(files["Q8_0"]),
                "--text",
                str(files["text"]),
                "--plot",
                str(bad),
            ],
            capture_output=True,
            text=True,
        )
        assert _one_line_error(r) and "--plot" in r.stderr and not bad.exists()


def test_sweep_converts_scores_and_compares_recipes(files, tmp_path):
    """Every target x recipe file equals what qwen35-convert writes on its own, its tensor types
    are the recipe's, and the ratios are the rows' own numbers divided."""
    from qwen35.converter.convert import convert, make_plan
    from qwen35.gguf_scan import scan

    out = tmp_path / "sweep"
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "sweep",
            str(files["hf"]),
            "--targets",
            "Q8_0,Q4_K_M",
            "--recipes",
            "upstream,qwen35",
            "--text",
            str(files["text"]),
            "-o",
            str(out),
            "--ctx",
            str(N_CTX),
            "--chunks",
            "2",
            "--threads",
            str(usable_cpus()),
            "--json",
            "--plot",
            str(tmp_path / "sweep.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["target"], x["recipe"]) for x in rows] == [
        ("Q8_0", "upstream"),
        ("Q8_0", "qwen35"),
        ("Q4_K_M", "upstream"),
        ("Q4_K_M", "qwen35"),
    ]
    for x in rows:
        alone = tmp_path / "alone.gguf"
        convert(files["hf"], alone, file_type=x["target"], recipe=x["recipe"], force=True)
        assert Path(x["path"]).read_bytes() == alone.read_bytes()
        plan = {t.out.name: t.qtype for t in make_plan(files["hf"], x["target"], recipe=x["recipe"]).tensors}
        assert {t.name: t.qtype for t in scan(x["path"]).tensors} == plan
        up = next(y for y in rows if y["target"] == x["target"] and y["recipe"] == "upstream")
        assert x["kld_vs_upstream"] == pytest.approx(x["kld_mean"] / up["kld_mean"])
        assert x["size_vs_upstream"] == pytest.approx(x["bytes"] / up["bytes"])
    q8 = {x["recipe"]: x for x in rows if x["target"] == "Q8_0"}
    assert q8["qwen35"]["bytes"] > q8["upstream"]["bytes"]  # the DeltaNet gates went to F16
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run(
        [
            QWEN35,
            "quant",
            "sweep",
            str(files["hf"]),
            "--targets",
            "Q4_K_S",
            "--recipes",
            "qwen35",
            "--text",
            str(files["text"]),
            "-o",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert _one_line_error(r) and "--recipe qwen35 has mixes for" in r.stderr


def test_eval_warns_when_the_files_are_not_one_model(files, moe_f32):
    base = ["--text", str(files["text"]), "--ctx", str(N_CTX), "--chunks", "1", "--threads", str(usable_cpus())]
    same = subprocess.run(
        [QWEN35, "quant", "eval", str(files["F32"]), str(files["Q8_0"]), *base], capture_output=True, text=True
    )
    assert same.returncode == 0 and "warning" not in same.stderr, same.stderr
    other = subprocess.run(
        [QWEN35, "quant", "eval", str(files["F32"]), str(moe_f32[1]), *base], capture_output=True, text=True
    )
    assert f"warning: {moe_f32[1].name} is not the same model" in other.stderr, other.stderr
    assert "architecture qwen35moe vs qwen35" in other.stderr


def test_imatrix_shows_progress_on_a_terminal(moe_f32, files, tmp_path):
    from test_chat_cli import Terminal

    out = tmp_path / "im.gguf"
    t = Terminal(
        [
            QWEN35,
            "quant",
            "imatrix",
            str(moe_f32[1]),
            "--text",
            str(files["text"]),
            "-o",
            str(out),
            "--ctx",
            "64",
            "--threads",
            str(usable_cpus()),
        ]
    )
    t.expect(r"computing the importance matrix.*\d+/\d+")  # a bar that counts chunks, on the terminal only
    t.expect(r"wrote .*im\.gguf")
    assert t.p.wait(timeout=120) == 0 and out.is_file()
