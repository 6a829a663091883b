"""Chat sessions: multi-turn reuse gives the same greedy replies as fresh full prefills, saved
sessions resume without re-evaluation, replies stream as reasoning / content / tool-call events."""

import numpy as np
import pytest

from qwen35.bindings.model import ModelError, SamplingParams
from qwen35.cpus import usable_cpus

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def gguf_f32(tiny_f32_gguf):
    return tiny_f32_gguf


def _load(path, **kw):
    from qwen35.bindings.model import Model

    kw.setdefault("n_ctx", 1024)
    return Model.load(path, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, **kw)


TURNS = ["Hello there, who are you?", "Tell me about the sea.", "And the mountains?"]


def test_turns_reuse_history_and_reply_as_a_fresh_prefill_would(gguf_f32):
    from qwen35.bindings.chat import Chat

    with _load(gguf_f32) as m:
        chat = Chat(m, system="You are terse.")
        replies = []
        for t in TURNS:
            replies.append(chat.send(t, GREEDY))
            prompt = m.tokenize(m.render(chat.messages[:-1]))
            starts = [i for i in range(len(prompt)) if prompt[i : i + 2] == chat._assistant_start]
            if len(replies) > 1:
                # everything before the previous answer is reused (restored from the checkpoint at
                # its start); its re-rendering without the thinking and the new message are evaluated
                r = replies[-1]
                assert r.usage.restored_from == r.usage.reused_tokens == starts[-2], (r.usage, starts)
                assert r.usage.evaluated_tokens == len(prompt) - starts[-2]
        history = list(chat.messages)
    # the oracle: each turn's reply from a fresh context holding only that turn's prompt
    with _load(gguf_f32) as m:
        for i, r in enumerate(replies):
            fresh = Chat(m, system="You are terse.")
            fresh.messages = history[: 2 + 2 * i]  # system + user/assistant pairs up to this user turn
            got = fresh.send(None, GREEDY)
            assert got.usage.reused_tokens == 0
            assert got.tokens == r.tokens, i


def test_saved_chat_resumes_without_reprocessing(gguf_f32, tmp_path):
    from qwen35.bindings.chat import Chat

    with _load(gguf_f32) as m:
        chat = Chat(m)
        for t in TURNS[:2]:
            chat.send(t, GREEDY)
        chat.save(tmp_path / "s.chat")
        expected = chat.send(TURNS[2], GREEDY)
    with _load(gguf_f32) as m:
        chat = Chat(m)
        chat.load(tmp_path / "s.chat")
        # the restored state, not a re-evaluation: the next prompt's logits, evaluating only what is
        # new on top of it, equal a fresh prefill of the whole prompt
        asked = [*chat.messages, {"role": "user", "content": TURNS[2]}]
        prompt = m.tokenize(m.render(asked))
        resumed, u = chat.cache.eval(prompt)
        assert 0 < u.evaluated_tokens < len(prompt) // 2
        resumed = resumed.copy()
        fresh = m.logits(prompt)[-1]
        assert np.abs(resumed - fresh).max() <= 1e-4 * max(np.abs(fresh).max(), 1)
        chat = Chat(m)
        chat.load(tmp_path / "s.chat")
        got = chat.send(TURNS[2], GREEDY)
    assert got.tokens == expected.tokens
    assert got.usage.reused_tokens == expected.usage.reused_tokens > 0
    assert not list(tmp_path.glob("*.partial"))


def test_a_saved_chat_refuses_another_model(gguf_f32, tmp_path):
    from qwen35.bindings.chat import Chat

    with _load(gguf_f32) as m:
        chat = Chat(m)
        chat.send(TURNS[0], GREEDY)
        chat.save(tmp_path / "s.chat")
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf_f32.read_bytes() + b"\0" * 32)
    with _load(other) as m, pytest.raises(ModelError, match="another model"):
        Chat(m).load(tmp_path / "s.chat")
    (tmp_path / "junk.chat").write_bytes(b"not a chat")
    with _load(gguf_f32) as m, pytest.raises(ModelError, match="not a saved chat"):
        Chat(m).load(tmp_path / "junk.chat")


