"""The GGUF's MTP (NextN) head as a draft model for speculative decoding.

Qwen3.5 checkpoints carry one multi-token-prediction block: from the target's final-normed hidden
state h_t and the embedding of token t+1 it predicts token t+2. llama.cpp runs it in a second
context of the same model (``LLAMA_CONTEXT_TYPE_MTP``) with its own KV cache for the block's one
attention layer. That cache must hold, for every position p of the sequence, the pair
(x_p, h_{p-1}); :class:`MTPHead` keeps it in step with whatever the target evaluates (prompt
prefill, verified drafts, rollbacks, checkpoint restores), lazily: pairs are queued when the
target produces them and evaluated together with the next draft.

Position 0 has no h_{-1}; it gets no pair (the head is trained on pairs only), so the MTP cache of
a sequence starts at position 1. Where a restore leaves h_{p-1} unknown, the pair uses zeros:
drafts may be worse for that position, outputs never differ (the target verifies every draft).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from typing import TYPE_CHECKING

from qwen35 import native

if TYPE_CHECKING:
    import numpy as np

MAX_BATCH = 512  # pairs per MTP decode call
RECENT = 64  # target hidden rows kept per sequence (rollbacks, drafts)


class MTPHead:
    """Drafts tokens with the MTP block on ``ctx`` (an MTP context of the target's model)."""

    def __init__(self, model_p, ctx_p, n_seq: int):
        import llama_cpp

        self._lib = native.ext()
        self.ctx = ctx_p
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(model_p))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model_p)))
        self._lib.set_embeddings_nextn(ctx_p, True, True)  # hidden rows of the output tokens only
        self._batch = llama_cpp.llama_batch_ext_init(ctx_p)
        self._n_seq = n_seq
        self._synced: dict[int, int] = {}  # seq -> MTP cache holds pairs for [1, synced)
        self._queue: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # seq -> [(pos, token, h_{pos-1})]
        self._recent: dict[int, OrderedDict[int, np.ndarray]] = {}  # seq -> pos -> target h_pos

    def close(self) -> None:
        import llama_cpp

        if self._batch:
            llama_cpp.llama_batch_ext_free(self._batch)
            self._batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    # ---------------------------------------------------------------- target side
    def observe(self, seq: int, pos: int, tokens: list[int], h: np.ndarray) -> None:
        """The target evaluated tokens at positions pos.. of seq; h: their hidden rows [n, n_embd]."""
        queue = self._queue.setdefault(seq, [])
        recent = self._recent.setdefault(seq, OrderedDict())
        prev = recent.get(pos - 1)
        for i, tok in enumerate(tokens):
            p = pos + i
            if p > 0:
                queue.append((p, tok, prev if prev is not None else self._zeros()))
            prev = h[i]
            recent[p] = h[i]
        while len(recent) > RECENT:
            recent.popitem(last=False)
        if len(queue) >= 4 * MAX_BATCH:  # a long prefill: catch up now rather than hold the rows
            self._flush(seq)

    def remove(self, seq: int, p0: int) -> None:
        """Mirror of the target's seq_rm(seq, p0, -1) (p0 <= 0: the whole sequence)."""
        import llama_cpp

        p0 = max(p0, 0)
        self._queue[seq] = [e for e in self._queue.get(seq, []) if e[0] < p0]
        recent = self._recent.get(seq)
        if recent is not None:
            for p in [p for p in recent if p >= p0]:
                del recent[p]
        if self._synced.get(seq, 1) > p0:
            self._synced[seq] = max(p0, 1)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, p0, -1)

    def hidden(self, seq: int, pos: int) -> np.ndarray | None:
        """The target's hidden row at pos, when still known (kept with recurrent checkpoints)."""
        return self._recent.get(seq, {}).get(pos)

    def set_hidden(self, seq: int, pos: int, row: np.ndarray) -> None:
        """Make the target's hidden row at pos known again (after a checkpoint restore)."""
        self._recent.setdefault(seq, OrderedDict())[pos] = row

    def state(self, seq: int) -> bytes:
        """The MTP cache of seq, caught up to everything the target evaluated (for saving)."""
        import llama_cpp

        self._flush(seq)
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        native.take_interrupt()
        return ctypes.string_at(buf, n)  # buf[:n] would build a list of n ints first

    def set_state(self, seq: int, tokens: list[int], data: bytes | None, last_hidden: np.ndarray | None) -> None:
        """Take over seq after the target's state was restored to hold tokens: from data (what
        state() returned), else rebuilt from the tokens with unknown hidden rows (zeros)."""
        import llama_cpp

        self.remove(seq, 0)
        if data is not None:
            buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            ok = llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(data), seq)
            native.take_interrupt()
            if ok == 0:
                from .model import ModelError

                raise ModelError(
                    "llama.cpp could not restore the saved MTP draft state (other context settings); "
                    "load the model as it was when the chat was saved"
                )
            self._synced[seq] = max(len(tokens), 1)
        else:
            self._queue[seq] = [(p, t, self._zeros()) for p, t in enumerate(tokens) if p > 0]
        if last_hidden is not None and tokens:
            self.set_hidden(seq, len(tokens) - 1, last_hidden)

    # ---------------------------------------------------------------- drafting
    def draft(self, seq: int, token: int, pos: int, n_max: int, p_min: float = 0.0) -> list[int]:
        """Up to n_max greedy draft tokens following token (at position pos, not yet evaluated by
        the target, whose sequence holds positions [0, pos)). Drafting stops at the first token
        the head gives less than p_min probability (llama.cpp's --draft-p-min)."""
        if n_max <= 0 or pos <= 0:
            return []
        logits, h = self.predict(seq, token, pos)
        out: list[int] = []
        while True:
            tok, p = _top(logits)
            if p < p_min:
                break
            out.append(tok)
            if len(out) == n_max:
                break
            logits, h = self._decode([(pos + len(out), tok, h)], seq, want=True)
        return out

    def predict(self, seq: int, token: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """The head's (logits, hidden row) for the token after token, which sits at position pos
        (pos >= 1) after the target's positions [0, pos): its guess of the token at pos + 1."""
        prev = self.hidden(seq, pos - 1)
        head = (pos, token, prev if prev is not None else self._zeros())
        logits, h = self._flush(seq, head)
        self._synced[seq] = pos + 1  # the head pair is a real one: it stays
        return logits, h

    # ---------------------------------------------------------------- internals
    def _zeros(self) -> np.ndarray:
        import numpy as np

        return np.zeros(self.n_embd, np.float32)

    def _flush(self, seq: int, head=None):
        """Evaluate the queued pairs of seq (from where the MTP cache is in step), then head (the
        first draft pair) with output; returns (logits, hidden) of head, else (None, None)."""
        import llama_cpp

        synced = self._synced.get(seq, 1)
        queue = [e for e in self._queue.get(seq, []) if e[0] >= synced]
        # whatever a cut-short flush or draft left past synced goes first
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, synced, -1)
        end = queue[-1][0] + 1 if queue else synced
        # every target decode and seq_rm is mirrored here, so the pairs follow on without a gap
        if (queue and queue[0][0] != synced) or (head is not None and head[0] != end):
            raise RuntimeError(
                f"MTP cache of sequence {seq} is out of step with the target "
                f"(synced {synced}, queued from {queue[0][0] if queue else '-'}, "
                f"draft at {head[0] if head else '-'})"
            )
        items = queue + ([head] if head is not None else [])
        result = (None, None)
        for i in range(0, len(items), MAX_BATCH):
            part = items[i : i + MAX_BATCH]
            want = head is not None and i + MAX_BATCH >= len(items)
            result = self._decode(part, seq, want=want)
        # only now, and in this order: cut short before, the pairs stay queued and synced stays
        # where it was; between the two, the queue's pairs all lie before synced and are skipped
        self._synced[seq] = end
        self._queue.pop(seq, None)
        return result

    def _decode(self, pairs, seq: int, want: bool):
        """One MTP decode of (pos, token, h_prev) pairs; with want, (logits, hidden) of the last."""
        import llama_cpp
        import numpy as np

        b = self._batch
        llama_cpp.llama_batch_ext_clear(b)
        pos_c = llama_cpp.llama_pos(0)
        for j, (p, tok, row) in enumerate(pairs):
            idx = llama_cpp.llama_batch_ext_add_token(b, seq, tok)
            pos_c.value = p
            llama_cpp.llama_batch_ext_set_pos(b, idx, ctypes.byref(pos_c))
            row = np.ascontiguousarray(row, dtype=np.float32)
            emb = llama_cpp.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
            if not llama_cpp.llama_batch_ext_set_embd_token(b, idx, emb):
                raise RuntimeError("llama_batch_ext_set_embd_token failed (hidden row width)")
            if want and j == len(pairs) - 1:
                llama_cpp.llama_batch_ext_set_output_logits(b, idx, True)
        rc = llama_cpp.llama_process(self.ctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, b)
        native.take_interrupt()
        if rc != 0:
            raise RuntimeError(f"MTP decode failed (llama_process returned {rc})")
        if not want:
            return None, None
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()
        hid = np.ctypeslib.as_array(
            self._lib.get_embeddings_nextn_ith(self.ctx, len(pairs) - 1), shape=(self.n_embd,)
        ).copy()
        return logits, hid


def _top(logits: np.ndarray) -> tuple[int, float]:
    """The most likely token and its probability."""
    import numpy as np

    i = int(np.argmax(logits))
    return i, float(1.0 / np.exp(logits.astype(np.float64) - logits[i]).sum())
