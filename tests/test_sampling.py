"""One sampler, llama.cpp's: the distribution it draws from equals transformers' warpers applied
in the documented order (penalties, temperature, top-k, top-p, min-p), through the Sampler, Chat,
Model.chat and the CLI; the GGUF's recommended sampling is the default; bad settings are one error
and change nothing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qwen35.bindings.sampling import SamplingParams
from qwen35.cpus import usable_cpus

QWEN35 = str(Path(sys.executable).parent / "qwen35")
SIGMAS = 4.5  # per-token frequency bound, in standard deviations of a binomial
MESSAGES = [{"role": "user", "content": "What does json.dumps do?"}]


def _load(path, **kw):
    from qwen35.bindings.model import Model

    return Model.load(path, n_ctx=kw.pop("n_ctx", 1024), n_threads=usable_cpus(), **kw)


def expected_probs(logits: np.ndarray, p: SamplingParams, history: list[int] = ()) -> np.ndarray:
    """The oracle: transformers' own processors (repetition penalty, temperature, top-k, top-p,
    min-p, in that order) and OpenAI's presence/frequency formula, over float64 logits."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = torch.tensor(logits, dtype=torch.float64)[None]
    ids = torch.tensor([list(history)], dtype=torch.long)
    if history:
        if p.repetition_penalty and p.repetition_penalty != 1:
            x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
        counts = np.bincount(np.asarray(history), minlength=logits.size)
        x = x - torch.tensor(counts * p.frequency_penalty + (counts > 0) * p.presence_penalty)[None]
    for warp in (
        [TemperatureLogitsWarper(p.temperature)]
        + ([TopKLogitsWarper(p.top_k)] if p.top_k else [])
        + ([TopPLogitsWarper(p.top_p)] if p.top_p < 1 else [])
        + ([MinPLogitsWarper(p.min_p)] if p.min_p > 0 else [])
    ):
        x = warp(ids, x)
    return torch.softmax(x[0], -1).numpy()


def assert_draws_follow(draws: list[int], probs: np.ndarray) -> None:
    """Every draw inside the expected support; the frequency of each token expected at least 5
    times, and of the rest pooled, within SIGMAS standard deviations of its probability."""
    n = len(draws)
    counts = np.bincount(np.asarray(draws), minlength=probs.size)
    outside = np.nonzero((counts > 0) & (probs == 0))[0]
    assert outside.size == 0, f"drew tokens outside the expected support: {outside[:10]}"
    big = probs * n >= 5
    bins = [(f"token {t}", counts[t], probs[t]) for t in np.flatnonzero(big)]
    bins.append(("the rest", counts[~big].sum(), probs[~big].sum()))
    for what, c, p in bins:
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(c / n - p) <= SIGMAS * sd + 1 / n, f"{what}: frequency {c / n:.4f}, expected {p:.4f} (sd {sd:.4f})"


@pytest.fixture(scope="module")
def model(trained_dense_gguf):
    with _load(trained_dense_gguf) as m:
        yield m


@pytest.fixture(scope="module")
def last_logits(model):
    prompt = model.tokenize(model.render(MESSAGES, enable_thinking=False))
    return model.logits(prompt)[-1].astype(np.float64)