def _reseal(src, dst, edit):
    """A copy of the saved chat src with edit(tensors, meta) applied and a matching checksum: what
    a hand-edited file looks like (the field checks behind the checksum are what is tested)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from qwen35.bindings import statefile

    with safe_open(str(src), "numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    edit(tensors, meta)
    meta["sha256"] = statefile.checksum(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_damaged_saved_chat_is_refused_in_one_line_and_changes_nothing(gguf_f32, tmp_path):
    from qwen35.bindings.chat import Chat

    with _load(gguf_f32) as m:
        chat = Chat(m)
        chat.send(TURNS[0], GREEDY)
        good = tmp_path / "s.chat"
        chat.save(good)
        data = good.read_bytes()

        flipped = tmp_path / "flipped.chat"
        flipped.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])  # inside the last tensor
        truncated = tmp_path / "truncated.chat"
        truncated.write_bytes(data[: len(data) // 2])
        n_vocab = m.n_vocab

        def bad_token(t, meta):
            t["tokens"] = t["tokens"].copy()
            t["tokens"][3] = n_vocab

        def bad_logits(t, meta):
            t["logits"] = t["logits"][:-1].copy()

        def bad_messages(t, meta):
            meta["messages"] = '[{"role": "user", "content": "hi"'

        def bad_checkpoint(t, meta):
            t[f"checkpoint.{len(t['tokens']) + 5}"] = np.zeros(4, np.uint8)

        def old_format_bad_thinking(t, meta):
            meta["format"], meta["enable_thinking"] = "qwen35-chat-1", '"yes"'

        cases = {
            flipped: "checksum does not match",
            truncated: "is not a saved chat or is damaged",
            _reseal(good, tmp_path / "token.chat", bad_token): "outside the model's vocabulary",
            _reseal(good, tmp_path / "logits.chat", bad_logits): "logits do not fit",
            _reseal(good, tmp_path / "messages.chat", bad_messages): "conversation metadata does not read",
            _reseal(good, tmp_path / "checkpoint.chat", bad_checkpoint): "not a position within",
            _reseal(good, tmp_path / "old.chat", old_format_bad_thinking): "enable_thinking",
        }
        other = Chat(m, system="Be brief.")
        other.send(TURNS[1], GREEDY)
        before = (list(other.messages), list(other.cache.tokens))
        for path, expect in cases.items():
            with pytest.raises(ModelError) as e:
                other.load(path)
            msg = str(e.value)
            assert expect in msg and str(path) in msg and "\n" not in msg, (path.name, msg)
            assert (list(other.messages), list(other.cache.tokens)) == before, path.name
        # and the conversation goes on exactly as one never offered a damaged file
        got = other.send(TURNS[2], GREEDY)
        fresh = Chat(m, system="Be brief.")
        fresh.send(TURNS[1], GREEDY)
        assert got.tokens == fresh.send(TURNS[2], GREEDY).tokens
        # the intact file still loads
        other.load(good)
        assert other.messages == chat.messages


def test_stream_splits_reasoning_content_and_tool_calls(gguf_f32, monkeypatch):
    """A scripted reply (real tokens of the real vocabulary, fed through the real decode path)."""
    from qwen35.bindings import chat as chat_mod
    from qwen35.bindings.chat import Chat, ContentDelta, ReasoningDelta
    from qwen35.bindings.toolcalls import ToolCall

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                },
            },
        }
    ]
    with _load(gguf_f32) as m:
        script = m.tokenize(
            "The user wants weather. Ünïcode ✓.\n</think>\n\nChecking.\n<tool_call>\n"
            "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
            "</parameter>\n</function>\n</tool_call>",
            special=True,
        )
        script += m.tokenize("<|im_end|>", special=True)
        it = iter(script)
        monkeypatch.setattr(chat_mod.Sampler, "sample", lambda self, ctx, idx=-1: next(it))
        monkeypatch.setattr(chat_mod.Sampler, "sample_logits", lambda self, logits: next(it))
        chat = Chat(m, tools=tools)
        events = list(chat.stream("Weather in Paris for 3 days?", SamplingParams(temperature=0, max_tokens=200)))
        r = chat.last
        assert (
            "".join(e.text for e in events if isinstance(e, ReasoningDelta)).strip()
            == "The user wants weather. Ünïcode ✓."
        )
        assert "".join(e.text for e in events if isinstance(e, ContentDelta)).strip() == "Checking."
        assert [e for e in events if isinstance(e, ToolCall)] == [ToolCall("get_weather", {"city": "Paris", "days": 3})]
        assert r.finish_reason == "tool_calls" and r.content == "Checking."
        assert chat.messages[-1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 3}
        # the tool result goes back as a tool message and the next turn renders and reuses the history
        chat.add_tool_result({"temp_c": 21}, name="get_weather")
        monkeypatch.undo()
        nxt = chat.send(None, SamplingParams(temperature=0, max_tokens=4))
        assert "<tool_response>" in m.render(chat.messages[:-1], tools=tools)
        assert nxt.usage.reused_tokens > 0


def test_context_overflow_is_an_error_or_the_chosen_policy(gguf_f32):
    from qwen35.bindings.chat import Chat

    long = "word " * 200
    with _load(gguf_f32, n_ctx=512) as m:
        chat = Chat(m)
        chat.send(long, SamplingParams(temperature=0, max_tokens=8))
        chat.send(long, SamplingParams(temperature=0, max_tokens=8))
        with pytest.raises(ModelError, match="larger n_ctx"):
            chat.send(long, SamplingParams(temperature=0, max_tokens=8))
        chat = Chat(m, overflow="drop_oldest")
        for _ in range(4):
            r = chat.send(long, SamplingParams(temperature=0, max_tokens=8))
        assert r.usage.prompt_tokens + 8 <= 512
        assert sum(msg["role"] == "user" for msg in chat.messages) < 4
