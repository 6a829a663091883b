"""How the next token is chosen: one ``SamplingParams``, sampled by llama.cpp's own sampler chain.

Every reply (``Chat``, ``Model.chat``, speculative decoding, ``qwen35 chat``) samples through a
:class:`Sampler`, a llama.cpp sampler chain built once per reply. Its order follows transformers
and vLLM, for which Qwen's recommended values were tuned:

    penalties (repetition, frequency, presence over the reply's last ``penalty_last_n`` tokens)
    -> logit bias -> temperature -> top-k -> top-p -> min-p -> draw (seeded)

(llama.cpp's own default chain applies temperature last, so at a temperature other than 1 its
top-p keeps another set of tokens.) Temperature 0 is greedy. A grammar (GBNF; structured output,
constrained tool calls) runs beside the chain as llama.cpp's ``common_sampler`` runs it: the
token drawn without it is kept when the grammar accepts it, else the draw is made again over the
tokens the grammar allows; the result is a draw from the constrained distribution.

Fields left ``None`` take the model's recommendation (the GGUF's ``general.sampling.*``, written
from the checkpoint's ``generation_config.json``), else llama.cpp's defaults.

>>> p = SamplingParams(top_k=20).resolve({"general.sampling.temp": 0.6, "general.sampling.top_k": 40})
>>> (p.temperature, p.top_k, p.top_p)
(0.6, 20, 0.95)
>>> SamplingParams(temperature=0).resolve({}).describe()
'greedy'
>>> SamplingParams(top_p=1.5)
Traceback (most recent call last):
...
ValueError: top_p=1.5 is out of range: use a value in (0, 1]
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# llama.cpp's defaults (common/common.h), for a GGUF that recommends nothing
FALLBACK = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}
# GGUF keys (gguf-py Keys.General.SAMPLING_*) -> fields
RECOMMENDED_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
    "general.sampling.penalty_last_n": "penalty_last_n",
}
SEED_MAX = 0xFFFFFFFF - 1  # 0xFFFFFFFF is llama.cpp's "random seed"


@dataclass(frozen=True)
class SamplingParams:
    """How the tokens of a reply are chosen. ``None``: the model's recommendation.

    temperature 0 is greedy. penalty_last_n: how many of the reply's latest tokens the penalties
    look at (-1: the whole reply). logit_bias: token id -> added to its logit (-inf bans it).
    seed: the draws of a reply (None: a new random seed each reply). stop: strings that end the
    reply (not included in it). grammar: GBNF the reply must follow (see also ``response_format``
    of ``Chat.send``)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    grammar: str | None = None

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"{name}={getattr(self, name)!r} is out of range: use {rule}")

        def num(name):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise ValueError(f"{name}={v!r} is not a number")
            return v

        t = num("temperature")
        if t is not None and not 0 <= t < math.inf:
            bad("temperature", "a value >= 0 (0 = greedy)")
        if num("top_k") is not None and (self.top_k != int(self.top_k) or self.top_k < 0):
            bad("top_k", "a whole number >= 0 (0 = off)")
        if num("top_p") is not None and not 0 < self.top_p <= 1:
            bad("top_p", "a value in (0, 1]")
        if num("min_p") is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "a value in [0, 1] (0 = off)")
        if num("repetition_penalty") is not None and not 0 < self.repetition_penalty < math.inf:
            bad("repetition_penalty", "a value > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= num(name) <= 2:
                bad(name, "a value in [-2, 2] (0 = off)")
        if num("penalty_last_n") is not None and (
            self.penalty_last_n != int(self.penalty_last_n) or self.penalty_last_n < -1
        ):
            bad("penalty_last_n", "a whole number >= -1 (-1 = the whole reply)")
        if num("seed") is not None and (self.seed != int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            bad("seed", f"a whole number in [0, {SEED_MAX}]")
        if num("max_tokens") < 1 or self.max_tokens != int(self.max_tokens):
            bad("max_tokens", "a whole number >= 1")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop={self.stop!r}: every stop string must be a non-empty string")
        for tok, bias in dict(self.logit_bias).items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"logit_bias: {tok!r} is not a token id (a whole number >= 0)")
            if not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
                raise ValueError(f"logit_bias[{tok}]={bias!r}: use a finite number, or -inf to ban the token")

    def resolve(self, recommended: Mapping[str, float]) -> SamplingParams:
        """Every None filled: from recommended (a GGUF's general.sampling.* keys), else llama.cpp's
        defaults. A resolved SamplingParams resolves to itself."""
        rec = {RECOMMENDED_KEYS[k]: v for k, v in recommended.items() if k in RECOMMENDED_KEYS}
        filled = {}
        for f in fields(self):
            if getattr(self, f.name) is None and f.name not in ("seed", "grammar"):
                filled[f.name] = rec.get(f.name, FALLBACK.get(f.name, -1 if f.name == "penalty_last_n" else None))
        out = replace(self, **filled)
        if out.top_k is not None and not isinstance(out.top_k, int):
            out = replace(out, top_k=int(out.top_k))
        return out

    def describe(self) -> str:
        """One line for a banner: what a resolved SamplingParams samples with."""
        if self.temperature == 0:
            parts = ["greedy"]
        else:
            parts = [
                f"temperature {self.temperature:g}",
                f"top-k {self.top_k}",
                f"top-p {self.top_p:g}",
                f"min-p {self.min_p:g}",
            ]
        for name, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            v = getattr(self, name)
            if v is not None and v != off:
                parts.append(f"{name.replace('_', ' ')} {v:g}")
        if self.temperature != 0 and self.seed is not None:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)


