"""A short fuzz run of every parser that takes outside bytes (tests/support/fuzz.py has the
targets and their seeds; bench/fuzz.py runs 100,000 inputs of each). hypothesis picks the input
numbers; an input may be taken or refused with the target's one-line error, nothing else: another
exception, a 5xx from the server or a crash of the process fails the test, naming the input
(``bench/fuzz.py --target T --seed N --count 1`` replays it)."""

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SEEDS = st.integers(min_value=0, max_value=2**48)


def fuzz_settings(n: int):
    return settings(
        max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=False
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory, lib_dir):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def micro(work):
    from support import fuzz

    return fuzz.micro_gguf(fuzz.micro_checkpoint(work / "micro-hf"), work / "micro.gguf")


@pytest.fixture(scope="module")
def targets(work, micro):
    from support import fuzz

    from qwen35.gguf_scan import scan

    out = {t.name: t for t in fuzz.checkpoint_targets(work)}
    out["gguf"] = fuzz.gguf_target(work, micro)
    out["gguf-load"] = fuzz.gguf_load_target(work, micro)
    names = [(t.name, t.ne[0]) for t in scan(micro).tensors if len(t.ne) == 2][:6]
    out.update({t.name: t for t in fuzz.imatrix_targets(work, names)})
    out["reply"] = fuzz.reply_target()
    out["image"] = fuzz.image_target()
    return out


def _fuzz(target, n: int) -> None:
    @fuzz_settings(n)
    @given(SEEDS)
    def run(seed):
        target.check(seed)

    run()
    # the seeds themselves are taken: a target that refuses everything would test nothing
    assert target.stats["inputs"] >= n and target.stats["accepted"] + target.stats["refused"] == target.stats["inputs"]


@pytest.mark.parametrize(
    "name,n",
    [
        ("checkpoint-config", 1500),
        ("checkpoint-index", 1000),
        ("checkpoint-safetensors", 1500),
        ("checkpoint-tokenizer", 1000),
        ("gguf", 1500),
        ("imatrix-gguf", 1000),
        ("imatrix-dat", 1000),
        ("reply", 1500),
        ("image", 1500),
    ],
)
def test_parsers_take_or_refuse_in_one_line(targets, name, n):
    t = targets[name]
    for raw in t.seeds:  # the unmutated seeds are valid inputs: taken, not refused
        t.run(raw)
    _fuzz(t, n)
    if name == "reply":  # nothing is refused there: every reply parses into events
        assert t.stats["accepted"] == t.stats["inputs"], t.stats
    else:
        assert t.stats["refused"] > 0 and t.stats["accepted"] > 0, t.stats


def test_damaged_models_never_reach_llama_cpp_unchecked(targets):
    """Model.load and a decode on mutated micro GGUFs: a header llama.cpp would abort on (an
    assertion in its loader, a division by a zero count, an impossible rope) is refused first."""
    t = targets["gguf-load"]
    t.run(t.seeds[0])
    _fuzz(t, 600)
    assert t.stats["refused"] > 0, t.stats


def test_saved_chats_damaged_or_edited_are_refused(work, micro):
    from support import fuzz

    from qwen35.bindings.model import Model

    with Model.load(micro, n_ctx=256, n_threads=1) as m:
        plain, sealed = fuzz.saved_chat_targets(work, m)
        plain.run(plain.seeds[0])
        _fuzz(plain, 400)
        _fuzz(sealed, 600)
    assert plain.stats["refused"] > 0 and sealed.stats["refused"] > 0


def test_request_bodies_never_get_a_5xx(micro):
    from support import fuzz

    client = fuzz.server_client(micro)
    try:
        t = fuzz.server_target(client)
        for raw in t.seeds:  # taken, but for bodies whose tool prompt is longer than a micro slot
            try:
                t.run(raw)
            except fuzz.Refused as e:
                assert "context of a slot" in str(e), e
        _fuzz(t, 500)
        assert t.stats["accepted"] > 0 and t.stats["refused"] > 0, t.stats
        # found by fuzzing: numbers JSON does not have (Python's json takes them) are a 400, not a 500
        for bad in (b"NaN", b"Infinity", b"1e999"):
            body = b'{"model": "fuzz", "prompt": "Hi", "max_tokens": 2, "temperature": ' + bad + b"}"
            r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], (bad, r.text)
        # and the server still answers as before
        r = client.post("/v1/completions", json={"model": "fuzz", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        client.shutdown()


def test_metrics_read_while_the_engine_saves_states(micro):
    """Found by fuzzing (1 request in 100,000): a request's gauges summed the engine's saved states
    while the engine thread added and evicted them (OrderedDict mutated during iteration: a 500).
    Here the engine saves a state after every request while /metrics is read as fast as it
    answers, with threads switching every microsecond (before the fix: a 500 within seconds):
    every reply a 200."""
    import sys
    import threading

    from support import fuzz

    client = fuzz.server_client(micro, cache_ram=50 << 20)
    stop, statuses, saved = threading.Event(), [], []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def talk():
        i = 0
        while not stop.is_set():
            i += 1
            # a new conversation each time: the slot's last one is saved, with its checkpoints
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": "fuzz",
                    "messages": [{"role": "user", "content": f"{i} once upon a time"}],
                    "max_tokens": 1,
                    "temperature": 0,
                },
            )
            statuses.append(r.status_code)

    t = threading.Thread(target=talk)
    try:
        t.start()
        reads = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = client.get("/metrics")
            statuses.append(r.status_code)
            reads += 1
        stop.set()
        t.join()
        saved.append(len(client.engine.saved))
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        client.shutdown()
    assert reads > 50 and len(statuses) > reads + 20, (reads, len(statuses))
    assert set(statuses) == {200}, sorted(set(statuses))
    assert saved[0] > 20, saved  # the engine did save (and so change) states while they were read