# temperature before top-p matters: at 0.5 the sharper distribution keeps fewer tokens in its 0.8
# mass than llama.cpp's default order (temperature last) would
CONFIGS = [
    SamplingParams(temperature=0.5, top_k=0, top_p=0.8, min_p=0.0),
    SamplingParams(temperature=1.3, top_k=12, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
]


@pytest.mark.parametrize("params", CONFIGS, ids=lambda p: p.describe())
def test_sampler_draws_follow_transformers_warpers(model, last_logits, params):
    probs = expected_probs(last_logits, params)
    draws = []
    for seed in range(3000):
        with model.sampler(replace_seed(params, seed)) as s:
            draws.append(s.sample_logits(last_logits.astype(np.float32)))
    assert_draws_follow(draws, probs)


def replace_seed(p: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(p, seed=seed)


@pytest.mark.parametrize(
    "penalties",
    [
        dict(presence_penalty=1.5),
        dict(frequency_penalty=0.7),
        dict(repetition_penalty=1.3),
        dict(presence_penalty=0.5, frequency_penalty=0.4, repetition_penalty=1.1),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_penalties_follow_the_reply_history(model, last_logits, penalties):
    """The tokens a reply has produced (accepted by the sampler) are penalized as transformers'
    repetition penalty and OpenAI's presence/frequency penalties define it; only the last
    penalty_last_n of them count."""
    top = [int(t) for t in np.argsort(-last_logits)[:6]]
    history = [top[0], top[1], top[0], top[3], top[0]]
    params = SamplingParams(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, **penalties)
    draws = []
    for seed in range(2500):
        with model.sampler(replace_seed(params, seed).resolve({})) as s:
            for t in history:
                s._lib.llama_sampler_accept(s._chain, t)
            draws.append(s.sample_logits(last_logits.astype(np.float32)))
    assert_draws_follow(draws, expected_probs(last_logits, params.resolve({}), history))
    # a window of 2: only the last two tokens of the history count
    windowed = SamplingParams(temperature=0, penalty_last_n=2, presence_penalty=2.0, frequency_penalty=2.0)
    with model.sampler(windowed) as s:
        for t in history:
            s._lib.llama_sampler_accept(s._chain, t)
        got = s.sample_logits(last_logits.astype(np.float32))
    row = last_logits.copy()
    for t in set(history[-2:]):
        row[t] -= 2.0 + 2.0 * history[-2:].count(t)
    assert got == int(np.argmax(row))


def test_chat_draws_the_first_token_from_the_context(model, last_logits):
    """Chat samples the first token straight from llama.cpp's context after evaluating the
    prompt (no logits copied); the draws over seeds follow the same oracle."""
    from qwen35.bindings.chat import Chat

    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, max_tokens=1)
    eog = [t for t in range(last_logits.size) if model.is_eog(t)]
    draws = []
    for seed in range(1500):
        chat = Chat(model, enable_thinking=False)
        chat.messages = list(MESSAGES)
        r = chat.send(None, replace_seed(params, seed))
        assert r.usage.evaluated_tokens > 0
        draws.append(r.tokens[0] if r.tokens else eog[0])  # an end-of-generation token ends the reply
    probs = expected_probs(last_logits, params.resolve({}))
    probs[eog[0]] = probs[eog].sum()
    probs[eog[1:]] = 0
    assert_draws_follow(draws, probs)


def test_greedy_and_seeded_replies(model):
    greedy = model.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24), enable_thinking=False)
    prompt = model.tokenize(model.render(MESSAGES, enable_thinking=False))
    # greedy: every token is the argmax of llama.cpp's logits after the reply so far
    logits = model.logits(prompt + greedy.tokens)
    assert greedy.tokens == [int(np.argmax(row)) for row in logits[len(prompt) - 1 : -1]]
    seeded = SamplingParams(temperature=1.0, seed=42, max_tokens=24)
    a = model.chat(MESSAGES, seeded, enable_thinking=False).tokens
    assert model.chat(MESSAGES, seeded, enable_thinking=False).tokens == a
    # seed None: a new seed each reply (24 tokens at temperature 1.5 never coincide by chance here)
    free = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, max_tokens=24)
    replies = {tuple(model.chat(MESSAGES, free, enable_thinking=False).tokens) for _ in range(3)}
    assert len(replies) > 1


def test_presence_penalty_in_a_greedy_reply_matches_a_numpy_replay(model):
    """Each token of a greedy reply with a presence penalty is the argmax of llama.cpp's logits
    minus the penalty on every token the reply already has."""
    p = SamplingParams(temperature=0, presence_penalty=1.5, max_tokens=32)
    r = model.chat(MESSAGES, p, enable_thinking=False)
    prompt = model.tokenize(model.render(MESSAGES, enable_thinking=False))
    logits = model.logits(prompt + r.tokens)[len(prompt) - 1 :]
    for i, tok in enumerate(r.tokens):
        row = logits[i].astype(np.float64).copy()
        row[list(set(r.tokens[:i]))] -= 1.5
        assert tok == int(np.argmax(row)), f"token {i}"
    plain = model.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=32), enable_thinking=False)
    assert len(set(r.tokens)) >= len(set(plain.tokens))


def test_logit_bias_and_stop_strings(model):
    greedy = SamplingParams(temperature=0, max_tokens=24)
    base = model.chat(MESSAGES, greedy, enable_thinking=False)
    first = base.tokens[0]
    banned = model.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=4, logit_bias={first: -math.inf}), enable_thinking=False
    )
    prompt = model.tokenize(model.render(MESSAGES, enable_thinking=False))
    row = model.logits(prompt)[-1]
    row[first] = -np.inf
    assert banned.tokens[0] == int(np.argmax(row)) != first
    # a stop string from the middle of the greedy reply ends the reply just before it
    text = base.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = model.chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=24, stop=(stop, "\x00never")), enable_thinking=False
    )
    assert cut.finish_reason == "stop" and cut.content == text[: text.index(stop)].strip()


