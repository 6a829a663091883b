"""Tokenizer metadata for a Qwen3.5 GGUF (gpt2-style byte-level BPE, pre-tokenizer ``qwen35``).

Reads ``tokenizer.json`` directly (no transformers): the token list and token types follow
upstream's ``get_vocab_base`` rules; merges, special token ids, ``add_bos``/``add_eos`` and the
chat template come from gguf's own ``SpecialVocab``; merges are converted here in its format.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from .checkpoint import CheckpointError

# Qwen3.5's pre-tokenizer regex (the Split step of tokenizer.json); llama.cpp calls it "qwen35".
QWEN35_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                       r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _pretokenizer_regex(tok: dict) -> str | None:
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps:
        if step.get("type") == "Split":
            return (step.get("pattern") or {}).get("Regex")
    return None


def read_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings and gguf.TokenType values, padded with [PADi] up to vocab_size, and the merges
    as gguf's SpecialVocab writes them ("a b", spaces inside a part as U+0120)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json; copy the tokenizer files next to the weights")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path.name} has a {model.get('type')} model; Qwen3.5 uses byte-level BPE")
    regex = _pretokenizer_regex(tok)
    if regex != QWEN35_PRETOKENIZER:
        raise CheckpointError(f"{path.name} has a pre-tokenizer that is not Qwen3.5's ({(regex or 'none')[:40]}…); "
                              "use the tokenizer files of the checkpoint's Qwen3.5 release")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {}
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        added[t["id"]] = t
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"tokenizer has token id {max(vocab.values())} but config vocab_size is {vocab_size}")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        s = by_id[i]
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") or _looks_special(s)
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(s)
    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        if not (isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str)):
            raise CheckpointError(f"{path.name} has merges in an unknown format; expected 'a b' or ['a', 'b']")
        merges = [a.replace(" ", "\u0120") + " " + b.replace(" ", "\u0120") for a, b in merges]
    return tokens, types, merges


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    tokens, types, merges = read_vocab(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen35")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'} has no merges; a byte-level BPE tokenizer needs them")
    writer.add_token_merges(merges)
    # special token ids, add_bos/eos and the chat template, by gguf's rules (merges done above:
    # its per-merge Python conversion took 1.3 s on the 248K vocabulary)
    gguf.SpecialVocab(model_dir, load_merges=False).add_to_gguf(writer)
