"""Chat sessions that only ever evaluate what is new.

>>> from qwen35.bindings.chat import ContentDelta
>>> ContentDelta("hi").text
'hi'
"""

from __future__ import annotations

import codecs
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import structured
from .model import DRAFT_MAX, ModelError
from .sampling import Sampler, SamplingParams
from .session import PromptCache
from .structured import THINK_END, TOOL_OPEN
from .toolcalls import MalformedToolCall, Text, ToolCall, ToolCallParser

if TYPE_CHECKING:
    import numpy as np

    from .model import Model

OVERFLOW_POLICIES = ("error", "drop_oldest")
SPECULATIVE = (None, "mtp")


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


Event = ReasoningDelta | ContentDelta | ToolCall | MalformedToolCall


class ContextOverflow(ModelError):
    """The conversation and a reply of max_tokens do not fit the context. The message that was
    to be sent is not added: the conversation is as it was before the call."""

    def __init__(self, message: str, *, tokens: int, max_tokens: int, limit: int):
        super().__init__(message)
        self.tokens, self.max_tokens, self.limit = tokens, max_tokens, limit


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    reused_tokens: int
    evaluated_tokens: int  # prompt tokens run through the model this turn
    completion_tokens: int
    restored_from: int | None = None
    dropped_messages: int = 0  # oldest messages left out to fit the context (overflow="drop_oldest")


@dataclass(frozen=True)
class Timings:
    prompt_ms: float  # evaluating the prompt (what was not reused)
    generate_ms: float
    evaluated_tokens: int
    completion_tokens: int
    first_token_ms: float = 0.0  # from the call to the first sampled token: render, tokenize, prefill

    @property
    def prefill_tok_s(self) -> float:
        return self.evaluated_tokens / max(self.prompt_ms, 1e-9) * 1e3

    @property
    def decode_tok_s(self) -> float:
        return self.completion_tokens / max(self.generate_ms, 1e-9) * 1e3


@dataclass(frozen=True)
class Speculation:
    """What speculative decoding did for one reply."""

    steps: int  # target verification batches
    drafted: int  # draft tokens proposed by the MTP head
    accepted: int  # of which the target agreed with (each saves one target decode)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens the target produced per verification batch (1.0 = no gain)."""
        return (self.steps + self.accepted) / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    malformed_tool_calls: list[MalformedToolCall]
    finish_reason: str  # stop | length | tool_calls | interrupted (the stream was closed or raised)
    usage: Usage
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    speculation: Speculation | None = None  # with speculative="mtp"


