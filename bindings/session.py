"""Prompt reuse on Qwen3.5's hybrid memory: evaluate only what is new.

The DeltaNet layers keep one recurrent state per sequence that cannot be truncated, so a prompt
that diverges from what was evaluated cannot simply drop the KV cache past the divergence (what
llama-cpp-python's ``Llama`` tries; the recurrent memory refuses and it re-evaluates everything).
Instead a ``PromptCache`` keeps, beside the evaluated tokens, checkpoints of the recurrent state
(``llama_state_seq_get_data_ext`` with ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``: the DeltaNet and
conv states only, not the KV cache) taken at chosen positions. On divergence it restores the
newest checkpoint at or before the divergence point, drops the KV cache past it, and evaluates
from there. A divergence within the last ``n_rs_seq`` tokens is undone by llama.cpp's own
recurrent-state rollback, without a checkpoint.

An operation cut short (Ctrl-C, a failed decode) may leave the sequence holding more or other
than ``tokens`` says. The cache notes what it was about to change before it changes it, and its
next use puts the sequence back in step from the newest checkpoint before that point (or from
nothing), so an interruption costs re-evaluation, never a wrong state.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from .model import Model

PARTIAL_ONLY = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


@dataclass(frozen=True)
class Reuse:
    """What the cache did for one prompt (a reply's usage carries the same counts)."""

    prompt_tokens: int  # tokens of the prompt
    reused_tokens: int  # taken from the cache without evaluation
    evaluated_tokens: int  # run through the model for this prompt
    restored_from: int | None = None  # checkpoint position restored (None: none needed)
    rolled_back: int = 0  # tokens undone by llama.cpp's recurrent rollback (n_rs_seq)


class PromptCache:
    """The evaluated tokens of one sequence of a loaded model, with recurrent checkpoints.

    checkpoint_every: also take a checkpoint every this many tokens (0: only at marks).
    budget_bytes: RAM for checkpoints; the least recently used go first when it is exceeded.
    """

    def __init__(self, model: Model, seq_id: int = 0, *, checkpoint_every: int = 1024, budget_bytes: int = 512 << 20):
        self.model, self.seq_id = model, seq_id
        self.checkpoint_every, self.budget_bytes = checkpoint_every, budget_bytes
        self.tokens: list[int] = []
        self.checkpoints: OrderedDict[int, bytes] = OrderedDict()  # position -> state after tokens[:position]
        self.checkpoint_hidden: dict[int, np.ndarray] = {}  # position -> target hidden row at position - 1 (MTP)
        self._last_logits: np.ndarray | None = None
        self._unsure: int | None = None  # an operation did not finish: the sequence may differ from tokens past this
        self.reset()  # the cache owns its sequence: whatever an earlier user left there goes

    # ---------------------------------------------------------------- state
    @property
    def checkpoint_bytes(self) -> int:
        return sum(len(b) for b in self.checkpoints.values())

    def reset(self) -> None:
        with self.changing(0):
            self._clear()

    def _clear(self) -> None:
        self.model.seq_rm(self.seq_id, 0)
        self.tokens, self._last_logits = [], None
        self.checkpoints.clear()
        self.checkpoint_hidden.clear()

    @contextmanager
    def changing(self, keep: int | None = None):
        """Around anything that changes the sequence. keep: how many of ``tokens`` the change
        leaves alone (default: all). Should it not finish, the next use of the cache restores
        the newest checkpoint at or before keep."""
        self.sync()
        self._unsure = len(self.tokens) if keep is None else keep
        yield
        self._unsure = None

    def _keep_only(self, keep: int) -> None:
        """Lower the bound of what the change in progress leaves alone."""
        self._unsure = min(self._unsure, keep) if self._unsure is not None else keep

    def sync(self) -> None:
        """Put the sequence back in step with ``tokens`` after an operation that did not finish:
        restore the newest checkpoint it did not touch, else start over. Nothing when in step."""
        if self._unsure is None:
            return
        n = min(self._unsure, len(self.tokens))
        del self.tokens[n:]
        for p in [p for p in self.checkpoints if p > n]:
            del self.checkpoints[p]
            self.checkpoint_hidden.pop(p, None)
        self._last_logits = None
        # both go through Model.seq_rm, which also takes the MTP head's cache back to the same point
        if not (self.checkpoints and self._restore(max(self.checkpoints))):
            self._clear()
        self._unsure = None

    def _save_checkpoint(self) -> None:
        import llama_cpp

        ctx = self.model._ctx
        size = llama_cpp.llama_state_seq_get_size_ext(ctx, self.seq_id, PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data_ext(ctx, buf, size, self.seq_id, PARTIAL_ONLY)
        if n != size:
            return
        pos = len(self.tokens)
        self.checkpoints[pos] = bytes(buf)
        self.checkpoints.move_to_end(pos)
        row = self.model.mtp.hidden(self.seq_id, pos - 1) if self.model.mtp is not None else None
        if row is not None:
            self.checkpoint_hidden[pos] = row
        while self.checkpoint_bytes > self.budget_bytes and len(self.checkpoints) > 1:
            old, _ = self.checkpoints.popitem(last=False)
            self.checkpoint_hidden.pop(old, None)

    def _restore(self, pos: int) -> bool:
        import llama_cpp

        data = self.checkpoints[pos]
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama_cpp.llama_state_seq_set_data_ext(self.model._ctx, buf, len(data), self.seq_id, PARTIAL_ONLY) == 0:
            return False
        # the KV cache (full-attention layers) past the checkpoint goes; the recurrent part now
        # ends at pos - 1, so removing [pos, end) leaves it alone
        if not self.model.seq_rm(self.seq_id, pos):
            return False
        if self.model.mtp is not None and pos in self.checkpoint_hidden:
            self.model.mtp.set_hidden(self.seq_id, pos - 1, self.checkpoint_hidden[pos])
        self.checkpoints.move_to_end(pos)
        self.tokens = self.tokens[:pos]
        return True

    # ---------------------------------------------------------------- eval
    def eval(self, prompt: list[int], marks: Iterable[int] = ()) -> tuple[np.ndarray, Reuse]:
        """Make the sequence hold exactly prompt; returns the logits after its last token and
        what was reused. marks: positions (token counts) at which to take a checkpoint when
        they are evaluated, e.g. the start of each assistant turn."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.model.n_ctx:
            from .model import ModelError

            raise ModelError(
                f"{len(prompt)} tokens exceed n_ctx={self.model.n_ctx}; load the model with a "
                "larger n_ctx or shorten the conversation"
            )
        with self.changing():
            return self._eval(prompt, marks)

    def _eval(self, prompt: list[int], marks: Iterable[int]) -> tuple[np.ndarray, Reuse]:
        if (
            self.tokens == prompt[: len(self.tokens)]
            and len(self.tokens) == len(prompt)
            and self._last_logits is not None
        ):
            return self._last_logits, Reuse(len(prompt), len(prompt), 0)
        restored, rolled = self.prepare(prompt)
        reused = len(self.tokens)
        todo = prompt[reused:]
        stops = self.checkpoint_stops(prompt, marks)
        start = reused
        for end in [*stops, len(prompt)]:
            part = prompt[start:end]
            if part and end < len(prompt):  # up to a checkpoint: no logits needed
                self.model._decode(part, start, seq_id=self.seq_id, last_logits=False)
                self.tokens.extend(part)
            elif part:
                self._last_logits = self.model._decode_seq(part, start, self.seq_id)
                self.tokens.extend(part)
            if end < len(prompt):
                self._save_checkpoint()
            self._unsure = len(self.tokens)  # in step up to here: a later interruption keeps this part
            start = end
        return self._last_logits.copy(), Reuse(len(prompt), reused, len(todo), restored, rolled)

    def prepare(self, prompt: list[int]) -> tuple[int | None, int]:
        """Cut the sequence back to the longest part of prompt it can keep, leaving at least the
        last prompt token to evaluate (for its logits): by recurrent rollback within n_rs_seq
        tokens, else from the newest checkpoint at or before the divergence, else from nothing.
        Returns (checkpoint restored or None, tokens rolled back). Call inside ``changing()``."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        target = min(common, len(prompt) - 1)
        restored, rolled = None, 0
        if target < len(self.tokens):
            self._keep_only(target)
            n_back = len(self.tokens) - target
            if target > 0 and n_back <= self.model.n_rs_seq and self.model.seq_rm(self.seq_id, target):
                rolled = n_back
                self.tokens = self.tokens[:target]
            else:
                usable = [p for p in self.checkpoints if p <= target]
                if usable and self._restore(max(usable)):
                    restored = max(usable)
                else:
                    self._clear()
            for p in [p for p in self.checkpoints if p > len(self.tokens)]:
                del self.checkpoints[p]
                self.checkpoint_hidden.pop(p, None)
        self._last_logits = None
        return restored, rolled

    def reusable(self, prompt: list[int]) -> int:
        """How many of prompt's tokens ``prepare`` would keep (nothing is changed)."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        target = min(common, len(prompt) - 1)
        if target >= len(self.tokens) or (target > 0 and len(self.tokens) - target <= self.model.n_rs_seq):
            return target
        return max((p for p in self.checkpoints if p <= target), default=0)

    def checkpoint_stops(self, prompt: list[int], marks: Iterable[int]) -> list[int]:
        """Positions past what the sequence holds at which evaluating prompt takes a checkpoint:
        the marks, and every checkpoint_every tokens."""
        reused = len(self.tokens)
        every = set(range(0, len(prompt), self.checkpoint_every)) if self.checkpoint_every else set()
        return sorted(p for p in {*marks, *every} if reused < p < len(prompt))

    def last_logits(self) -> np.ndarray:
        """Logits after the last evaluated token (for saving a session)."""
        import numpy as np

        if self._last_logits is None:
            return np.zeros(0, np.float32)
        return self._last_logits.copy()

    def adopt(
        self,
        tokens: list[int],
        logits: np.ndarray,
        checkpoints: dict[int, bytes],
        checkpoint_hidden: dict[int, np.ndarray] | None = None,
    ) -> None:
        """Take over a sequence whose state was restored from a saved session (call it inside
        ``changing(0)`` around that restore)."""
        self.tokens = list(tokens)
        self._last_logits = logits.copy() if logits.size else None
        self.checkpoints = OrderedDict(sorted(checkpoints.items()))
        self.checkpoint_hidden = dict(checkpoint_hidden or {})

    def extend(self, tokens: list[int]) -> np.ndarray:
        """Evaluate tokens after the cached ones; the logits of every one [n, n_vocab]."""
        with self.changing():
            logits = self.model.eval_all(tokens, len(self.tokens), self.seq_id)
            self.tokens.extend(tokens)
            self._last_logits = logits[-1].copy()
        return logits

    def truncate(self, n: int, last_logits: np.ndarray) -> None:
        """Keep the first n tokens (a rejected draft's tail goes, by llama.cpp's recurrent
        rollback); last_logits: the logits after token n - 1, known to the caller."""
        with self.changing(n):
            self._truncate(n, last_logits)

    def _truncate(self, n: int, last_logits: np.ndarray) -> None:
        if n < len(self.tokens):
            if not self.model.seq_rm(self.seq_id, n):
                from .model import ModelError

                raise ModelError(
                    f"cannot undo {len(self.tokens) - n} tokens: the context keeps "
                    f"n_rs_seq={self.model.n_rs_seq} recurrent snapshots; load the model with a larger "
                    "n_rs_seq or draft fewer tokens"
                )
            del self.tokens[n:]
            for p in [p for p in self.checkpoints if p > n]:
                del self.checkpoints[p]
                self.checkpoint_hidden.pop(p, None)
        self._last_logits = last_logits

    def append(self, token: int) -> np.ndarray:
        """Evaluate one more token (generation); returns its logits."""
        with self.changing():
            self._last_logits = self.model._decode_seq([token], len(self.tokens), self.seq_id)
            self.tokens.append(token)
        return self._last_logits  # callers must not modify it (it is also the cache's copy)
