"""`qwen35 serve`, driven over loopback the way clients drive it: the official `openai` client for
what works, raw httpx for the errors.

The oracle for every reply is the same GGUF run in this process through the bindings' own `Chat`
(greedy), which the rest of the suite checks against transformers: the server must give the same
tokens, whether it runs one conversation or several at once, streamed or not, before and after a
restart from its disk cache.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QWEN35 = str(Path(sys.executable).parent / "qwen35")
NAME = "dense"
GREEDY = {"temperature": 0}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
QUESTIONS = ["What does json.dumps do?", "How do I read a file line by line?", "What is a list comprehension?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qwen35 serve` in a subprocess on a free loopback port."""

    def __init__(self, gguf: Path, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [QWEN35, "serve", str(gguf), "--port", str(self.port), "--alias", NAME, "--ctx", "1024", *args]
        self.log = b""
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("the server did not answer /health in 60 s")

    def _read(self):
        for line in self.proc.stdout:
            self.log += line

    def client(self, key: str = "unused"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what a service manager sends
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, lib_dir):
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("serve")
    return convert(ROOT / "examples" / "models" / "qwen35-dense-tiny", d / "dense-Q8_0.gguf", file_type="Q8_0").path


@pytest.fixture(scope="module")
def server(gguf):
    s = Server(gguf, "--parallel", "3")
    yield s
    assert s.stop() == 0, s.log.decode()[-2000:]


@pytest.fixture(scope="module")
def oracle(gguf):
    """Greedy replies of the bindings' own Chat on the same file, remembered by conversation."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import Model, SamplingParams

    model = Model.load(gguf, n_ctx=1024)
    memo: dict[str, object] = {}

    def reply(messages: list[dict], *, thinking=False, max_tokens=48, **kw):
        key = json.dumps([messages, thinking, max_tokens, kw], sort_keys=True, default=str)
        if key not in memo:
            chat = Chat(model, enable_thinking=thinking, tools=kw.pop("tools", None))
            chat.messages = [dict(m) for m in messages[:-1]]
            memo[key] = chat.send(messages[-1]["content"], SamplingParams(temperature=0, max_tokens=max_tokens), **kw)
        return memo[key]

    yield reply
    model.close()


def _no_end(gguf) -> dict[str, float]:
    """A logit bias that bans every end-of-generation token: a reply that runs to max_tokens."""
    from qwen35.bindings.model import Model

    with Model.load(gguf, n_ctx=64) as m:
        import llama_cpp

        n = llama_cpp.llama_vocab_n_tokens(m._vocab)
        return {str(t): -100 for t in range(n) if m.is_eog(t)}


def _metric(server, name: str) -> float:
    import httpx

    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def _ask(client, messages, *, thinking=False, max_tokens=48, **kw):
    extra = {} if thinking else dict(NO_THINK)
    return client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=max_tokens, extra_body=extra, **GREEDY, **kw
    )


def test_chat_reply_and_reuse_match_the_bindings(server, oracle):
    c = server.client()
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    r1 = _ask(c, msgs)
    want = oracle(msgs)
    assert r1.choices[0].message.content == want.content
    assert r1.choices[0].finish_reason == want.finish_reason
    assert r1.usage.prompt_tokens == want.usage.prompt_tokens
    assert r1.usage.completion_tokens == want.usage.completion_tokens
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    r2 = _ask(c, msgs)
    assert r2.choices[0].message.content == oracle(msgs).content
    # the second turn reused the first from the slot's cache: the checkpoint at the assistant turn
    assert 0 < r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens


def test_streamed_reasoning_and_content_equal_the_whole_reply(server, oracle):
    c = server.client()
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    stream = c.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=64, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    reasoning, content, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            reasoning.append(getattr(ch.delta, "reasoning_content", None) or "")
            content.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    want = oracle(msgs, thinking=True, max_tokens=64)
    assert "".join(reasoning).strip() == want.reasoning and "".join(content).strip() == want.content
    assert want.reasoning  # thinking was on: there was reasoning to stream
    assert finish == want.finish_reason and usage.completion_tokens == want.usage.completion_tokens


def test_a_tool_call_round_trip_with_streamed_arguments(server):
    c = server.client()
    msgs = [{"role": "user", "content": "What is the weather in Oslo for 3 days?"}]
    stream = c.chat.completions.create(
        model=NAME,
        messages=msgs,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        stream=True,
        extra_body=NO_THINK,
        **GREEDY,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or []:
                e = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                e["id"] = tc.id or e["id"]
                e["name"] += (tc.function.name or "") if tc.function else ""
                e["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    args = json.loads(call["arguments"])
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert args["city"] in ("Paris", "Oslo", "Rome") and type(args["days"]) is int
    msgs += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp_c": 21})},
    ]
    r = c.chat.completions.create(
        model=NAME, messages=msgs, tools=[WEATHER], max_tokens=32, extra_body=NO_THINK, **GREEDY
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # the call turn was kept


def test_response_format_json_schema_replies_validate(server):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    r = server.client().chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Name a Python module and a number."}],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
        max_tokens=120,
        extra_body=NO_THINK,
        seed=7,
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_responses_api_text_and_stream(server, oracle):
    c = server.client()
    want = oracle([{"role": "user", "content": QUESTIONS[2]}], max_tokens=40)
    r = c.responses.create(model=NAME, input=QUESTIONS[2], max_output_tokens=40, extra_body=NO_THINK, **GREEDY)
    assert r.output_text == want.content
    assert r.usage.output_tokens == want.usage.completion_tokens
    deltas = []
    with c.responses.stream(
        model=NAME, input=QUESTIONS[2], max_output_tokens=40, extra_body=NO_THINK, **GREEDY
    ) as stream:
        for ev in stream:
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == want.content == final.output_text
    # reasoning on: a reasoning item, then the message; and a function call item
    r = c.responses.create(
        model=NAME,
        input=[{"role": "user", "content": "Weather in Rome for 2 days?"}],
        tools=[{"type": "function", **WEATHER["function"]}],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
        extra_body=NO_THINK,
        **GREEDY,
    )
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo", "Rome")


def test_raw_completion_and_logprobs_match_the_model(server, gguf):
    import numpy as np

    from qwen35.bindings.model import Model

    prompt = "def read_lines(path):\n"
    r = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=8, logprobs=3, **GREEDY)
    with Model.load(gguf, n_ctx=256) as m:
        toks = m.tokenize(prompt)
        lps = []
        for _ in range(8):
            logits = m.logits(toks)[-1].astype(np.float64)
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            t = int(np.argmax(logits))
            if m.is_eog(t):
                break
            lps.append(logp[t])
            toks.append(t)
        text = b"".join(m.piece(t) for t in toks[len(m.tokenize(prompt)) :]).decode()
    choice = r.choices[0]
    assert choice.text == text
    assert np.allclose(choice.logprobs.token_logprobs[: len(lps)], lps, atol=2e-3)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)


def test_concurrent_conversations_equal_one_at_a_time(server, oracle):
    """Three conversations at once, each two turns, on three slots decoded in shared batches:
    the same tokens as the bindings give each conversation alone."""
    c = server.client()
    results: dict[int, list[str]] = {}
    errors = []

    def converse(i):
        try:
            msgs = [{"role": "user", "content": QUESTIONS[i]}]
            out = []
            for follow in ("Tell me more.", None):
                r = _ask(c, msgs, max_tokens=40)
                out.append(r.choices[0].message.content)
                if follow:
                    msgs += [{"role": "assistant", "content": out[-1]}, {"role": "user", "content": follow}]
            results[i] = (out, msgs)
        except Exception as e:
            errors.append(e)

    shared = _metric(server, 'qwen35_decode_steps{shared="yes"}')
    threads = [threading.Thread(target=converse, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _metric(server, 'qwen35_decode_steps{shared="yes"}') > shared + 10  # they did share decode steps
    for i in range(3):
        out, msgs = results[i]
        assert out[0] == oracle(msgs[:1], max_tokens=40).content, i
        assert out[1] == oracle(msgs, max_tokens=40).content, i


def test_a_client_that_goes_away_cancels_its_request(server, oracle, gguf):
    import httpx

    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": 900,
        "stream": True,
        "logit_bias": _no_end(gguf),  # it would run to 900 tokens
    }
    before = _metric(server, "qwen35_completion_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 3:
                break
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["busy"] == 0
    assert 0 < _metric(server, "qwen35_completion_tokens_total") - before < 900  # stopped early
    # the slot it used still answers exactly
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    assert _ask(server.client(), msgs).choices[0].message.content == oracle(msgs).content


def test_errors_are_openai_error_objects(server):
    import httpx

    url = server.url + "/v1/chat/completions"
    ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def err(resp, status, param=None, code=None):
        assert resp.status_code == status, resp.text
        e = resp.json()["error"]
        assert e["message"] and (param is None or e["param"] == param) and (code is None or e["code"] == code), e

    err(httpx.post(url, json={**ok, "temperature": -1}), 400, "temperature")
    err(httpx.post(url, json={**ok, "top_logprobs": 99, "logprobs": True}), 400, "top_logprobs")
    err(httpx.post(url, json={**ok, "n": 2}), 400, "n")
    err(httpx.post(url, json={**ok, "model": "gpt-4"}), 404, "model", "model_not_found")
    err(httpx.post(url, json={"model": NAME}), 400, "messages")
    err(httpx.post(url, json={**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role")
    err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    err(httpx.post(url, json={**ok, "max_tokens": 5000}), 400, "max_tokens", "context_length_exceeded")
    err(
        httpx.post(url, json={**ok, "messages": [{"role": "user", "content": "word " * 2000}]}),
        400,
        None,
        "context_length_exceeded",
    )
    err(httpx.post(url, json={**ok, "logit_bias": {"99999999": 5}}), 400, "logit_bias")
    err(
        httpx.post(
            url,
            json={
                **ok,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integer", "minimum": 3}},
                },
            },
        ),
        400,
    )
    err(
        httpx.post(
            url,
            json={
                **ok,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
            },
        ),
        400,
    )
    err(httpx.post(url, content=b"x" * (17 << 20), headers={"content-type": "application/json"}), 413)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # none of it hurt the server
    assert (
        "access-control-allow-origin"
        not in httpx.options(
            url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        ).headers
    )


def test_metrics_count_what_happened(server):
    import httpx

    text = httpx.get(server.url + "/metrics").text
    for name in (
        "qwen35_requests_total",
        'qwen35_prompt_tokens_total{kind="reused"}',
        'qwen35_prompt_tokens_total{kind="evaluated"}',
        "qwen35_time_to_first_token_seconds_bucket",
        "qwen35_decode_tokens_per_second_bucket",
        "qwen35_queue_depth",
        "qwen35_busy_slots",
        "qwen35_checkpoint_bytes",
    ):
        assert name in text, name
    reused = float(text.split('qwen35_prompt_tokens_total{kind="reused"} ')[1].split()[0])
    assert reused > 0


def test_api_key_queue_limit_and_cors(gguf):
    import httpx

    s = Server(
        gguf,
        "--parallel",
        "1",
        "--max-queue",
        "0",
        "--cors-origin",
        "http://app.example",
        env={"QWEN35_API_KEY": "s3cret"},
    )
    try:
        url = s.url + "/v1/chat/completions"
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200  # not under /v1
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url, json=body, headers=auth).status_code == 200
        pre = httpx.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == "http://app.example"
        # one slot, no queue: while a long reply runs, another request is turned away with 503
        long = {**body, "max_tokens": 900, "stream": True, "logit_bias": _no_end(gguf)}
        with httpx.stream("POST", url, json=long, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            busy = httpx.post(url, json=body, headers=auth)
        assert busy.status_code == 503 and busy.headers["retry-after"] and busy.json()["error"]["code"] == "server_busy"
    finally:
        assert s.stop() == 0


def test_a_restarted_server_continues_a_conversation_from_its_disk_cache(gguf, server, oracle, tmp_path):
    cache = tmp_path / "cache"
    msgs = [{"role": "user", "content": QUESTIONS[2]}]
    s = Server(gguf, "--parallel", "1", "--cache-dir", str(cache))
    try:
        r1 = _ask(s.client(), msgs)
    finally:
        assert s.stop() == 0
    assert list(cache.glob("*.qwen35-state"))
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    s = Server(gguf, "--parallel", "1", "--cache-dir", str(cache))
    try:
        r2 = _ask(s.client(), msgs)
    finally:
        assert s.stop() == 0
    assert r2.choices[0].message.content == oracle(msgs).content
    # as much came from the disk cache as a server that never stopped takes from its slot
    live = server.client()
    _ask(live, msgs[:1])
    kept = _ask(live, msgs).usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens == kept > 0


def test_a_damaged_disk_state_is_evaluated_again_not_trusted(gguf, oracle, tmp_path):
    import json
    import struct

    cache = tmp_path / "cache"
    msgs = [{"role": "user", "content": QUESTIONS[1]}]
    s = Server(gguf, "--parallel", "1", "--cache-dir", str(cache))
    try:
        r1 = _ask(s.client(), msgs)
    finally:
        assert s.stop() == 0
    for f in cache.glob("*.qwen35-state"):  # one bit of each stored state flipped, as a bad disk would
        data = bytearray(f.read_bytes())
        (n,) = struct.unpack_from("<Q", data)
        begin, end = json.loads(data[8 : 8 + n])["state"]["data_offsets"]
        data[8 + n + (begin + end) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    s = Server(gguf, "--parallel", "1", "--cache-dir", str(cache))
    try:
        r2 = _ask(s.client(), msgs)
    finally:
        assert s.stop() == 0
    assert r2.choices[0].message.content == oracle(msgs).content
    assert r2.usage.prompt_tokens_details.cached_tokens == 0  # refused by its checksum, evaluated again
    assert b"checksum does not match" in s.log


def test_bad_start_is_one_line_and_a_non_zero_exit(tmp_path, lib_dir):
    missing = subprocess.run([QWEN35, "serve", str(tmp_path / "nope.gguf")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.strip().count("\n") == 0
    assert "does not exist" in missing.stderr
    hf = subprocess.run(
        [QWEN35, "serve", str(ROOT / "examples" / "models" / "qwen35-dense-tiny")], capture_output=True, text=True
    )
    assert hf.returncode == 1 and "qwen35-convert" in hf.stderr and hf.stderr.strip().count("\n") == 0
    bad = subprocess.run([QWEN35, "serve", "x.gguf", "--reasoning", "maybe"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--reasoning" in bad.stderr


def test_conversations_that_lose_their_slot_come_back_exactly(gguf, oracle):
    """Three conversations taking turns on one slot, with a RAM cache too small for all of them:
    each comes back from the cache (or, evicted, is evaluated again) and every reply equals the
    bindings' alone."""
    s = Server(gguf, "--parallel", "1", "--cache-ram", "3")  # about two conversations
    try:
        c = s.client()
        convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
        for _turn in range(2):
            for msgs in convs:
                r = _ask(c, msgs, max_tokens=24)
                assert r.choices[0].message.content == oracle(msgs, max_tokens=24).content
                msgs += [
                    {"role": "assistant", "content": r.choices[0].message.content},
                    {"role": "user", "content": "Go on."},
                ]
        assert _metric(s, 'qwen35_restored_conversations{source="ram"}') >= 1
        assert 0 < _metric(s, "qwen35_saved_state_bytes") <= 3 << 20  # evicted down to the budget
    finally:
        assert s.stop() == 0