class _StopFilter:
    """Cuts the reply's text at the first stop string (held back while a stop could begin)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held, self.stopped = stops, "", False
        self.keep = max((len(x) for x in stops), default=1) - 1

    def feed(self, text: str) -> str:
        if not self.stops or self.stopped:
            return "" if self.stopped else text
        self.held += text
        hits = [i for i in (self.held.find(x) for x in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        cut = max(len(self.held) - self.keep, 0)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def finish(self) -> str:
        out, self.held = self.held, ""
        return out


class _ReplyText:
    """The text of one reply as it is sampled: token bytes decoded as UTF-8 across token
    boundaries, cut at a stop string, the reasoning split from the answer at </think> (or at a
    <tool_call> opened while reasoning; a partial tag is held back), and the answer fed to the
    tool-call parser. The answer's leading newlines (the format's, after </think>) are dropped;
    nothing else is."""

    def __init__(self, model: Model, parser: ToolCallParser | None, thinking: bool, stops: tuple[str, ...] = ()):
        self.model, self.parser, self.thinking = model, parser, thinking
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = _StopFilter(stops)
        self.held = ""  # reasoning text that might be the start of </think> or <tool_call>
        self.answering = False  # the answer has begun (its leading newlines are behind)
        self.tokens: list[int] = []
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ToolCall] = []
        self.bad: list[MalformedToolCall] = []

    @property
    def stopped(self) -> bool:
        """A stop string was generated: the reply ends here."""
        return self.stop.stopped

    def feed(self, token: int) -> list[Event]:
        """The events of one more token. All of its text is taken in before any event is given,
        so a consumer that stops at one of them leaves nothing half-done."""
        self.tokens.append(token)
        return self.feed_bytes(self.model.piece(token))

    def feed_bytes(self, piece: bytes) -> list[Event]:
        return self._text(self.stop.feed(self.decoder.decode(piece)))

    def _text(self, text: str) -> list[Event]:
        if not self.thinking:
            return self._answer(text)
        self.held += text
        tags = (THINK_END, TOOL_OPEN) if self.parser is not None else (THINK_END,)  # no calls: text
        ends = [(i, tag) for tag in tags if (i := self.held.find(tag)) >= 0]
        if ends:
            i, tag = min(ends)
            reasoning, after = self.held[:i], self.held[i + len(THINK_END) :] if tag == THINK_END else self.held[i:]
            self.thinking, self.held = False, ""
            return self._reasoning(reasoning) + self._answer(after)
        keep = next(
            (
                k
                for k in range(min(len(TOOL_OPEN) - 1, len(self.held)), 0, -1)
                if THINK_END.startswith(self.held[-k:]) or TOOL_OPEN.startswith(self.held[-k:])
            ),
            0,
        )
        shown, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return self._reasoning(shown)

    def finish(self) -> tuple[list[Event], dict]:
        """The events held back until the end, and the assistant message of the reply."""
        tail = self.stop.feed(self.decoder.decode(b"", final=True)) + self.stop.finish()
        rest = self._reasoning(self.held + tail) if self.thinking else self._answer(tail)
        self.held = ""
        if self.parser is not None:
            for e in self.parser.finish():
                rest += self._event(e)
        msg = {"role": "assistant", "content": "".join(self.content).strip()}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning).strip()
        if self.calls:
            msg["tool_calls"] = [c.as_message_call() for c in self.calls]
        return rest, msg

    def _reasoning(self, text: str) -> list[Event]:
        if not text:
            return []
        self.reasoning.append(text)
        return [ReasoningDelta(text)]

    def _answer(self, text: str) -> list[Event]:
        if not self.answering:
            text = text.lstrip("\n")
            self.answering = bool(text)
        if not text:
            return []
        if self.parser is None:
            return self._event(Text(text))
        return [ev for e in self.parser.feed(text) for ev in self._event(e)]

    def _event(self, e) -> list[Event]:
        if isinstance(e, Text):
            self.content.append(e.text)
            return [ContentDelta(e.text)]
        (self.calls if isinstance(e, ToolCall) else self.bad).append(e)
        return [e]


class Chat:
    """A conversation on one sequence of a loaded model.

    Each turn renders the whole conversation with the GGUF's chat template, and the prompt cache
    evaluates only what differs from what the sequence already holds (a checkpoint of the
    recurrent state is taken at the start of every assistant turn, whose re-rendering without
    its thinking is where the history diverges).

    speculative="mtp": decode with the GGUF's MTP head as the draft model (load the model with
    ``load_mtp=True``). Each step the head drafts up to draft_max tokens, the target evaluates
    them in one batch, and the sampler walks the target's own logits, keeping drafts while they
    agree; the rejected tail is undone by llama.cpp's recurrent rollback. draft_p_min: stop a
    draft at the first token the head is less sure of (fewer wasted verifications). The sampler
    consumes exactly what it would without speculation, so output is the same tokens (greedy or
    seeded)."""

    def __init__(
        self,
        model: Model,
        *,
        system: str | None = None,
        tools: list[dict] | None = None,
        enable_thinking: bool = True,
        seq_id: int = 0,
        checkpoint_every: int = 1024,
        checkpoint_budget: int = 512 << 20,
        overflow: str = "error",
        speculative: str | None = None,
        draft_max: int = DRAFT_MAX,
        draft_p_min: float = 0.0,
        sampling: SamplingParams | None = None,
    ):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow={overflow!r} is not one of {', '.join(OVERFLOW_POLICIES)}")
        if speculative not in SPECULATIVE:
            raise ValueError(f"speculative={speculative!r} is not one of None, 'mtp'")
        if speculative == "mtp":
            if model.mtp is None:
                raise ModelError("speculative='mtp' needs the MTP head: load the model with load_mtp=True")
            if not 1 <= draft_max <= model.n_rs_seq:
                raise ModelError(
                    f"draft_max={draft_max} must be between 1 and the model's n_rs_seq "
                    f"({model.n_rs_seq}): rejected drafts are undone by recurrent rollback; "
                    "load the model with a larger n_rs_seq"
                )
        self.speculative, self.draft_max, self.draft_p_min = speculative, draft_max, draft_p_min
        self.sampling_params = sampling or SamplingParams()  # what a turn given no sampling uses
        self.model, self.tools, self.enable_thinking, self.overflow = model, tools, enable_thinking, overflow
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cache = PromptCache(model, seq_id, checkpoint_every=checkpoint_every, budget_bytes=checkpoint_budget)
        self._assistant_start = model.tokenize("<|im_start|>assistant", special=True)
        self.last: Reply | None = None
        self.images: dict = {}  # image id -> vision.Image, for the {"type": "image", "image": id} parts of messages

    # ---------------------------------------------------------------- conversation
    def reset(self) -> None:
        """Forget the conversation (the system message stays) and the cached tokens."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.images = {}
        self.cache.reset()

    def _user_message(self, user, images) -> tuple[dict, dict]:
        """The user message as the conversation keeps it, and the images it brings (id -> Image).
        user: text, or OpenAI content parts (text, image_url, image); images: more images (paths,
        bytes, data URLs, ...), placed before the text. Every image is decoded now: a bad one is
        refused before anything changes."""
        from .vision import ImageError, load_image

        parts = user if isinstance(user, list) else ([{"type": "text", "text": user}] if user is not None else [])
        parts = [*({"type": "image", "image": im} for im in images or ()), *parts]
        content, new = [], {}
        for part in parts:
            if isinstance(part, str):
                part = {"type": "text", "text": part}
            if not isinstance(part, dict):
                raise ImageError(f"a message part must be text or an image, not a {type(part).__name__}")
            if part.get("type") == "text" or ("text" in part and "type" not in part):
                content.append({"type": "text", "text": str(part.get("text", ""))})
                continue
            im = load_image(part)
            new[im.id] = im
            content.append({"type": "image", "image": im.id})
        if new:
            if self.model.projector is None:
                raise ImageError(
                    f"{self.model.path.name} was loaded without a vision projector; load it with "
                    "mmproj=PATH (the mmproj-*.gguf qwen35-convert wrote beside it) to send images"
                )
            if self.speculative:
                raise ImageError("images and speculative='mtp' do not go together yet; use a chat without speculation")
        if not new and all(c["type"] == "text" for c in content):
            text = "".join(c["text"] for c in content)
            return {"role": "user", "content": text}, {}
        return {"role": "user", "content": content}, new

    def add_tool_result(self, content: str | dict, name: str | None = None) -> None:
        msg = {"role": "tool", "content": content if isinstance(content, str) else json.dumps(content)}
        if name:
            msg["name"] = name
        self.messages.append(msg)

    def send(
        self,
        user: str | None = None,
        sampling: SamplingParams | None = None,
        *,
        response_format: dict | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        images: list | None = None,
    ) -> Reply:
        """The reply to user (None: to the conversation as it is, e.g. after a tool result).
        user: text or OpenAI content parts; images: paths, bytes, data URLs or Pillow images
        shown before the text (the model needs its projector: ``Model.load(mmproj=...)``)."""
        for _ in self.stream(
            user,
            sampling,
            response_format=response_format,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            images=images,
        ):
            pass
        return self.last

    def sampling(self, sampling: SamplingParams | None = None) -> SamplingParams:
        """What a reply samples with: sampling (default: the chat's), fields left None from the
        model's recommendation."""
        return (sampling or self.sampling_params).resolve(self.model.recommended_sampling)

    def _tokens_of(self, text: str, messages: list[dict], images: dict) -> tuple[list[int], dict]:
        """The rendered prompt's tokens, each image a run of placeholders (session.py), and the
        image chunks by where their runs start."""
        from .session import image_placeholder

        order = [
            part["image"]
            for m in messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if isinstance(part, dict) and part.get("type") == "image"
        ]
        if not order:
            return self.model.tokenize(text), {}
        chunks = self.model.projector.tokenize(text, [images[i] for i in order])
        tokens, at = [], {}
        for c in chunks:
            if c.tokens is not None:
                tokens.extend(c.tokens)
            else:
                at[len(tokens)] = c
                tokens.extend([image_placeholder(c.image)] * c.n_tokens)
        return tokens, at

    def _prompt(
        self, messages: list[dict], max_tokens: int, images: dict | None = None
    ) -> tuple[list[int], list[int], list[dict], dict]:
        """The prompt of messages, after dropping the oldest exchanges if the overflow policy
        allows; returns (tokens, assistant-turn starts, the messages it renders, image chunks by
        start)."""
        images = {**self.images, **(images or {})}
        while True:
            text = self.model.render(messages, enable_thinking=self.enable_thinking, tools=self.tools)
            tokens, at = self._tokens_of(text, messages, images)
            limit = self.model.n_ctx_seq
            if len(tokens) + max_tokens <= limit:
                break
            droppable = [i for i, m in enumerate(messages) if m["role"] != "system"]
            nxt = next((i for i in droppable[1:] if messages[i]["role"] == "user"), None)
            if self.overflow == "error" or nxt is None:
                fixes = (
                    "reset the chat, or choose overflow='drop_oldest'"
                    if self.overflow == "error"
                    else "or send a shorter message"
                )
                what = "the conversation" if self.overflow == "error" else "the last exchange alone"
                raise ContextOverflow(
                    f"{what} ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the {limit}-token context, "
                    f"so the message was not added; load the model with a larger n_ctx, lower max_tokens, {fixes}",
                    tokens=len(tokens),
                    max_tokens=max_tokens,
                    limit=limit,
                )
            # drop the oldest exchange: everything up to the next user message
            messages = messages[: droppable[0]] + messages[nxt:]
        n = len(self._assistant_start)
        marks = [i for i in range(len(tokens) - n + 1) if tokens[i : i + n] == self._assistant_start]
        return tokens, marks, messages, at

    def stream(
        self,
        user: str | None = None,
        sampling: SamplingParams | None = None,
        *,
        response_format: dict | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        images: list | None = None,
    ) -> Iterator[Event]:
        """Add the user message (if any) and generate the reply as events; the whole reply is in
        ``self.last`` afterwards and the assistant message is appended to the conversation.
        user: text or OpenAI content parts (``image_url`` data URLs, local paths); images: more
        images before the text. An image that does not decode, or a model without a projector,
        raises ImageError before anything changes.

        sampling: None fields (all of them by default) take the GGUF's recommended sampling
        (``SamplingParams.resolve``). response_format: OpenAI's ``{"type": "json_object"}`` or
        ``{"type": "json_schema", "json_schema": {"schema": ...}}``: the answer (after the
        reasoning, when thinking is on) follows the schema. tool_choice: "auto" (default),
        "none" (no call), "required" (the answer is one or more calls), or
        ``{"type": "function", "function": {"name": NAME}}`` (a call of NAME).
        parallel_tool_calls=False: a reply constrained to calls makes one.

        Bad settings raise ValueError (SamplerError for a grammar llama.cpp refuses) before
        anything is evaluated. Stopping early (closing the stream, breaking out of the loop,
        Ctrl-C) keeps what was generated as the reply, with finish_reason "interrupted"; before
        the first token, or when the message does not fit the context, the conversation stays as
        it was."""
        t_start = time.perf_counter()
        params = self.sampling(sampling)
        cons = structured.constraint(
            response_format,
            self.tools,
            tool_choice,
            thinking=self.enable_thinking,
            parallel_tool_calls=parallel_tool_calls,
        )
        if not cons.calls_allowed:  # tool_choice "none": the call token is never drawn
            ban = self.model.tokenize(TOOL_OPEN, special=True)
            if len(ban) == 1:
                params = replace(params, logit_bias={**params.logit_bias, ban[0]: -math.inf})
        new_images: dict = {}
        if user is not None or images:
            msg, new_images = self._user_message(user, images)
            asked = [*self.messages, msg]
        else:
            asked = list(self.messages)
        prompt, marks, messages, at = self._prompt(asked, params.max_tokens, new_images)
        sampler = self.model.sampler(params, grammar=cons.grammar)
        try:
            yield from self._reply(
                sampler, params, prompt, marks, asked, messages, cons.calls_allowed, t_start, at, new_images
            )
        finally:
            sampler.close()

    def _reply(
        self,
        sampler: Sampler,
        params: SamplingParams,
        prompt: list[int],
        marks: list[int],
        asked: list[dict],
        messages: list[dict],
        calls: bool,
        t_start: float,
        at: dict | None = None,
        new_images: dict | None = None,
    ) -> Iterator[Event]:
        t0 = time.perf_counter()
        try:
            logits, u = self.cache.eval(prompt, marks=marks, images=at)
        finally:
            if at:
                self.model.projector.release(next(iter(at.values())))
        t1 = time.perf_counter()
        parser = ToolCallParser(self.tools) if calls else None
        text = _ReplyText(self.model, parser, self.enable_thinking, params.stop)
        spec = [0, 0, 0]  # steps, drafted, accepted
        t_first = None

        def record(finish: str) -> list[Event]:
            """Flush what is held back, and make the reply and the assistant message the chat's."""
            t2 = time.perf_counter()
            rest, msg = text.finish()
            if text.calls and finish == "stop":
                finish = "tool_calls"
            n = len(text.tokens)
            usage = Usage(
                u.prompt_tokens, u.reused_tokens, u.evaluated_tokens, n, u.restored_from, len(asked) - len(messages)
            )
            timings = Timings(
                (t1 - t0) * 1e3, (t2 - t1) * 1e3, u.evaluated_tokens, n, ((t_first or t2) - t_start) * 1e3
            )
            reply = Reply(
                msg["content"],
                msg.get("reasoning_content", ""),
                text.calls,
                text.bad,
                finish,
                usage,
                timings,
                text.tokens,
                Speculation(*spec) if self.speculative else None,
            )
            after = [*messages, msg]
            kept = {p.get("image") for m in after if isinstance(m.get("content"), list) for p in m["content"]}
            images = {k: v for k, v in {**self.images, **(new_images or {})}.items() if k in kept}
            self.messages, self.last, self.images = after, reply, images  # one statement: all or none
            return rest

        finish = "length"
        first = sampler.sample(self.model._ctx) if u.evaluated_tokens else sampler.sample_logits(logits)
        tokens = self._tokens(first, sampler, params.max_tokens, spec)
        try:
            for tok in tokens:
                t_first = t_first or time.perf_counter()
                if self.model.is_eog(tok):
                    finish = "stop"
                    break
                yield from text.feed(tok)
                if text.stopped:
                    finish = "stop"
                    break
                if len(text.tokens) >= params.max_tokens:
                    break
        except BaseException:  # GeneratorExit, KeyboardInterrupt, a failed decode: keep what came
            tokens.close()
            if text.tokens:
                record("interrupted")
            raise
        tokens.close()
        yield from record(finish)

    def _tokens(self, tok: int, sampler: Sampler, max_tokens: int, spec: list[int]) -> Iterator[int]:
        """The sampled tokens of the reply, one at a time, from the first one (tok); a token is
        evaluated only when the caller asks for the next one. spec: [steps, drafted, accepted],
        updated in place. Every token is drawn by sampler from the target's logits, exactly once,
        speculative or not: the same draws give the same reply."""
        cache, ctx, n = self.cache, self.model._ctx, 0
        while True:
            yield tok
            n += 1
            pos = len(cache.tokens)
            room = min(self.draft_max, max_tokens - n, self.model.n_ctx_seq - pos - 1)
            if self.speculative is None or room <= 0:
                cache.append(tok)
                tok = sampler.sample(ctx)
                continue
            drafts = self.model.mtp.draft(cache.seq_id, tok, pos, room, self.draft_p_min)
            verify = cache.extend([tok, *drafts])
            spec[0] += 1
            spec[1] += len(drafts)
            # drawn before anything is yielded: another chat on this model may decode meanwhile
            drawn = []
            for i in range(len(drafts) + 1):
                drawn.append(sampler.sample(ctx, i))
                if i == len(drafts) or drawn[i] != drafts[i]:
                    break
            cache.truncate(pos + len(drawn), verify[len(drawn) - 1])  # keep tok and the accepted drafts
            spec[2] += len(drawn) - 1
            for nxt in drawn[:-1]:
                n += 1
                yield nxt
            tok = drawn[-1]

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """The conversation, its tokens, the sequence's whole state (KV cache + recurrent) and the
        checkpoints, in one safetensors file (numbers and JSON only) sealed with a checksum,
        written atomically."""
        import numpy as np

        from . import statefile

        if self.images:
            raise ModelError(
                "saving a chat with images is not supported yet; reset the chat or save one without images"
            )
        self.cache.sync()  # after an interrupted turn: save a state that matches the tokens
        state = self.model.seq_state(self.cache.seq_id)
        tensors = {
            "state": np.frombuffer(state, dtype=np.uint8),
            "tokens": np.asarray(self.cache.tokens, dtype=np.int32),
            "logits": self.cache.last_logits(),
        }
        for pos, blob in self.cache.checkpoints.items():
            tensors[f"checkpoint.{pos}"] = np.frombuffer(blob, dtype=np.uint8)
        mtp = self.model.mtp
        if mtp is not None:  # the draft head's cache and the hidden rows it pairs with
            seq, n = self.cache.seq_id, len(self.cache.tokens)
            tensors["mtp.state"] = np.frombuffer(mtp.state(seq), dtype=np.uint8)
            if n and mtp.hidden(seq, n - 1) is not None:
                tensors["mtp.hidden"] = mtp.hidden(seq, n - 1)
            for pos, row in self.cache.checkpoint_hidden.items():
                tensors[f"mtp.checkpoint.{pos}"] = row
        meta = {
            "format": SAVED_CHAT_FORMATS[0],
            "model": self.model.identity(),
            "messages": json.dumps(self.messages),
            "tools": json.dumps(self.tools),
            "enable_thinking": json.dumps(self.enable_thinking),
        }
        path = Path(path)
        if not path.parent.is_dir():
            raise ModelError(f"cannot save to {path}: folder {path.parent} does not exist")
        try:
            statefile.write(path, tensors, meta)
        except OSError as e:
            raise ModelError(f"cannot save to {path}: {e.strerror or e}") from None

    def load(self, path: str | Path) -> None:
        """Resume a conversation saved with save() on the same model file, without re-evaluating
        it. A file that is damaged, edited, or from another model is refused (ModelError naming
        it) before anything changes: the conversation stays as it was."""
        path = Path(path)
        saved = _read_saved_chat(path, self.model)
        with self.cache.changing(0):  # cut short: the sequence is started over on the next turn
            self.model.set_seq_state(self.cache.seq_id, saved.state)
            self.cache.adopt(saved.tokens, saved.logits, saved.checkpoints, saved.hidden_rows)
            if self.model.mtp is not None:  # a chat saved without the head: drafts rebuild from the tokens
                self.model.mtp.set_state(self.cache.seq_id, saved.tokens, saved.mtp_state, saved.mtp_hidden)
            self.messages, self.tools, self.enable_thinking = saved.messages, saved.tools, saved.enable_thinking


