"""qwen35 inspect: the memory plan equals what llama.cpp allocates, HF and GGUF reports agree."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.cpus import usable_cpus

QWEN35 = str(Path(sys.executable).parent / "qwen35")


@pytest.fixture(scope="module")
def moe(tmp_path_factory, lib_dir):
    from support import tiny

    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("inspect")
    hf = tiny.make_checkpoint(d / "hf", moe=True, mtp=True)
    convert(hf, d / "q8.gguf", file_type="Q8_0")
    return hf, d / "q8.gguf"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _load_log(gguf, **kw) -> str:
    """What llama.cpp (and libmtmd) log while Model.load(gguf, **kw) loads the model."""
    from qwen35.bindings.model import Model

    cap = _Capture()
    log = logging.getLogger("qwen35.llama_cpp")
    log.addHandler(cap)
    old = log.level
    log.setLevel(logging.DEBUG)
    try:
        with Model.load(gguf, **kw):
            pass
    finally:
        log.removeHandler(cap)
        log.setLevel(old)
    return "\n".join(cap.lines)


@pytest.mark.parametrize("ctx,kv_type", [(4096, "f16"), (8192, "q8_0"), (2048, "f32")])
def test_memory_plan_matches_llama_cpp_allocation(moe, ctx, kv_type):
    from qwen35.converter.inspect import inspect

    _, gguf = moe
    plan = inspect(gguf, ctx=ctx, kv_type=kv_type).memory
    text = _load_log(gguf, n_ctx=ctx, n_threads=usable_cpus(), kv_type=kv_type)
    kv = float(re.search(r"CPU KV buffer size =\s+([\d.]+) MiB", text).group(1))
    rs = float(re.search(r"CPU RS buffer size =\s+([\d.]+) MiB", text).group(1))
    assert abs(plan["kv_cache"] / 2**20 - kv) <= 0.005
    assert abs(plan["recurrent_state"] / 2**20 - rs) <= 0.005


def test_cli_reports_agree_for_hf_dir_and_gguf(moe):
    hf, gguf = moe
    a = json.loads(
        subprocess.run(
            [QWEN35, "inspect", str(hf), "--type", "Q8_0", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    b = json.loads(
        subprocess.run([QWEN35, "inspect", str(gguf), "--json"], capture_output=True, text=True, check=True).stdout
    )
    for k in ("architecture", "blocks", "n_params", "weight_bytes", "tensors_per_type", "hparams"):
        assert a[k] == b[k], k
    assert b["blocks"] == "LLLALLLAM" and b["architecture"] == "qwen35moe"
    text = subprocess.run(
        [QWEN35, "inspect", str(gguf), "--ctx", "262144", "--parallel", "8"], capture_output=True, text=True, check=True
    ).stdout
    assert "KV cache" in text and "fits in" in text


def test_the_vision_projector_is_counted_as_llama_cpp_loads_it(tmp_path, lib_dir):
    """Beside a GGUF (as qwen35-convert writes it) or planned for a checkpoint: the projector's
    weights are in the plan, in the bytes llama.cpp's vision loader reports."""
    from support import tiny

    from qwen35.converter.convert import convert
    from qwen35.converter.inspect import inspect

    hf = tiny.make_checkpoint(tmp_path / "hf", layout="multimodal")
    (tmp_path / "m").mkdir()
    gguf = tmp_path / "m" / "q8.gguf"
    proj = Path(convert(hf, gguf, file_type="Q8_0").mmproj["path"])
    rep = inspect(gguf)
    assert rep.projector["path"] == str(proj) and rep.memory["projector"] == rep.projector["bytes"] > 0
    assert (
        rep.memory["total"]
        == rep.weight_bytes + rep.memory["kv_cache"] + rep.memory["recurrent_state"] + rep.projector["bytes"]
    )
    planned = inspect(hf, file_type="Q8_0")
    assert planned.projector["bytes"] == rep.projector["bytes"]
    assert planned.projector["tensors_per_type"] == rep.projector["tensors_per_type"] == {"F32": 24, "Q8_0": 10}
    assert inspect(gguf, mmproj=False).projector is None
    size = float(
        re.search(r"model size:\s+([\d.]+) MiB", _load_log(gguf, n_ctx=256, n_threads=1, mmproj=proj)).group(1)
    )
    assert abs(rep.projector["bytes"] / 2**20 - size) <= 0.005, (rep.projector["bytes"] / 2**20, size)
    text = subprocess.run([QWEN35, "inspect", str(gguf)], capture_output=True, text=True, check=True).stdout
    assert "vision projector" in text and proj.name in text
    text = subprocess.run([QWEN35, "inspect", str(gguf), "--mmproj", "none"], capture_output=True, text=True).stdout
    assert "vision projector" not in text


