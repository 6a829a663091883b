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

Images (with a vision projector) sit in ``tokens`` as runs of one negative placeholder per
embedding, the same value for every embedding of one image (derived from the hash of its
pixels), so an image seen before matches like text. An image of n embeddings advances the
M-RoPE position by its grid side, not by n: ``runs`` records each image's place, and positions
in the sequence are computed from it (``pos``). A checkpoint is taken after every image, and the
embeddings of recent images are kept, so an image is encoded once.

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
EMBEDDINGS_BUDGET = 256 << 20  # bytes of image embeddings kept for re-use


def image_placeholder(image_id: str) -> int:
    """The value every embedding of an image holds in a token list: negative (no vocabulary id
    is), from the image's pixel hash."""
    return -1 - int(image_id[:15], 16)


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
        self.runs: list[tuple[int, int, int]] = []  # images in tokens: (start, embeddings, positions advanced)
        self.embeddings: OrderedDict[str, np.ndarray] = OrderedDict()  # image id -> embeddings, newest last
        self.images_encoded = 0  # images run through the vision tower (the rest came from embeddings)
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
        self.runs = []
        self.checkpoints.clear()
        self.checkpoint_hidden.clear()

    def pos(self, k: int) -> int:
        """The sequence position after the first k entries of tokens (k at an image's edge)."""
        return k + sum(n_pos - n for s, n, n_pos in self.runs if s + n <= k)

    def _cut_runs(self, n: int) -> None:
        self.runs = [r for r in self.runs if r[0] + r[1] <= n]

    @staticmethod
    def _snap(k: int, runs) -> int:
        """k, or the start of the image it falls inside (a sequence cannot end within an image)."""
        for s, n, *_ in runs:
            if s < k < s + n:
                return s
        return k

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
        n = self._snap(min(self._unsure, len(self.tokens)), self.runs)
        del self.tokens[n:]
        self._cut_runs(n)
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
        if not self.model.seq_rm(self.seq_id, self.pos(pos)):
            return False
        if self.model.mtp is not None and pos in self.checkpoint_hidden:
            self.model.mtp.set_hidden(self.seq_id, pos - 1, self.checkpoint_hidden[pos])
        self.checkpoints.move_to_end(pos)
        self.tokens = self.tokens[:pos]
        self._cut_runs(pos)
        return True

    # ---------------------------------------------------------------- eval
    def eval(
        self, prompt: list[int], marks: Iterable[int] = (), images: dict | None = None
    ) -> tuple[np.ndarray, Reuse]:
        """Make the sequence hold exactly prompt; returns the logits after its last token and
        what was reused. marks: positions (token counts) at which to take a checkpoint when
        they are evaluated, e.g. the start of each assistant turn. images: start in prompt ->
        the image's vision.Chunk, for each run of image placeholders in prompt (see
        ``vision.Projector.tokenize``); the model must have its projector."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.model.n_ctx:
            from .model import ModelError

            raise ModelError(
                f"{len(prompt)} tokens exceed n_ctx={self.model.n_ctx}; load the model with a "
                "larger n_ctx or shorten the conversation"
            )
        images = images or {}
        if images and self.model.projector is None:
            from .model import ModelError

            raise ModelError(
                f"{self.model.path.name} was loaded without a vision projector; pass mmproj= to take images"
            )
        if prompt[-1] < 0:
            raise ValueError("a prompt must end with text after its last image")
        with self.changing():
            return self._eval(prompt, marks, images)

    def _eval(self, prompt: list[int], marks: Iterable[int], images: dict) -> tuple[np.ndarray, Reuse]:
        if (
            self.tokens == prompt[: len(self.tokens)]
            and len(self.tokens) == len(prompt)
            and self._last_logits is not None
        ):
            return self._last_logits, Reuse(len(prompt), len(prompt), 0)
        spans = sorted((s, s + c.n_tokens) for s, c in images.items())
        restored, rolled = self.prepare(prompt, spans)
        reused = len(self.tokens)
        todo = prompt[reused:]
        # a checkpoint after every image, besides the marks: a later turn that changes what
        # follows an image goes back to it, not to before it
        stops = self.checkpoint_stops(prompt, [*marks, *(e for s, e in spans if e < len(prompt))])
        stops = sorted({q for q in (self._snap(p, spans) for p in stops) if q > reused})
        start = reused
        for end in [*stops, len(prompt)]:
            while start < end:
                image = next(((s, e) for s, e in spans if start <= s < end), None)
                stop = image[0] if image else end
                part = prompt[start:stop]
                if part and stop == len(prompt):  # the prompt's last tokens: their logits
                    self._last_logits = self.model._decode_seq(part, self.pos(start), self.seq_id)
                elif part:
                    self.model._decode(part, self.pos(start), seq_id=self.seq_id, last_logits=False)
                self.tokens.extend(part)
                if image:
                    self._decode_image(prompt, image, images[image[0]])
                start = image[1] if image else end
            if end < len(prompt):
                self._save_checkpoint()
            self._unsure = len(self.tokens)  # in step up to here: a later interruption keeps this part
        return self._last_logits.copy(), Reuse(len(prompt), reused, len(todo), restored, rolled)

    def _decode_image(self, prompt: list[int], span: tuple[int, int], chunk) -> None:
        """Decode an image's embeddings (encoded now, or kept from before) after tokens."""
        import numpy as np

        s, e = span
        if chunk.image in self.embeddings:
            embd = self.embeddings[chunk.image]
            self.embeddings.move_to_end(chunk.image)
        else:
            embd = self.model.projector.encode(chunk)
            self.images_encoded += 1
            self.embeddings[chunk.image] = embd
            while sum(x.nbytes for x in self.embeddings.values()) > EMBEDDINGS_BUDGET and len(self.embeddings) > 1:
                self.embeddings.popitem(last=False)
        start = self.pos(s)
        end = self.model.projector.decode(chunk, np.asarray(embd), start, self.seq_id)
        self.tokens.extend(prompt[s:e])
        self.runs.append((s, e - s, end - start))

    def prepare(self, prompt: list[int], spans: list[tuple[int, int]] = ()) -> tuple[int | None, int]:
        """Cut the sequence back to the longest part of prompt it can keep, leaving at least the
        last prompt token to evaluate (for its logits): by recurrent rollback within n_rs_seq
        tokens, else from the newest checkpoint at or before the divergence, else from nothing.
        Returns (checkpoint restored or None, tokens rolled back). Call inside ``changing()``."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        target = self._snap(self._snap(min(common, len(prompt) - 1), spans), self.runs)
        restored, rolled = None, 0
        if target < len(self.tokens):
            self._keep_only(target)
            n_back = len(self.tokens) - target
            if target > 0 and n_back <= self.model.n_rs_seq and self.model.seq_rm(self.seq_id, self.pos(target)):
                rolled = n_back
                self.tokens = self.tokens[:target]
                self._cut_runs(target)
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
        target = self._snap(min(common, len(prompt) - 1), self.runs)
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
        self.runs = []
        self._last_logits = logits.copy() if logits.size else None
        self.checkpoints = OrderedDict(sorted(checkpoints.items()))
        self.checkpoint_hidden = dict(checkpoint_hidden or {})

    def extend(self, tokens: list[int]) -> np.ndarray:
        """Evaluate tokens after the cached ones; the logits of every one [n, n_vocab]."""
        with self.changing():
            logits = self.model.eval_all(tokens, self.pos(len(self.tokens)), self.seq_id)
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
            if not self.model.seq_rm(self.seq_id, self.pos(n)):
                from .model import ModelError

                raise ModelError(
                    f"cannot undo {len(self.tokens) - n} tokens: the context keeps "
                    f"n_rs_seq={self.model.n_rs_seq} recurrent snapshots; load the model with a larger "
                    "n_rs_seq or draft fewer tokens"
                )
            del self.tokens[n:]
            self._cut_runs(n)
            for p in [p for p in self.checkpoints if p > n]:
                del self.checkpoints[p]
                self.checkpoint_hidden.pop(p, None)
        self._last_logits = last_logits

    def append(self, token: int) -> np.ndarray:
        """Evaluate one more token (generation); returns its logits."""
        with self.changing():
            self._last_logits = self.model._decode_seq([token], self.pos(len(self.tokens)), self.seq_id)
            self.tokens.append(token)
        return self._last_logits  # callers must not modify it (it is also the cache's copy)