def test_recommended_sampling_is_the_default(model, tiny_f32_gguf):
    """The converter writes generation_config.json's values as general.sampling.*; a chat given
    no sampling uses them, fields given override them; a GGUF without them falls back to
    llama.cpp's defaults. Greedy only when asked."""
    from qwen35.bindings.chat import Chat

    cfg = json.loads(
        (
            Path(__file__).resolve().parent.parent
            / "examples"
            / "models"
            / "qwen35-dense-tiny"
            / "generation_config.json"
        ).read_text()
    )
    assert model.recommended_sampling == pytest.approx(
        {
            "general.sampling.temp": cfg["temperature"],
            "general.sampling.top_k": cfg["top_k"],
            "general.sampling.top_p": cfg["top_p"],
        }
    )
    chat = Chat(model)
    used = chat.sampling()
    assert (used.temperature, used.top_k, used.top_p) == pytest.approx((cfg["temperature"], cfg["top_k"], cfg["top_p"]))
    assert chat.sampling(SamplingParams(top_k=5)).top_k == 5
    assert chat.sampling(SamplingParams(temperature=0)).describe() == "greedy"
    with _load(tiny_f32_gguf) as m:
        with open(Path(tiny_f32_gguf).parent / "hf" / "generation_config.json") as f:
            tiny_cfg = json.load(f)
        expect = {
            "temperature": tiny_cfg.get("temperature", 0.8),
            "top_k": tiny_cfg.get("top_k", 40),
            "top_p": tiny_cfg.get("top_p", 0.95),
        }
        got = Chat(m).sampling()
        assert (got.temperature, got.top_k, got.top_p) == pytest.approx(tuple(expect.values()))


@pytest.mark.parametrize(
    "kw,word",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2), "min_p"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(stop=("",)), "stop"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_sampling_is_one_error_naming_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        SamplingParams(**kw)
    with pytest.raises(TypeError, match="top_q"):
        SamplingParams(top_q=0.5)


def test_bad_settings_leave_the_conversation_as_it_was(model):
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.sampling import SamplerError

    chat = Chat(model, enable_thinking=False)
    chat.send("Hello", SamplingParams(temperature=0, max_tokens=4))
    before = (list(chat.messages), list(chat.cache.tokens), chat.last)
    with pytest.raises(SamplerError, match="logit_bias: token 99999999"):
        chat.send("again", SamplingParams(logit_bias={99_999_999: 1.0}))
    with pytest.raises(SamplerError, match="grammar does not compile"):
        chat.send("again", SamplingParams(grammar='root ::= "a" missing-rule'))
    with pytest.raises(ValueError, match="response_format"):
        chat.send("again", response_format={"type": "json_schema", "json_schema": {"schema": 3}})
    with pytest.raises(ValueError, match="tool_choice"):
        chat.send("again", tool_choice="sometimes")
    assert (chat.messages, chat.cache.tokens, chat.last) == before


def test_cli_sampling_flags(trained_dense_gguf):
    """The flags reach the sampler: the JSON names the sampling in use (the GGUF's, overridden by
    flags), and a seeded reply equals the Python API's with the same settings."""
    from qwen35.bindings.chat import Chat

    base = [
        QWEN35,
        "chat",
        str(trained_dense_gguf),
        "-p",
        MESSAGES[0]["content"],
        "-n",
        "16",
        "--no-think",
        "--json",
        "--threads",
        str(usable_cpus()),
    ]
    r = subprocess.run(
        base + ["--temp", "0.9", "--top-k", "7", "--min-p", "0.01", "--seed", "5", "--presence-penalty", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    s = out["sampling"]
    assert (s["temperature"], s["top_k"], s["min_p"], s["seed"], s["presence_penalty"]) == (0.9, 7, 0.01, 5, 0.5)
    assert s["top_p"] == pytest.approx(0.8)  # not given: the GGUF's recommendation
    with _load(trained_dense_gguf, n_ctx=8192) as m:
        chat = Chat(m, enable_thinking=False)
        py = chat.send(
            MESSAGES[0]["content"],
            SamplingParams(temperature=0.9, top_k=7, min_p=0.01, seed=5, presence_penalty=0.5, max_tokens=16),
        )
    assert out["content"] == py.content
    bad = subprocess.run(base + ["--top-p", "1.5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "top_p=1.5" in bad.stderr
