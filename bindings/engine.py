"""Many conversations on one model at once: slots, continuous batching, prompt reuse per slot.

The engine owns a loaded :class:`~qwen35.bindings.model.Model` with ``n_seq_max`` sequences
(slots). Each slot has a :class:`~qwen35.bindings.session.PromptCache`, so a request that
continues a conversation the slot holds evaluates only what is new, restoring a recurrent-state
checkpoint where the rendered history diverges (as :class:`~qwen35.bindings.chat.Chat` does).

One thread runs the model. Each step is one ``llama_decode`` over every active slot: the next
token of each slot that is generating, and pieces of the prompts still being evaluated, up to the
batch size, so a long prompt is evaluated in chunks between decode steps and the other streams
keep flowing. A prompt's chunks end at its checkpoint positions (assistant-turn starts, every
``checkpoint_every`` tokens), where the slot's checkpoint is taken once the chunk is in.

A request goes to the idle slot whose cache can keep the most of its prompt. When a slot is
given to a different conversation, what it held is kept in a host-RAM cache of sequence states
(``cache_ram`` bytes, least recently used out first) and, with ``cache_dir``, on disk, where it
survives a restart; a later request that continues it is restored from there instead of being
evaluated again.

Requests are :class:`Job` objects; the engine reports through ``job.emit`` (called on the engine
thread) a stream of :class:`~qwen35.bindings.chat.ReasoningDelta`,
:class:`~qwen35.bindings.chat.ContentDelta`, :class:`~qwen35.bindings.toolcalls.ToolCall`,
:class:`~qwen35.bindings.toolcalls.MalformedToolCall`, :class:`TokenInfo` (with logprobs) events,
then one :class:`Finished` or :class:`Failed`. ``job.cancel()`` ends a request at the next step;
the slot's cache stays consistent (it holds what was evaluated).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .chat import _ReplyText
from .model import ModelError
from .sampling import SamplingParams
from .session import PromptCache
from .toolcalls import ToolCallParser

STATE_FORMAT = "qwen35-server-state-2"  # --cache-dir files (bindings/statefile.py: sealed with a checksum)

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger("qwen35.engine")


class QueueFull(RuntimeError):
    """The engine's queue is full; try again later."""


@dataclass(frozen=True)
class TokenInfo:
    """One sampled token, with its log-probability and the most likely alternatives (when asked)."""

    token: int
    text: bytes
    logprob: float | None = None
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # stop | length | tool_calls | cancelled
    message: dict  # the assistant message (content, reasoning_content, tool_calls)
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int  # reused without evaluation
    evaluated_tokens: int
    completion_tokens: int
    queued_ms: float
    first_token_ms: float  # from submission to the first sampled token
    decode_ms: float
    restored_from: str | None = None  # "slot", "ram", "disk", "checkpoint", "rollback" or None


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass
class Job:
    """One request. prompt: its tokens; marks: where to take checkpoints (assistant-turn starts).

    parse: split reasoning (thinking) and tool calls from the text (chat); False: plain text.
    logprobs: None, or how many alternatives to report per token (0..20)."""

    prompt: list[int]
    params: SamplingParams  # resolved: every field set
    emit: Callable[[object], None]
    marks: list[int] = field(default_factory=list)
    grammar: str | None = None
    parse: bool = True
    thinking: bool = False
    tools: list[dict] | None = None
    calls_allowed: bool = True
    logprobs: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Active:
    """A job on a slot: where its prompt evaluation is, its sampler and its text."""

    def __init__(self, engine: Engine, job: Job, restored_from: str | None):
        self.job, self.restored_from = job, restored_from
        self.sampler = engine.model.sampler(job.params, grammar=job.grammar)
        parser = ToolCallParser(job.tools) if job.parse and job.calls_allowed and job.tools else None
        self.text = _ReplyText(engine.model, parser, job.thinking and job.parse, job.params.stop)
        self.parse = job.parse
        self.todo: list[int] = []  # prompt tokens still to evaluate
        self.stops: list[int] = []  # checkpoint positions ahead
        self.pending: int | None = None  # sampled, not yet evaluated
        self.cached = 0
        self.evaluated = 0
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
        self.raw: list[str] = []  # plain-text jobs: the decoded text