@pytest.mark.quick
def test_inspect_errors_are_one_line(tmp_path):
    import numpy as np
    from gguf import GGUFEndian, GGUFWriter

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    r = subprocess.run([QWEN35, "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a GGUF" in r.stderr
    # an imatrix in llama-imatrix's GGUF layout is named as such, with where it goes
    im = tmp_path / "imatrix.gguf"
    w = GGUFWriter(im, arch="", endianess=GGUFEndian.LITTLE)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["x.txt"])
    w.add_tensor("blk.0.attn_qkv.weight.in_sum2", np.ones((1, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = subprocess.run([QWEN35, "inspect", str(im)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "importance matrix" in r.stderr, r.stderr
    assert "--imatrix" in r.stderr and "None" not in r.stderr
    for flag in ("--parallel", "--ctx"):
        r = subprocess.run([QWEN35, "inspect", str(bad), flag, "0"], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{flag} 0" in r.stderr, r.stderr


@pytest.mark.quick
def test_logit_metrics_match_torch():
    """verify's numbers against an independent computation (torch's kl_div and argmax)."""
    import numpy as np
    import torch

    from qwen35.verify import logit_metrics

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((7, 50)).astype(np.float32) * 3
    ours = ref + rng.standard_normal((7, 50)).astype(np.float32) * 0.3
    m = logit_metrics(ref, ours)
    p = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.tensor(ours, dtype=torch.float64), -1)
    kld = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    assert abs(m["kld_mean"] - kld.mean().item()) < 1e-12 and abs(m["kld_max"] - kld.max().item()) < 1e-12
    assert m["top1_agreement"] == (ref.argmax(-1) == ours.argmax(-1)).mean()
    assert m["max_abs"] == pytest.approx(float(np.abs(ref - ours).max()))


def test_verify_cli_on_a_converted_checkpoint(tmp_path, lib_dir):
    from support import tiny

    from qwen35.converter.convert import convert

    hf = tiny.make_checkpoint(tmp_path / "hf")
    convert(hf, tmp_path / "f32.gguf", file_type="F32")
    convert(hf, tmp_path / "q8.gguf", file_type="Q8_0")
    run = subprocess.run(
        [QWEN35, "verify", str(hf), str(tmp_path / "f32.gguf"), "--json"], capture_output=True, text=True, check=True
    )
    assert run.stderr == ""  # no progress bar off a terminal, no notes from the reference's library
    f32 = json.loads(run.stdout)
    q8 = json.loads(
        subprocess.run(
            [QWEN35, "verify", str(hf), str(tmp_path / "q8.gguf"), "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert f32["n_tokens"] > 20 and f32["top1_agreement"] == 1.0
    assert f32["max_abs"] <= 2e-3 * f32["logit_std"]
    assert q8["kld_mean"] > f32["kld_mean"]  # rounding to Q8_0 moves the distribution, measurably
    assert f32["passed"] and f32["max_kld"] == 0.1
    # a verdict against the stated bound, exit 1 when it fails; --text is a file, as for quant eval
    text = tmp_path / "heldout.txt"
    text.write_text("One two three four five six seven eight nine ten eleven twelve. " * 4)
    run = subprocess.run(
        [
            QWEN35,
            "verify",
            str(hf),
            str(tmp_path / "q8.gguf"),
            "--text",
            str(text),
            "--max-kld",
            str(q8["kld_mean"] / 10),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and "verdict         FAIL" in run.stdout, run.stdout + run.stderr
    assert int(re.search(r"tokens\s+(\d+)", run.stdout).group(1)) > 40  # the file's text, not its path
    # a GGUF of another model (a MoE checkpoint against a dense GGUF) is refused, not scored
    moe = tiny.make_checkpoint(tmp_path / "moe", moe=True)
    run = subprocess.run([QWEN35, "verify", str(moe), str(tmp_path / "f32.gguf")], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == "" and run.stderr.count("\n") == 1
    assert "is not a conversion of" in run.stderr and "architecture qwen35 in the GGUF, qwen35moe" in run.stderr


@pytest.mark.quick
def test_verify_refuses_what_is_not_a_local_safetensors_checkpoint(tmp_path):
    """One line naming the fix, exit 1, and no attempt to reach the hub or unpickle weights."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never opened: the checkpoint is checked first
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["Qwen3_5ForCausalLM"]}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    cases = {
        str(tmp_path / "missing"): "has no config.json",  # not a folder: was taken for a hub repo id
        "Qwen/Qwen3.5-4B": "has no config.json",
        str(pickled): "safetensors is required",
    }
    for hf_dir, message in cases.items():
        run = subprocess.run([QWEN35, "verify", hf_dir, str(gguf)], capture_output=True, text=True)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and message in run.stderr, run.stderr