SAVED_CHAT_FORMATS = ("qwen35-chat-2", "qwen35-chat-1")  # the current (sealed) one first


@dataclass
class _SavedChat:
    state: bytes
    tokens: list[int]
    logits: np.ndarray
    checkpoints: dict[int, bytes]
    hidden_rows: dict[int, np.ndarray]
    mtp_state: bytes | None
    mtp_hidden: np.ndarray | None
    messages: list[dict]
    tools: list | None
    enable_thinking: bool | None


def _read_saved_chat(path: Path, model: Model) -> _SavedChat:
    """A saved chat, every field checked against its checksum and against the model."""
    import numpy as np

    from . import statefile

    tensors, meta = statefile.read(path, SAVED_CHAT_FORMATS, "a saved chat")
    if meta.get("model") != model.identity():
        raise ModelError(f"{path} was saved with another model ({meta.get('model')!r:.80}); load it with that model")
    n_vocab, n_embd = model.n_vocab, model.n_embd
    state = statefile.tensor(tensors, "state", np.uint8, path)
    tokens = statefile.tensor(tensors, "tokens", np.int32, path)
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= n_vocab):
        raise ModelError(f"{path} is damaged: it holds token ids outside the model's vocabulary of {n_vocab}")
    if tokens.size > model.n_ctx_seq:
        raise ModelError(
            f"{path} holds {tokens.size} tokens, more than this context's {model.n_ctx_seq}; load the model "
            "with a larger n_ctx"
        )
    logits = tensors.get("logits")
    if logits is None or logits.dtype != np.float32 or logits.ndim != 1 or logits.size not in (0, n_vocab):
        raise ModelError(f"{path} is damaged: its logits do not fit the model's vocabulary of {n_vocab}")
    n = int(tokens.size)
    checkpoints = statefile.positions(tensors, "checkpoint.", n, path)
    rows = statefile.positions(tensors, "mtp.checkpoint.", n, path)
    mtp_state = statefile.tensor(tensors, "mtp.state", np.uint8, path, optional=True)
    mtp_hidden = statefile.tensor(tensors, "mtp.hidden", np.float32, path, size=n_embd, optional=True)
    for pos, t in checkpoints.items():
        statefile.tensor({f"checkpoint.{pos}": t}, f"checkpoint.{pos}", np.uint8, path)
    for pos, t in rows.items():
        statefile.tensor({f"mtp.checkpoint.{pos}": t}, f"mtp.checkpoint.{pos}", np.float32, path, size=n_embd)
    known = {"state", "tokens", "logits", "mtp.state", "mtp.hidden"}
    extra = [k for k in tensors if k not in known and not k.startswith(("checkpoint.", "mtp.checkpoint."))]
    if extra:
        raise ModelError(f"{path} is damaged: it has an unknown entry {extra[0]!r:.60}")
    try:
        messages = json.loads(meta["messages"])
        tools = json.loads(meta["tools"])
        thinking = json.loads(meta["enable_thinking"])
    except (KeyError, ValueError, TypeError) as e:
        raise ModelError(f"{path} is damaged: its conversation metadata does not read ({e!s:.60})") from None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
    ):
        raise ModelError(f"{path} is damaged: its messages are not a list of chat messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ModelError(f"{path} is damaged: its tools are not a list of tool definitions")
    if thinking is not None and not isinstance(thinking, bool):
        raise ModelError(f"{path} is damaged: enable_thinking is {thinking!r:.40}")
    try:  # the next turn builds its tool-call grammar from them
        structured._tool_functions(tools)
    except ValueError as e:
        raise ModelError(f"{path} is damaged: its tools do not read ({e!s:.60})") from None
    if messages:
        try:  # the next turn renders them: a message the template cannot take is refused now
            model.render(messages, enable_thinking=thinking, tools=tools or None)
        except Exception as e:
            raise ModelError(
                f"{path} is damaged: its messages do not render with the chat template ({e!s:.60})"
            ) from None
    return _SavedChat(
        state.tobytes(),
        [int(t) for t in tokens],
        logits,
        {p: t.tobytes() for p, t in checkpoints.items()},
        rows,
        None if mtp_state is None else mtp_state.tobytes(),
        mtp_hidden,
        messages,
        tools,
        thinking,
    )
