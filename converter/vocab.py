"""Tokenizer metadata for a Qwen3.5 GGUF (gpt2-style byte-level BPE, pre-tokenizer ``qwen35``).

Reads ``tokenizer.json`` directly (no transformers): the token list and token types follow
upstream's ``get_vocab_base`` rules; merges, special token ids, ``add_bos``/``add_eos`` and the
chat template come from gguf's own ``SpecialVocab``; merges are converted here in its format.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import gguf

from .checkpoint import CheckpointError

# Qwen3.5's pre-tokenizer regex (the Split step of tokenizer.json); llama.cpp calls it "qwen35".
QWEN35_PRETOKENIZER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _pretokenizer_regex(tok: dict) -> str | None:
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("type") == "Split" and isinstance(step.get("pattern"), dict):
            return step["pattern"].get("Regex")
    return None


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no tokenizer.json; copy the tokenizer files next to the weights")
    try:
        tok = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path.name} is not valid JSON ({e!s:.80}); re-download it") from None
    _check_tokenizer(tok, path.name)
    return tok


def _check_tokenizer(tok, name: str) -> None:
    """The parts of tokenizer.json the conversion reads have the types it reads them as."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{name} is damaged: {what}; re-download the tokenizer files")

    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise bad("it has no model object")
    vocab = tok["model"].get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise bad("model.vocab is not an object of token ids")
    if not all(type(i) is int and 0 <= i < 1 << 24 for i in vocab.values()):
        raise bad("model.vocab has an id that is not a whole number from 0")
    merges = tok["model"].get("merges") or []
    if not isinstance(merges, list) or not all(
        isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
        for m in merges
    ):
        raise bad("model.merges is not a list of pairs")
    added = tok.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(t, dict)
        and isinstance(t.get("content"), str)
        and type(t.get("id")) is int
        and 0 <= t["id"] < 1 << 24
        for t in added
    ):
        raise bad("added_tokens is not a list of {id, content}")
    pre = tok.get("pre_tokenizer")
    if pre is not None and not isinstance(pre, dict):
        raise bad("pre_tokenizer is not an object")


def read_vocab(model_dir: Path, vocab_size: int, tok: dict | None = None) -> tuple[list[str], list[int], list[str]]:
    """Token strings and gguf.TokenType values, padded with [PADi] up to vocab_size, and the merges
    as gguf's SpecialVocab writes them ("a b", spaces inside a part as U+0120). tok: tokenizer.json
    when already parsed."""
    path = model_dir / "tokenizer.json"
    if tok is None:
        tok = _tokenizer_json(model_dir)
    _check_tokenizer(tok, path.name)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path.name} has a {model.get('type')} model; Qwen3.5 uses byte-level BPE")
    regex = _pretokenizer_regex(tok)
    if regex != QWEN35_PRETOKENIZER:
        raise CheckpointError(
            f"{path.name} has a pre-tokenizer that is not Qwen3.5's ({str(regex or 'none')[:40]!r}…); "
            "use the tokenizer files of the checkpoint's Qwen3.5 release"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {}
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        added[t["id"]] = t
    if max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"tokenizer has token id {max(vocab.values())} but config vocab_size is {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    for s, i in vocab.items():  # a later string with the same id wins
        tokens[i] = s
    types = [gguf.TokenType.NORMAL] * vocab_size
    for i, t in added.items():
        types[i] = (
            gguf.TokenType.CONTROL if t.get("special") or _looks_special(tokens[i]) else gguf.TokenType.USER_DEFINED
        )
    for i in [i for i, s in enumerate(tokens) if s is None]:
        tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], str):
        if not (isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str)):
            raise CheckpointError(f"{path.name} has merges in an unknown format; expected 'a b' or ['a', 'b']")
        merges = [a.replace(" ", "\u0120") + " " + b.replace(" ", "\u0120") for a, b in merges]
    return tokens, types, merges


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    tok = _tokenizer_json(model_dir)
    tokens, types, merges = read_vocab(model_dir, vocab_size, tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen35")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:
        raise CheckpointError(f"{model_dir / 'tokenizer.json'} has no merges; a byte-level BPE tokenizer needs them")
    writer.add_token_merges(merges)
    # special token ids, add_bos/eos and the chat template, by gguf's rules (merges done above:
    # its per-merge Python conversion took 1.3 s on the 248K vocabulary)
    with _without_vocab(model_dir, tok) as view:
        try:  # gguf's reader of tokenizer_config.json & co. raises what it meets on damaged files
            gguf.SpecialVocab(view, load_merges=False).add_to_gguf(writer)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
            raise CheckpointError(
                f"the tokenizer files in {model_dir} are damaged ({type(e).__name__}: {e!s:.60}); re-download them"
            ) from None


@contextlib.contextmanager
def _without_vocab(model_dir: Path, tok: dict):
    """model_dir as SpecialVocab needs it: the same files (symlinked) with a tokenizer.json that
    lacks the vocabulary and merges it does not read, so it does not parse 11 MB of JSON again
    (~0.4 s). Falls back to model_dir where symlinks cannot be made."""
    if isinstance(tok.get("model"), dict):
        tok = {**tok, "model": {k: v for k, v in tok["model"].items() if k not in ("vocab", "merges")}}
    with tempfile.TemporaryDirectory(prefix="qwen35-vocab-") as tmp:
        view = Path(tmp)
        try:
            for entry in model_dir.iterdir():
                if entry.name != "tokenizer.json":
                    (view / entry.name).symlink_to(entry.resolve())
        except OSError:
            yield model_dir
            return
        (view / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
        yield view
