"""A chat cut short anywhere stays usable and exact.

Ctrl-C (KeyboardInterrupt) can land on any line of the bindings: in the middle of a prefill,
between a decode and the bookkeeping that records it, inside a rollback, a checkpoint restore or
an MTP draft. The tests raise it on every distinct line the bindings execute during a turn (a
line tracer; each line at its first, middle and last occurrence) and check, for each cut, that
the conversation is either as it was or holds the reply so far (finish_reason "interrupted", a
prefix of the uninterrupted reply), and that the next turn's logits equal a fresh full prefill
of the same tokens (the oracle: another context with nothing cached; F32 KV cache, max |delta|
<= 1e-4), with the MTP head still drafting in step and its reply the plain one.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen35.bindings.model import SamplingParams
from qwen35.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = str(Path(__import__("qwen35.bindings.chat", fromlist=["x"]).__file__).parent)
TOL = 1e-4
S = SamplingParams(temperature=0, max_tokens=10)
Q = ["What does json.dumps do?", "How do I read a file line by line?", "And in one line?"]


@pytest.fixture(scope="module")
def dense_f32(tmp_path_factory, lib_dir):
    """The trained demo checkpoint (its MTP head drafts at a real rate), F32."""
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("interrupt")
    return convert(ROOT / "examples" / "models" / "qwen35-dense-tiny", d / "dense-F32.gguf", file_type="F32").path


def _load(path, **kw):
    from qwen35.bindings.model import Model

    kw.setdefault("n_ctx", 1024)
    return Model.load(path, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, **kw)


class Cut:
    """A line tracer over the bindings. Without k it records the (file, line) of every line they
    execute; with k it raises KeyboardInterrupt on the k-th (CPython then turns tracing off) and
    notes where, for the failure message."""

    def __init__(self, k: int | None = None):
        self.k, self.lines, self.trace, self.where = k, 0, [], None

    def __enter__(self):
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename.startswith(BINDINGS) else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
            if self.k is None:
                self.trace.append(where)
            elif self.lines == self.k:
                self.where = where
                raise KeyboardInterrupt
        return self._line


def cut_points(trace: list[str]) -> list[int]:
    """Where to cut: every distinct line of the trace at its first, middle and last occurrence
    (a line in a loop is cut as the loop starts, mid-way and on its way out)."""
    at: dict[str, list[int]] = {}
    for k, where in enumerate(trace, 1):
        at.setdefault(where, []).append(k)
    return sorted({k for ks in at.values() for k in (ks[0], ks[len(ks) // 2], ks[-1])})


class Fresh:
    """The oracle: another context, with nothing cached, of the same model. Its answers are
    kept, since many cuts leave the same conversation behind."""

    def __init__(self, model):
        self.model, self._logits, self._replies = model, {}, {}

    def last_logits(self, prompt: list[int]) -> np.ndarray:
        if tuple(prompt) not in self._logits:
            self._logits[tuple(prompt)] = self.model.logits(prompt)[-1]
        return self._logits[tuple(prompt)]

    def reply(self, messages: list[dict]) -> list[int]:
        """The tokens of a plain (non-speculative) greedy reply to messages."""
        from qwen35.bindings.chat import Chat

        key = json.dumps(messages)
        if key not in self._replies:
            chat = Chat(self.model)
            chat.messages = list(messages)
            self._replies[key] = chat.send(None, S).tokens
        return self._replies[key]


def _new_chat(m, speculative):
    from qwen35.bindings.chat import Chat

    # checkpoints every 16 tokens: the prefill runs in several parts, each interruptible
    return Chat(m, checkpoint_every=16, speculative=speculative, draft_max=2 if speculative else 3)


def _check_exact_after(chat, fresh: Fresh, speculative: bool = False):
    """The next turn: its prompt's logits equal a fresh prefill's; then a full reply (with MTP,
    the head must still be in step, or it raises, and the reply equal the plain one)."""
    chat.messages.append({"role": "user", "content": Q[2]})
    prompt, marks, _, _ = chat._prompt(chat.messages, S.max_tokens)
    logits, _ = chat.cache.eval(prompt, marks=marks)
    diff = np.abs(logits - fresh.last_logits(prompt)).max()
    assert diff <= TOL, diff
    reply = chat.send(None, S)
    if speculative:
        assert reply.tokens == fresh.reply(chat.messages[:-1])


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_an_interruption_on_any_line_of_a_turn_leaves_an_exact_chat(dense_f32, speculative):
    kw = {"load_mtp": True} if speculative else {}
    with _load(dense_f32, **kw) as m, _load(dense_f32) as oracle:
        fresh = Fresh(oracle)
        # the uninterrupted second turn, and the lines of the bindings it runs
        chat = _new_chat(m, speculative)
        chat.send(Q[0], S)
        with Cut() as count:
            full = chat.send(Q[1], S)
        points = cut_points(count.trace)
        assert len(points) > 150, len(points)
        outcomes = {"as before": 0, "partial reply": 0}
        for k in points:
            chat = _new_chat(m, speculative)
            chat.send(Q[0], S)
            before, last = list(chat.messages), chat.last
            with pytest.raises(KeyboardInterrupt), Cut(k) as cut:
                chat.send(Q[1], S)
            at = f"cut at line {k} of the turn, {cut.where}"
            if chat.messages == before:
                assert chat.last is last, at
                outcomes["as before"] += 1
            else:
                assert chat.messages[:-1] == [*before, {"role": "user", "content": Q[1]}], at
                r = chat.last  # the reply so far, or all of it when the cut came after it was recorded
                assert r.tokens == full.tokens[: len(r.tokens)], at
                assert r.finish_reason == "interrupted" or (r.tokens, r.finish_reason) == (
                    full.tokens,
                    full.finish_reason,
                ), at
                assert chat.messages[-1]["role"] == "assistant", at
                outcomes["partial reply"] += 1
            try:
                _check_exact_after(chat, fresh, bool(speculative))
            except Exception as e:
                raise AssertionError(f"{at}: the next turn failed: {e}") from e
        # both outcomes were reached: cuts in the prefill and cuts during the reply
        print(len(count.trace), len(points), outcomes)
        assert min(outcomes.values()) >= 3, outcomes


def test_closing_the_stream_keeps_the_reply_so_far(dense_f32):
    """A consumer that stops iterating (break, an exception of its own) gets the same as Ctrl-C:
    the reply so far in the conversation, finish_reason "interrupted", and an exact next turn."""
    with _load(dense_f32) as m, _load(dense_f32) as oracle:
        chat = _new_chat(m, None)
        full = _new_chat(m, None).send(Q[0], S)
        chat = _new_chat(m, None)
        events = chat.stream(Q[0], S)
        for i, _ in enumerate(events):
            if i == 2:
                break
        events.close()
        r = chat.last
        assert r.finish_reason == "interrupted" and 0 < len(r.tokens) < len(full.tokens)
        assert r.tokens == full.tokens[: len(r.tokens)]
        assert [msg["role"] for msg in chat.messages] == ["user", "assistant"]
        _check_exact_after(chat, Fresh(oracle))


def test_an_interrupted_chat_saves_and_resumes_exactly(dense_f32, tmp_path):
    """save() after a cut writes the state that matches the tokens; load() resumes from it."""
    from qwen35.bindings.chat import Chat

    with _load(dense_f32) as m, _load(dense_f32) as oracle:
        chat = _new_chat(m, None)
        chat.send(Q[0], S)
        with Cut() as count:
            chat.send(Q[1], S)
        chat = _new_chat(m, None)
        chat.send(Q[0], S)
        with pytest.raises(KeyboardInterrupt), Cut(count.lines * 2 // 3):  # inside the reply
            chat.send(Q[1], S)
        chat.save(tmp_path / "cut.chat")
        resumed = Chat(m, checkpoint_every=16)
        resumed.load(tmp_path / "cut.chat")
        assert resumed.messages == chat.messages
        _check_exact_after(resumed, Fresh(oracle))


def test_a_message_that_does_not_fit_leaves_the_conversation_as_it_was(dense_f32):
    from qwen35.bindings.chat import Chat, ContextOverflow

    with _load(dense_f32, n_ctx=256) as m:
        chat = Chat(m)
        chat.send(Q[0], S)
        before = list(chat.messages)
        with pytest.raises(ContextOverflow, match="was not added") as e:
            chat.send("word " * 300, S)
        assert e.value.limit == 256 and e.value.tokens > 256 and e.value.max_tokens == S.max_tokens
        assert chat.messages == before
        assert chat.send(Q[1], S).usage.prompt_tokens < 120  # the next message is answered
        chat = Chat(m, overflow="drop_oldest")
        chat.send(Q[0], S)
        with pytest.raises(ContextOverflow, match="last exchange alone"):
            chat.send("word " * 300, S)
        assert [msg["content"] for msg in chat.messages if msg["role"] == "user"] == [Q[0]]


def test_ctrl_c_while_a_model_loads_stops_the_load_and_reaches_the_caller(dense_f32, capfd):
    """Python runs a SIGINT handler wherever the main thread next executes Python; during a model
    load that is mostly llama.cpp's log callback, where ctypes prints the KeyboardInterrupt as
    "Exception ignored" and drops it (the load, and the command, went on). Here a real SIGINT's
    handler runs inside the callback, on the load's first log line: the load must stop (llama.cpp
    logs "cancelled model load") and the KeyboardInterrupt reach the caller."""
    import logging
    import signal

    from qwen35.bindings.model import Model

    lines = []

    class CtrlC(logging.Filter):
        def filter(self, record):
            lines.append(record.getMessage())
            if len(lines) == 1:
                signal.raise_signal(signal.SIGINT)  # Python's handler runs now, inside the callback
            return False

    log = logging.getLogger("qwen35.llama_cpp")
    level, ctrl_c = log.level, CtrlC()
    log.setLevel(logging.DEBUG)
    log.addFilter(ctrl_c)
    # Python's own handler, as in a terminal: a process started in the background by a
    # non-interactive shell (`cmd &`, as CI runners may) inherits SIGINT ignored, and keeps it so
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            Model.load(dense_f32, n_ctx=256, n_threads=usable_cpus()).close()
        assert any("cancelled model load" in line for line in lines), lines[-5:]
        with Model.load(dense_f32, n_ctx=256, n_threads=usable_cpus()) as m:  # nothing left pending
            assert m.tokenize("Hello")
    finally:
        signal.signal(signal.SIGINT, handler)
        log.removeFilter(ctrl_c)
        log.setLevel(level)
    assert "Exception ignored" not in capfd.readouterr().err