class SamplerError(ValueError):
    """Sampling settings llama.cpp refused (a grammar that does not compile, a token id outside
    the vocabulary)."""


class Sampler:
    """A llama.cpp sampler chain for one reply, plus an optional grammar.

    ``sample(ctx, idx)`` draws from the idx-th output of the context's last decode without
    copying the logits; ``sample_logits(array)`` draws from logits held elsewhere. Either way the
    token is accepted (penalties, grammar state). Free with close() (or use ``with``)."""

    def __init__(self, vocab, n_vocab: int, params: SamplingParams, *, grammar: str | None = None):
        import llama_cpp

        p = params.resolve({})  # fields still None: llama.cpp's defaults
        self._lib, self.n_vocab, self.params = llama_cpp, n_vocab, p
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._grammar = None
        self._cur = None  # numpy token-data buffer, made on first need
        try:
            self._build(vocab, p, grammar)
        except BaseException:
            self.close()
            raise

    def _build(self, vocab, p: SamplingParams, grammar: str | None) -> None:
        lib = self._lib
        add = lambda s: lib.llama_sampler_chain_add(self._chain, s)
        penalized = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        if penalized and p.penalty_last_n != 0:
            last_n = p.max_tokens if p.penalty_last_n == -1 else p.penalty_last_n
            add(
                lib.llama_sampler_init_penalties(
                    self.n_vocab, last_n, p.repetition_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.logit_bias:
            bad = [t for t in p.logit_bias if t >= self.n_vocab]
            if bad:
                raise SamplerError(
                    f"logit_bias: token {bad[0]} is not in the model's vocabulary (ids 0..{self.n_vocab - 1})"
                )
            arr = (lib.llama_logit_bias * len(p.logit_bias))(
                *[lib.llama_logit_bias(t, float(b)) for t, b in p.logit_bias.items()]
            )
            add(lib.llama_sampler_init_logit_bias(self.n_vocab, len(p.logit_bias), arr))
        if p.temperature == 0:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_temp(p.temperature))
            if p.top_k:
                add(lib.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1:
                add(lib.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                add(lib.llama_sampler_init_min_p(p.min_p, 1))
            add(lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if p.seed is None else p.seed))
        text = grammar if grammar is not None else p.grammar
        if text is not None:
            self._grammar = compile_grammar(vocab, text)

    def close(self) -> None:
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sample(self, ctx, idx: int = -1) -> int:
        """A token from the idx-th output of ctx's last decode (accepted)."""
        if self._grammar is None:
            return int(self._lib.llama_sampler_sample(self._chain, ctx, idx))
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(ctx, idx)
        return self._sample_constrained(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def sample_logits(self, logits: np.ndarray) -> int:
        """A token from logits [n_vocab] (accepted)."""
        if self._grammar is None:
            tok = self._apply(logits, (self._chain,))
            self._lib.llama_sampler_accept(self._chain, tok)
            return tok
        return self._sample_constrained(logits)

    def _sample_constrained(self, logits: np.ndarray) -> int:
        tok = self._apply(logits, (self._chain,))
        if not self._allowed(tok):  # drawn again over what the grammar allows
            tok = self._apply(logits, (self._grammar, self._chain))
        self._lib.llama_sampler_accept(self._grammar, tok)
        self._lib.llama_sampler_accept(self._chain, tok)
        return tok

    def _allowed(self, tok: int) -> bool:
        lib = self._lib
        one = lib.llama_token_data(tok, 1.0, 0.0)
        arr = lib.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lib.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return one.logit != -math.inf

    def _apply(self, logits: np.ndarray, samplers) -> int:
        """The token the samplers select from logits (nothing accepted)."""
        import numpy as np

        lib = self._lib
        if self._cur is None:
            self._cur = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        cur = self._cur
        cur["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cur["logit"] = logits
        arr = lib.llama_token_data_array(
            cur.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), self.n_vocab, -1, False
        )
        for s in samplers:
            lib.llama_sampler_apply(s, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise SamplerError("no token is allowed here (the grammar and the logit bias exclude every one)")
        return int(arr.data[arr.selected].id)


def compile_grammar(vocab, text: str):
    """A llama.cpp grammar sampler for GBNF text (root rule ``root``); SamplerError with
    llama.cpp's reason when it does not compile."""
    import llama_cpp

    from qwen35 import native

    with native.quiet_errors() as log:
        g = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
    if not g:
        why = "; ".join(line.strip() for line in log if line.strip()) or "llama.cpp could not parse it"
        raise SamplerError(f"the grammar does not compile: {why}")
    return g


def recommended(meta: Mapping[str, object]) -> dict[str, float]:
    """The general.sampling.* keys a GGUF's metadata carries (a key -> value mapping)."""
    return {k: meta[k] for k in RECOMMENDED_KEYS if meta.get(k) is not None}
