"""--recipe qwen35: the table of converter/recipes.py as a pure function over upstream's choices,
read off case by case (a cell is a floor, "." keeps llama-quantize's type, fallbacks and
--tensor-type overrides as upstream), and through qwen35-convert."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

from qwen35.converter import quantize, recipes
from qwen35.converter.recipes import ModelDesc, TensorDesc, qwen35_types

CONVERT = str(Path(sys.executable).parent / "qwen35-convert")
DENSE = ModelDesc(n_layer_all=9, n_expert=0, n_gqa=2)  # 8 trunk layers + the MTP block
MOE = ModelDesc(n_layer_all=9, n_expert=8, n_gqa=2)

# (case, tensor, ne, target, model, upstream's type, qwen35's type)
CASES = [
    ("gates to F16", "blk.0.ssm_alpha.weight", (256, 4), "Q4_K_M", DENSE, Q.Q4_K, Q.F16),
    ("gates at Q8_0 too", "blk.1.ssm_beta.weight", (256, 4), "Q3_K_M", DENSE, Q.Q3_K, Q.F16),
    ("DeltaNet output gate up to Q5_K", "blk.0.attn_gate.weight", (256, 256), "Q4_K_M", DENSE, Q.Q4_K, Q.Q5_K),
    ("ssm_out up to Q6_K", "blk.0.ssm_out.weight", (256, 256), "Q4_K_M", DENSE, Q.Q4_K, Q.Q6_K),
    ("ssm_out at IQ3_XXS", "blk.0.ssm_out.weight", (256, 256), "IQ3_XXS", DENSE, Q.IQ3_XXS, Q.Q4_K),
    # a floor: 8 experts make upstream give attention-V-like tensors Q8_0, which stays
    ("floor keeps more bits", "blk.0.attn_qkv.weight", (256, 512), "Q4_K_M", MOE, Q.Q8_0, Q.Q8_0),
    ("full attention kept", "blk.3.attn_q.weight", (256, 512), "Q4_K_M", DENSE, Q.Q4_K, Q.Q4_K),
    ("shared expert up", "blk.0.ffn_up_shexp.weight", (256, 256), "Q4_K_M", MOE, Q.Q4_K, Q.Q5_K),
    # 192-long rows: upstream's Q6_K falls back to Q8_0; the cell's Q5_K would fall back to Q5_1
    # (6 bits), below it, so Q8_0 stays
    ("fallback before the floor", "blk.0.ffn_down_shexp.weight", (192, 256), "Q4_K_M", MOE, Q.Q8_0, Q.Q8_0),
    ("routed experts kept", "blk.0.ffn_gate_exps.weight", (256, 64, 8), "Q4_K_M", MOE, Q.Q4_K, Q.Q4_K),
    ("MLP kept", "blk.1.ffn_gate.weight", (256, 768), "Q4_K_M", DENSE, Q.Q4_K, Q.Q4_K),
    # blk.8 is the MTP block of an 8-layer trunk: never calibrated by llama-imatrix, so >= 4 bits
    ("MTP block at 4 bits", "blk.8.attn_q.weight", (256, 512), "IQ3_XXS", DENSE, Q.IQ2_S, Q.Q4_K),
    ("trunk attention at IQ3_XXS kept", "blk.7.attn_q.weight", (256, 512), "IQ3_XXS", DENSE, Q.IQ2_S, Q.IQ2_S),
    ("norms stay unquantized", "blk.0.attn_norm.weight", (256,), "Q4_K_M", DENSE, None, None),
]


@pytest.mark.parametrize("case,name,ne,target,model,up,ours", CASES, ids=[c[0] for c in CASES])
def test_table_cases(case, name, ne, target, model, up, ours):
    ftype = quantize.FILE_TYPES[target][0]
    t = [TensorDesc(name, ne)]
    assert recipes.upstream_types(t, ftype, model) == [up]
    assert qwen35_types(t, target, ftype, model, n_layer=8) == [ours]


def test_a_tensor_type_override_still_wins():
    t = [TensorDesc("blk.0.ssm_out.weight", (256, 256))]
    assert qwen35_types(t, "Q4_K_M", F.MOSTLY_Q4_K_M, DENSE, 8, [("ssm_out", Q.Q4_0)]) == [Q.Q4_0]


def test_the_table_is_well_formed():
    for target, row in recipes.QWEN35_TABLE.items():
        assert target in quantize.FILE_TYPES and len(row) == len(recipes.QWEN35_COLUMNS)
        assert all(c == "." or c in Q.__members__ for c in row), target
    with pytest.raises(KeyError, match="has mixes for"):
        recipes.qwen35_rules("Q2_K", 8)


def _plan(hf, *args):
    r = subprocess.run(
        [CONVERT, str(hf), "-o", "/nonexistent/x.gguf", "--dry-run", "--json", *args], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return {p["name"]: p["type"] for p in json.loads(r.stdout)["plan"]}


def test_convert_applies_the_recipe_over_upstreams_plan(tiny_moe_f32, tmp_path):
    hf, _ = tiny_moe_f32
    up = _plan(hf, "--type", "Q4_K_M")
    ours = _plan(hf, "--type", "Q4_K_M", "--recipe", "qwen35")
    changed = {k for k in up if up[k] != ours[k]}
    assert changed and all(recipes.bits_per_weight(Q[ours[k]]) > recipes.bits_per_weight(Q[up[k]]) for k in changed)
    assert ours["blk.0.ssm_alpha.weight"] == "F16"
    # Q8_0 (the converter's own type choice) gets the gates' cell and nothing else
    up8, ours8 = _plan(hf, "--type", "Q8_0"), _plan(hf, "--type", "Q8_0", "--recipe", "qwen35")
    assert {k for k in up8 if up8[k] != ours8[k]} == {k for k in up8 if ".ssm_alpha." in k or ".ssm_beta." in k}
    r = subprocess.run(
        [CONVERT, str(hf), "-o", str(tmp_path / "x.gguf"), "--type", "Q4_K_S", "--recipe", "qwen35"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--recipe qwen35 has mixes for" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_dry_run_plans_the_file_that_is_written(tmp_path):
    """--dry-run's size is the written file's, to the byte (metadata included); --json names the
    recipe; the tensors marked raised are those with more bits than a plain upstream plan gives."""
    demo = Path(__file__).resolve().parent.parent / "examples" / "models" / "qwen35-dense-tiny"
    out = tmp_path / "q.gguf"

    def plan(*args):
        r = subprocess.run(
            [CONVERT, str(demo), "-o", str(out), "--type", "Q4_K_M", "--dry-run", "--json", *args],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and not out.exists(), r.stderr
        return json.loads(r.stdout)

    ours, base = plan("--recipe", "qwen35"), plan("--tensor-type", "ssm_out=q8_0")
    assert (ours["recipe"], base["recipe"]) == ("qwen35", "upstream")
    upstream = {t["name"]: t["type"] for t in plan()["plan"]}
    for t in ours["plan"]:
        more = recipes.bits_per_weight(Q[t["type"]]) > recipes.bits_per_weight(Q[upstream[t["name"]]])
        assert t["raised"] == more, t
    assert any(t["raised"] for t in ours["plan"])
    assert {t["name"] for t in base["plan"] if t["raised"]} == {n for n in upstream if "ssm_out" in n}
    r = subprocess.run(
        [CONVERT, str(demo), "-o", str(out), "--type", "Q4_K_M", "--recipe", "qwen35", "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == ours["bytes"] == json.loads(r.stdout)["bytes"]
    text = subprocess.run(
        [CONVERT, str(demo), "-o", str(out), "--type", "Q4_K_M", "--recipe", "qwen35", "--dry-run"],
        capture_output=True,
        text=True,
    ).stdout
    assert text.splitlines()[0].split() == ["tensor", "shape", "(ggml", "ne)", "type", "bytes"]
    assert "*" in text and "more bits than llama-quantize's choice" in text