@dataclass
class _Saved:
    """A conversation's sequence state kept off its slot."""

    tokens: list[int]
    state: bytes | None  # the whole sequence (None: only on disk so far)
    checkpoints: dict[int, bytes]
    used: float
    path: Path | None = None
    positions: tuple[int, ...] = ()  # of the checkpoints (known without reading them from disk)

    def reusable(self, prompt: list[int]) -> int:
        """How many of prompt's tokens restoring this state keeps (as PromptCache.reusable)."""
        target = min(_common(self.tokens, prompt), len(prompt) - 1)
        if target >= len(self.tokens):
            return target
        return max((p for p in self.positions if p <= target), default=0)

    @property
    def nbytes(self) -> int:
        return (len(self.state) if self.state else 0) + sum(len(b) for b in self.checkpoints.values())


class Engine:
    """Continuous batching over the model's sequences; see the module docstring.

    n_batch: most tokens per decode step. max_queue: requests waiting beyond the busy slots
    before ``submit`` raises QueueFull. cache_ram: bytes of host RAM for states of conversations
    that lost their slot; cache_dir: also keep them there (survives a restart)."""

    def __init__(
        self,
        model: Model,
        *,
        n_batch: int = 512,
        max_queue: int = 64,
        checkpoint_every: int = 1024,
        checkpoint_budget: int = 256 << 20,
        cache_ram: int = 1 << 30,
        cache_dir: Path | None = None,
        on_step: Callable[[Engine], None] | None = None,
    ):
        import llama_cpp

        self.model, self.n_batch, self.max_queue = model, n_batch, max_queue
        self.n_slots = int(llama_cpp.llama_n_seq_max(model._ctx))
        if model.mtp is not None:
            raise ModelError("the batching engine decodes without the MTP head; load the model with load_mtp=False")
        self.caches = [
            PromptCache(model, i, checkpoint_every=checkpoint_every, budget_bytes=checkpoint_budget)
            for i in range(self.n_slots)
        ]
        self.active: list[_Active | None] = [None] * self.n_slots
        self.used = [0.0] * self.n_slots
        self.queue: deque[Job] = deque()
        self.cache_ram, self.cache_dir = cache_ram, cache_dir
        self.saved: OrderedDict[str, _Saved] = OrderedDict()  # the engine thread's alone (see _publish_memory)
        self._memory = (0, 0)  # (checkpoint bytes, saved-state bytes) as last published
        self.on_step = on_step
        self.counters = {
            "reused": 0,
            "evaluated": 0,
            "restored_ram": 0,
            "restored_disk": 0,
            "steps": 0,
            "shared_steps": 0,
        }
        self._cv = threading.Condition()
        self._stop = False
        self._assigning = 0  # taken from the queue, not yet on a slot
        self._thread: threading.Thread | None = None
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model._vocab))
        if cache_dir is not None:
            self._index_disk()

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qwen35-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish: queued and running jobs are cancelled; with cache_dir, the slots' conversations
        are written there."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for slot in range(self.n_slots):
            self._keep(slot)
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            free = self.n_slots - self.busy - self._assigning
            if len(self.queue) >= self.max_queue + free:
                raise QueueFull(f"all {self.n_slots} slots are busy and {len(self.queue) - free} requests are waiting")
            self.queue.append(job)
            self._cv.notify_all()

    @property
    def busy(self) -> int:
        return sum(a is not None for a in self.active)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of recurrent-state checkpoints the slots hold (any thread may read it)."""
        return self._memory[0]

    @property
    def saved_bytes(self) -> int:
        """Bytes of conversation states kept in RAM (any thread may read it)."""
        return self._memory[1]

    def _publish_memory(self) -> None:
        """The engine thread sums its dictionaries and publishes the totals as one tuple: a reader
        on another thread (the metrics) never iterates them while they change."""
        self._memory = (sum(c.checkpoint_bytes for c in self.caches), self._saved_now())

    def _saved_now(self) -> int:
        return sum(s.nbytes for s in self.saved.values())

    # ---------------------------------------------------------------- the loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.queue and self.busy == 0:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._admit()
                if self.busy:
                    self._step()
            except Exception as e:
                log.exception("engine step failed")
                for slot, a in enumerate(self.active):
                    if a is not None:
                        self._fail(slot, f"the model failed: {e}")
            self._publish_memory()
            if self.on_step is not None:
                self.on_step(self)
        with self._cv:
            jobs, self.queue = list(self.queue), deque()
        for job in jobs:
            job.emit(Failed("the server is shutting down"))
        for slot, a in enumerate(self.active):
            if a is not None:
                self._finish(slot, "cancelled")

    def _admit(self) -> None:
        while True:
            with self._cv:
                free = [i for i, a in enumerate(self.active) if a is None]
                if not free or not self.queue:
                    return
                job = self.queue.popleft()
                self._assigning += 1
            try:
                if job.cancelled:
                    job.emit(Failed("cancelled"))
                    continue
                self._assign(job, free)
            except Exception as e:  # this request fails; the others go on
                log.exception("could not start a request")
                for slot in free:
                    if self.active[slot] is None and self.caches[slot]._unsure is not None:
                        self.caches[slot].sync()
                job.emit(Failed(f"could not start the request: {e}"))
            finally:
                with self._cv:
                    self._assigning -= 1

    def _assign(self, job: Job, free: list[int]) -> None:
        prompt = job.prompt
        # the slot that keeps the most of the prompt; ties: the least recently used
        slot = max(free, key=lambda i: (self.caches[i].reusable(prompt), -self.used[i]))
        best = self.caches[slot].reusable(prompt)
        restored_from = "slot" if best else None
        key, entry = self._best_saved(prompt)
        if entry is not None and entry.reusable(prompt) > best:
            slot = min(free, key=lambda i: self.used[i])
            source = "disk" if entry.state is None else "ram"
            state, checkpoints = entry.state, entry.checkpoints  # keeping the slot's own may evict them
            self._keep(slot)
            if self._load_saved(slot, key, entry, state, checkpoints):
                restored_from = source
        else:
            cache = self.caches[slot]
            newest = max(cache.checkpoints, default=0)
            if cache.tokens and best < min(newest, len(cache.tokens)):
                # another conversation takes the slot (it goes back past the newest checkpoint,
                # which a continuation never does): keep a copy of what the slot held first
                self._keep(slot)
        cache = self.caches[slot]
        try:
            a = _Active(self, job, restored_from)
        except Exception as e:
            job.emit(Failed(str(e)))
            return
        with cache.changing():
            restored, rolled = cache.prepare(prompt)
        if restored is not None and a.restored_from == "slot":
            a.restored_from = "checkpoint"
        elif rolled and a.restored_from == "slot":
            a.restored_from = "rollback"
        a.cached = len(cache.tokens)
        a.todo = prompt[len(cache.tokens) :]
        a.stops = cache.checkpoint_stops(prompt, job.marks)
        a.evaluated = len(a.todo)
        self.counters["reused"] += a.cached
        self.counters["evaluated"] += a.evaluated
        self.active[slot] = a
        self.used[slot] = time.monotonic()

    def _step(self) -> None:
        import llama_cpp

        b, n = self._batch, 0
        plan: list[tuple[int, str, int, int]] = []  # (slot, kind, start index in batch, count)
        # generating slots first: one token each
        for slot, a in enumerate(self.active):
            if a is None or a.pending is None:
                continue
            if a.job.cancelled:
                self._finish(slot, "cancelled")
                continue
            self._put(b, n, a.pending, len(self.caches[slot].tokens), slot, True)
            plan.append((slot, "gen", n, 1))
            n += 1
        # then prompt pieces, oldest request first, up to the batch size
        prefilling = sorted(
            (slot for slot, a in enumerate(self.active) if a is not None and a.pending is None and a.todo),
            key=lambda s: self.active[s].job.submitted,
        )
        for slot in prefilling:
            a = self.active[slot]
            if a.job.cancelled:
                self._finish(slot, "cancelled")
                continue
            room = self.n_batch - n
            if room <= 0:
                break
            pos = len(self.caches[slot].tokens)
            upto = a.stops[0] if a.stops else pos + len(a.todo)
            k = min(room, upto - pos, len(a.todo))
            last = k == len(a.todo)
            for j in range(k):
                self._put(b, n + j, a.todo[j], pos + j, slot, last and j == k - 1)
            plan.append((slot, "prompt", n, k))
            n += k
        if n == 0:
            return
        b.n_tokens = n
        for slot, _, _, _ in plan:  # should the decode fail, each cache restores what it can
            cache = self.caches[slot]
            cache._unsure = len(cache.tokens)
        rc = llama_cpp.llama_decode(self.model._ctx, b)
        self.counters["steps"] += 1
        self.counters["shared_steps"] += len(plan) > 1  # one decode for several conversations
        if rc != 0:
            for slot, _, _, _ in plan:
                self.caches[slot].sync()
                self._fail(slot, f"llama_decode failed ({rc}); the context may be full")
            return
        for slot, kind, at, k in plan:
            a, cache = self.active[slot], self.caches[slot]
            if kind == "gen":
                cache.tokens.append(a.pending)
                cache._unsure = None
                self._sampled(slot, at)
                continue
            cache.tokens.extend(a.todo[:k])
            cache._unsure = None
            del a.todo[:k]
            if a.stops and len(cache.tokens) == a.stops[0]:
                a.stops.pop(0)
                cache._save_checkpoint()
            if not a.todo:
                self._sampled(slot, at + k - 1)

    @staticmethod
    def _put(b, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits

    def _sampled(self, slot: int, idx: int) -> None:
        """Draw the slot's next token from batch output idx and act on it."""
        a = self.active[slot]
        ctx = self.model._ctx
        tok = a.sampler.sample(ctx, idx)
        a.t_first = a.t_first or time.perf_counter()
        job = a.job
        if job.logprobs is not None:
            job.emit(self._token_info(tok, idx, job.logprobs))
        if self.model.is_eog(tok):
            self._finish(slot, "stop")
            return
        n = len(a.text.tokens) + 1
        if a.parse:
            for ev in a.text.feed(tok):
                job.emit(ev)
        else:
            a.text.tokens.append(tok)
            piece = a.text.stop.feed(a.text.decoder.decode(self.model.piece(tok)))
            if piece:
                a.raw.append(piece)
                job.emit(piece)
        if a.text.stopped:
            self._finish(slot, "stop")
        elif n >= job.params.max_tokens or len(self.caches[slot].tokens) + 1 >= self.model.n_ctx_seq:
            self._finish(slot, "length")
        elif job.cancelled:
            self._finish(slot, "cancelled")
        else:
            a.pending = tok

    def _token_info(self, tok: int, idx: int, top: int) -> TokenInfo:
        import llama_cpp
        import numpy as np

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.model._ctx, idx), shape=(self._n_vocab,))
        m = float(row.max())
        lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
        alts: tuple = ()
        if top:
            ids = np.argpartition(row, -top)[-top:]
            ids = ids[np.argsort(-row[ids])]
            alts = tuple((int(t), self.model.piece(int(t)), float(row[t]) - lse) for t in ids)
        return TokenInfo(tok, self.model.piece(tok), float(row[tok]) - lse, alts)

    def _finish(self, slot: int, reason: str) -> None:
        a = self.active[slot]
        self.active[slot] = None
        self.used[slot] = time.monotonic()
        a.sampler.close()
        job, t = a.job, time.perf_counter()
        if a.parse:
            rest, msg = a.text.finish()
            for ev in rest:
                job.emit(ev)
            if a.text.calls and reason == "stop":
                reason = "tool_calls"
        else:
            tail = a.text.stop.feed(a.text.decoder.decode(b"", final=True)) + a.text.stop.finish()
            if tail:
                a.raw.append(tail)
                job.emit(tail)
            msg = {"role": "assistant", "content": "".join(a.raw)}
        first = (a.t_first or t) - job.submitted
        job.emit(
            Finished(
                reason,
                msg,
                list(a.text.tokens),
                len(job.prompt),
                a.cached,
                a.evaluated,
                len(a.text.tokens),
                (a.t_start - job.submitted) * 1e3,
                first * 1e3,
                (t - (a.t_first or t)) * 1e3,
                a.restored_from,
            )
        )

    def _fail(self, slot: int, why: str) -> None:
        a = self.active[slot]
        self.active[slot] = None
        if a is not None:
            a.sampler.close()
            a.job.emit(Failed(why))

    # ---------------------------------------------------------------- saved conversations
    def _best_saved(self, prompt: list[int]) -> tuple[str | None, _Saved | None]:
        best, key, most = None, None, 0
        for k, s in self.saved.items():
            n = s.reusable(prompt)
            if n > most:
                best, key, most = s, k, n
        return key, best

    def _keep(self, slot: int) -> None:
        """Keep the conversation the slot holds (its whole sequence state and checkpoints) in the
        RAM cache and, with cache_dir, on disk; called before the slot is given to another
        conversation, and for every slot when the engine stops."""
        cache = self.caches[slot]
        if not cache.tokens or self.active[slot] is not None or cache._unsure is not None:
            return
        key = _key(cache.tokens)
        if key in self.saved and self.saved[key].state is not None:
            self.saved[key].used = time.monotonic()
            self.saved.move_to_end(key)
            return
        cps = dict(cache.checkpoints)
        entry = _Saved(list(cache.tokens), self.model.seq_state(slot), cps, time.monotonic(), None, tuple(sorted(cps)))
        if self.cache_dir is not None:
            entry.path = self._write(key, entry)
        self.saved[key] = entry
        self.saved.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self._saved_now() > self.cache_ram:
            newest = next(reversed(self.saved), None)
            for k, s in self.saved.items():  # least recently used first; the newest stays
                if s.state is not None and k != newest:
                    if s.path is not None:  # still on disk
                        s.state, s.checkpoints = None, {}
                    else:
                        del self.saved[k]
                    break
            else:
                return

    def _load_saved(self, slot: int, key: str, entry: _Saved, state: bytes | None, checkpoints: dict) -> bool:
        cache = self.caches[slot]
        try:
            if state is None:
                if entry.path is None:
                    return False
                state, checkpoints = self._read(entry.path)
                self.counters["restored_disk"] += 1
            else:
                self.counters["restored_ram"] += 1
            with cache.changing(0):
                self.model.seq_rm(slot, 0)
                self.model.set_seq_state(slot, state)
                import numpy as np

                cache.adopt(entry.tokens, np.zeros(0, np.float32), checkpoints)
        except (ModelError, OSError, ValueError) as e:
            log.warning("could not restore a saved conversation (%s); evaluating it again", e)
            cache.reset()
            return False
        entry.used = time.monotonic()
        if key in self.saved:
            self.saved.move_to_end(key)
        return True

    # ---------------------------------------------------------------- disk
    def _identity(self) -> str:
        return self.model.identity()

    def _write(self, key: str, entry: _Saved) -> Path | None:
        import numpy as np

        from . import statefile

        assert self.cache_dir is not None
        path = self.cache_dir / f"{key}.qwen35-state"
        if path.exists():
            return path
        tensors = {
            "tokens": np.asarray(entry.tokens, np.int32),
            "state": np.frombuffer(entry.state or b"", np.uint8),
        }
        for p, data in entry.checkpoints.items():
            tensors[f"checkpoint.{p}"] = np.frombuffer(data, np.uint8)
        meta = {"model": self._identity(), "format": STATE_FORMAT}
        try:
            statefile.write(path, tensors, meta, fsync=False)
        except OSError as e:
            log.warning("could not write %s: %s", path, e)
            return None
        return path

    def _read(self, path: Path) -> tuple[bytes, dict[int, bytes]]:
        """The state and checkpoints of a conversation kept on disk, checked against the file's
        checksum and the tokens it was indexed with (ModelError when anything differs)."""
        import numpy as np

        from . import statefile

        tensors, meta = statefile.read(path, (STATE_FORMAT,), "a server state file")
        if meta.get("model") != self._identity():
            raise ModelError(f"{path.name} was saved with another model")
        tokens = statefile.tensor(tensors, "tokens", np.int32, path)
        entry = self.saved.get(path.name.split(".")[0])
        if entry is not None and tokens.tolist() != entry.tokens:
            raise ModelError(f"{path.name} changed on disk since it was indexed")
        state = statefile.tensor(tensors, "state", np.uint8, path)
        cps = statefile.positions(tensors, "checkpoint.", int(tokens.size), path)
        return state.tobytes(), {p: t.tobytes() for p, t in cps.items()}

    def _index_disk(self) -> None:
        """Learn the token lists of the conversations kept in cache_dir (their states are read
        when one is needed)."""
        from safetensors import SafetensorError, safe_open

        assert self.cache_dir is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.cache_dir.glob("*.qwen35-state"), key=lambda p: p.stat().st_mtime):
            try:
                with safe_open(str(path), "numpy") as f:
                    meta = f.metadata() or {}
                    if meta.get("model") != self._identity() or meta.get("format") != STATE_FORMAT:
                        continue
                    tokens = f.get_tensor("tokens").tolist()
                    positions = tuple(sorted(int(k.split(".", 1)[1]) for k in f.keys() if k.startswith("checkpoint.")))  # noqa: SIM118
            except (SafetensorError, OSError, ValueError) as e:
                log.warning("skipping %s: %s", path, e)
                continue
            if tokens and all(0 <= t < self._n_vocab for t in tokens):
                self.saved[path.name.split(".")[0]] = _Saved(tokens, None, {}, path.stat().st_mtime, path, positions)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _key(tokens: list[int]) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(tokens, np.int32).tobytes()).hexdigest()[:32]
