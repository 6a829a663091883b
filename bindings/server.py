"""An OpenAI-compatible HTTP server over the batching engine (``qwen35 serve``).

FastAPI + uvicorn; Server-Sent Events for streams. Endpoints: ``/v1/chat/completions``,
``/v1/completions``, ``/v1/responses``, ``/v1/models``, ``/health``, ``/metrics`` (Prometheus).

Qwen3.5 specifics: the reasoning comes as ``reasoning_content`` (messages and stream deltas);
thinking is on or off per request with ``chat_template_kwargs: {"enable_thinking": false}``
(default: the server's ``--reasoning``); tool calls are parsed from Qwen3.5's XML format into
OpenAI's form; sampling fields left out take the GGUF's recommended sampling. Every error is
OpenAI's error object; a request can only fail itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import secrets
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .chat import ContentDelta, ReasoningDelta
from .engine import Engine, Failed, Finished, Job, QueueFull, TokenInfo
from .sampling import SamplingParams
from .structured import TOOL_OPEN, constraint
from .toolcalls import MalformedToolCall, ToolCall

if TYPE_CHECKING:
    from .model import Model

log = logging.getLogger("qwen35.server")

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    reasoning: bool = True
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 16 << 20
    retry_after_s: int = 1


class APIError(Exception):
    """An error answered in OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """The sampling fields every endpoint takes (None: the GGUF's recommendation)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    repeat_penalty: float | None = None  # llama-server's name
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None


class ChatRequest(Sampling):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    model: str
    prompt: str | list[str] | list[int]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ResponsesRequest(Sampling):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ---------------------------------------------------------------- helpers
def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return x


def _new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _text_of(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                raise APIError(400, "this server has no vision projector; send text only", param=f"{where}[{i}]")
            else:
                raise APIError(400, f"unsupported content part {kind!r}", param=f"{where}[{i}]")
        return "".join(out)
    raise APIError(400, "content must be a string or a list of parts", param=where)


def _arguments(raw, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, json.JSONDecodeError):
        raise APIError(400, "tool call arguments must be a JSON object", param=where) from None
    if not isinstance(value, dict):
        raise APIError(400, "tool call arguments must be a JSON object", param=where)
    return value


def chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages in the form the Qwen3.5 template renders."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, "each message must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"unknown role {role!r}", param=f"messages[{i}].role")
        msg: dict = {"role": role, "content": _text_of(m.get("content"), f"messages[{i}].content")}
        if role == "assistant":
            if isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise APIError(400, "tool_calls must be a list", param=f"messages[{i}].tool_calls")
            if calls:
                msg["tool_calls"] = []
                for j, c in enumerate(calls):
                    f = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                        raise APIError(400, "a tool call needs function.name", param=f"messages[{i}].tool_calls[{j}]")
                    args = _arguments(f.get("arguments"), f"messages[{i}].tool_calls[{j}].function.arguments")
                    msg["tool_calls"].append({"type": "function", "function": {"name": f["name"], "arguments": args}})
        out.append(msg)
    return out


def _logit_bias(raw: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    out = {}
    for k, v in (raw or {}).items():
        try:
            t = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias key {k!r} is not a token id", param="logit_bias") from None
        if not 0 <= t < n_vocab:
            raise APIError(
                400, f"logit_bias: token {t} is not in the vocabulary (0..{n_vocab - 1})", param="logit_bias"
            )
        if not -100 <= v <= 100:
            raise APIError(400, "logit_bias values must be between -100 and 100", param="logit_bias")
        out[t] = -math.inf if v == -100 else float(v)
    return out


def _sampling(req: Sampling, max_tokens: int, n_vocab: int) -> SamplingParams:
    if req.n not in (None, 1):
        raise APIError(400, "n > 1 is not supported: send one request per completion", param="n")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    fields = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "seed": req.seed,
    }
    try:
        return SamplingParams(
            **fields, stop=stop, max_tokens=max_tokens, logit_bias=_logit_bias(req.logit_bias, n_vocab)
        )
    except (ValueError, TypeError) as e:
        name = str(e).split("=", 1)[0].split()[-1] if "=" in str(e) else None
        raise APIError(400, str(e), param=name) from None


def _sse(data) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\n".encode() + _sse({"type": kind, **data})


def _call_json(call: ToolCall, call_id: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }


def _token_logprob(info: TokenInfo) -> dict:
    def one(text: bytes, lp: float) -> dict:
        return {"token": text.decode("utf-8", "replace"), "logprob": lp, "bytes": list(text)}

    return {**one(info.text, info.logprob), "top_logprobs": [one(t, lp) for _, t, lp in info.top]}


# ---------------------------------------------------------------- the app
class Service:
    """What the routes share: the model, the engine, the configuration and the metrics."""

    def __init__(self, model: Model, engine: Engine, config: ServerConfig):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.model, self.engine, self.config = model, engine, config
        import llama_cpp

        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(model._vocab))
        self.ban_call = model.tokenize(TOOL_OPEN, special=True)
        self.assistant_start = model.tokenize("<|im_start|>assistant", special=True)
        self.started = int(time.time())
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "qwen35_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.m_prompt = Counter("qwen35_prompt_tokens", "Prompt tokens by how they were had", ["kind"], registry=r)
        self.m_completion = Counter("qwen35_completion_tokens", "Tokens generated", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.m_ttft = Histogram(
            "qwen35_time_to_first_token_seconds", "Submission to first token", buckets=buckets, registry=r
        )
        self.m_decode = Histogram(
            "qwen35_decode_tokens_per_second",
            "Decode speed per request",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.m_queue = Gauge("qwen35_queue_depth", "Requests waiting for a slot", registry=r)
        self.m_busy = Gauge("qwen35_busy_slots", "Slots running a request", registry=r)
        self.m_slots = Gauge("qwen35_slots", "Slots (sequences) of the model", registry=r)
        self.m_ckpt = Gauge(
            "qwen35_checkpoint_bytes", "Bytes of recurrent-state checkpoints held by the slots", registry=r
        )
        self.m_saved = Gauge("qwen35_saved_state_bytes", "Bytes of conversation states kept in host RAM", registry=r)
        self.m_slots.set(engine.n_slots)
        self.m_steps = Gauge("qwen35_decode_steps", "llama_decode calls of the engine", ["shared"], registry=r)
        self.m_restored = Gauge(
            "qwen35_restored_conversations", "Conversations restored from the state cache", ["source"], registry=r
        )

    def observe(self, fin: Finished) -> None:
        self.m_prompt.labels("reused").inc(fin.cached_tokens)
        self.m_prompt.labels("evaluated").inc(fin.evaluated_tokens)
        self.m_completion.inc(fin.completion_tokens)
        self.m_ttft.observe(fin.first_token_ms / 1e3)
        if fin.completion_tokens > 1 and fin.decode_ms > 0:
            self.m_decode.observe((fin.completion_tokens - 1) / (fin.decode_ms / 1e3))

    def refresh_gauges(self) -> None:
        self.m_queue.set(self.engine.waiting)
        self.m_busy.set(self.engine.busy)
        self.m_ckpt.set(self.engine.checkpoint_bytes)
        self.m_saved.set(self.engine.saved_bytes)
        c = self.engine.counters
        self.m_steps.labels("yes").set(c["shared_steps"])
        self.m_steps.labels("no").set(c["steps"] - c["shared_steps"])
        self.m_restored.labels("ram").set(c["restored_ram"])
        self.m_restored.labels("disk").set(c["restored_disk"])

    # ------------------------------------------------------------ requests
    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has {self.config.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def budget(self, prompt_tokens: int, asked: int | None, field: str) -> int:
        limit = self.model.n_ctx_seq
        if asked is not None and asked < 1:
            raise APIError(400, f"{field} must be at least 1", param=field)
        room = limit - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) + {field} ({asked if asked is not None else 1}) exceeds "
                f"the {limit}-token context of a slot; shorten the conversation or lower {field}",
                param="messages" if field != "max_tokens" or asked is None else field,
                code="context_length_exceeded",
            )
        return asked if asked is not None else room

    def chat_job(
        self,
        messages: list[dict],
        req: Sampling,
        *,
        tools,
        tool_choice,
        parallel_tool_calls: bool,
        response_format,
        kwargs: dict | None,
        max_tokens: int | None,
        max_field: str,
        logprobs: int | None,
        emit,
    ) -> Job:
        thinking = self.config.reasoning
        if kwargs and "enable_thinking" in kwargs:
            thinking = bool(kwargs["enable_thinking"])
        if tools is not None and not isinstance(tools, list):
            raise APIError(400, "tools must be a list", param="tools")
        try:
            cons = constraint(
                response_format, tools, tool_choice, thinking=thinking, parallel_tool_calls=parallel_tool_calls
            )
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0].split(":")[0]) from None
        try:
            text = self.model.render(messages, enable_thinking=thinking, tools=tools or None)
        except Exception as e:
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        prompt = self.model.tokenize(text)
        budget = self.budget(len(prompt), max_tokens, max_field)
        params = _sampling(req, budget, self.n_vocab)
        if not cons.calls_allowed and len(self.ban_call) == 1:
            params = replace(params, logit_bias={**params.logit_bias, self.ban_call[0]: -math.inf})
        n = len(self.assistant_start)
        marks = [i for i in range(len(prompt) - n + 1) if prompt[i : i + n] == self.assistant_start]
        return Job(
            prompt,
            params.resolve(self.model.recommended_sampling),
            emit,
            marks=marks,
            grammar=cons.grammar,
            parse=True,
            thinking=thinking,
            tools=tools or None,
            calls_allowed=cons.calls_allowed,
            logprobs=logprobs,
        )

    async def run(self, job: Job, queue: asyncio.Queue) -> None:
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise APIError(
                503, f"the server is busy ({e}); retry shortly", type_="server_error", code="server_busy"
            ) from None
        finally:
            self.refresh_gauges()


def create_app(model: Model, engine: Engine, config: ServerConfig) -> FastAPI:
    svc = Service(model, engine, config)
    app = FastAPI(title="qwen35 serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    def error(e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(config.retry_after_s)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error(APIError(400, f"{param}: {msg}" if param else msg, param=param))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        if path.startswith("/v1") and config.api_key is not None:
            got = request.headers.get("authorization", "")
            want = f"Bearer {config.api_key}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                resp = error(
                    APIError(
                        401,
                        "a valid API key is needed: Authorization: Bearer KEY",
                        type_="authentication_error",
                        code="invalid_api_key",
                    )
                )
                _log(request, resp.status_code, t0)
                return resp
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.max_body_bytes):
            resp = error(
                APIError(413, f"the request body is over {config.max_body_bytes} bytes", code="request_too_large")
            )
            _log(request, resp.status_code, t0)
            return resp
        try:
            resp = await call_next(request)
        except Exception:
            log.exception("request failed")
            resp = error(APIError(500, "internal error", type_="server_error"))
        _log(request, resp.status_code, t0)
        svc.m_requests.labels(path, str(resp.status_code)).inc()
        return resp

    async def parse(request: Request, kind):
        body = await request.body()
        if len(body) > config.max_body_bytes:
            raise APIError(413, f"the request body is over {config.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body, parse_constant=_not_json, parse_float=_finite)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        except ValueError as e:  # NaN / Infinity: Python's json takes them, JSON has no such numbers
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise APIError(400, "the request body nests too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first["loc"]) or None
            raise APIError(400, f"{param}: {first['msg']}", param=param) from None

    def bridge():
        """A queue the engine thread fills (thread-safe) and a job's emit function."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            if isinstance(ev, Finished):  # counted here: a cancelled request finishes with nobody waiting
                svc.observe(ev)
            # a closed loop: the request's event loop is gone, so is its client: nobody to tell
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        return queue, emit

    async def events(job: Job, queue: asyncio.Queue, request: Request):
        """The job's events until it ends; a client that goes away cancels it."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return
                    continue
                yield ev
                if isinstance(ev, (Finished, Failed)):
                    svc.refresh_gauges()
                    return
        finally:
            job.cancel()  # a no-op when it finished; else (disconnect, error) the engine stops it

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        svc.refresh_gauges()
        return {"status": "ok", "slots": engine.n_slots, "busy": engine.busy, "queue": engine.waiting}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        svc.refresh_gauges()
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": svc.started, "owned_by": "qwen35"}],
        }

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        svc.check_model(name)
        return {"id": name, "object": "model", "created": svc.started, "owned_by": "qwen35"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatRequest)
        svc.check_model(req.model)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
        queue, emit = bridge()
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        job = svc.chat_job(
            chat_messages(req.messages),
            req,
            tools=req.tools,
            tool_choice=req.tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
            response_format=req.response_format,
            kwargs=req.chat_template_kwargs,
            max_tokens=max_tokens,
            max_field=field,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            emit=emit,
        )
        await svc.run(job, queue)
        cid, created = _new_id("chatcmpl-"), int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _chat_stream(job, queue, request, cid, created, include_usage),
                media_type="text/event-stream",
            )
        content, reasoning, calls, lps, fin = [], [], [], [], None
        async for ev in events(job, queue, request):
            if isinstance(ev, ContentDelta):
                content.append(ev.text)
            elif isinstance(ev, ReasoningDelta):
                reasoning.append(ev.text)
            elif isinstance(ev, ToolCall):
                calls.append(_call_json(ev, _new_id("call_")))
            elif isinstance(ev, TokenInfo):
                lps.append(_token_logprob(ev))
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, type_="server_error")
            elif isinstance(ev, Finished):
                fin = ev
        if fin is None:  # the client went away
            return Response(status_code=499)
        msg = {"role": "assistant", "content": fin.message.get("content") or (None if calls else "")}
        if fin.message.get("reasoning_content"):
            msg["reasoning_content"] = fin.message["reasoning_content"]
        if calls:
            msg["tool_calls"] = calls
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": msg,
                    "finish_reason": fin.finish_reason,
                    "logprobs": {"content": lps} if req.logprobs else None,
                }
            ],
            "usage": _usage(fin),
        }

    async def _chat_stream(job, queue, request, cid, created, include_usage):
        def chunk(delta: dict, finish=None, logprobs=None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": config.model_name,
                    "choices": [choice],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        n_calls = 0
        async for ev in events(job, queue, request):
            if isinstance(ev, ContentDelta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, ReasoningDelta):
                yield chunk({"reasoning_content": ev.text})
            elif isinstance(ev, ToolCall):
                call = _call_json(ev, _new_id("call_"))
                head = {"index": n_calls, "id": call["id"], "type": "function"}
                yield chunk({"tool_calls": [{**head, "function": {"name": ev.name, "arguments": ""}}]})
                yield chunk(
                    {"tool_calls": [{"index": n_calls, "function": {"arguments": call["function"]["arguments"]}}]}
                )
                n_calls += 1
            elif isinstance(ev, MalformedToolCall):
                yield chunk({"content": ev.raw})
            elif isinstance(ev, TokenInfo):
                yield chunk({}, logprobs={"content": [_token_logprob(ev)]})
            elif isinstance(ev, Failed):
                yield _sse({"error": {"message": ev.message, "type": "server_error", "param": None, "code": None}})
                return
            elif isinstance(ev, Finished):
                yield chunk({}, finish=ev.finish_reason)
                if include_usage:
                    yield _sse(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": config.model_name,
                            "choices": [],
                            "usage": _usage(ev),
                        }
                    )
                yield b"data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        svc.check_model(req.model)
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
            if len(req.prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            text = req.prompt[0]
            prompt = model.tokenize(text)
        elif isinstance(req.prompt, list):
            prompt = list(req.prompt)
            if not prompt or not all(0 <= t < svc.n_vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in 0..{svc.n_vocab - 1}", param="prompt")
            text = ""
        else:
            text, prompt = req.prompt, model.tokenize(req.prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
        budget = svc.budget(len(prompt), req.max_tokens, "max_tokens")
        params = _sampling(req, budget, svc.n_vocab)
        queue, emit = bridge()
        job = Job(prompt, params.resolve(model.recommended_sampling), emit, parse=False, logprobs=req.logprobs)
        await svc.run(job, queue)
        cid, created = _new_id("cmpl-"), int(time.time())
        prefix = text if req.echo else ""

        def lp_json(infos: list[TokenInfo]):
            if req.logprobs is None:
                return None
            return {
                "tokens": [i.text.decode("utf-8", "replace") for i in infos],
                "token_logprobs": [i.logprob for i in infos],
                "top_logprobs": [{t.decode("utf-8", "replace"): lp for _, t, lp in i.top} for i in infos],
                "text_offset": [],
            }

        if req.stream:

            async def stream():
                def chunk(text_: str, finish=None, lps=None):
                    return _sse(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": config.model_name,
                            "choices": [{"index": 0, "text": text_, "finish_reason": finish, "logprobs": lps}],
                        }
                    )

                if prefix:
                    yield chunk(prefix)
                async for ev in events(job, queue, request):
                    if isinstance(ev, str):
                        yield chunk(ev)
                    elif isinstance(ev, TokenInfo):
                        yield chunk("", lps=lp_json([ev]))
                    elif isinstance(ev, Failed):
                        yield _sse({"error": {"message": ev.message, "type": "server_error"}})
                        return
                    elif isinstance(ev, Finished):
                        yield chunk("", finish=ev.finish_reason)
                        if req.stream_options and req.stream_options.include_usage:
                            yield _sse(
                                {
                                    "id": cid,
                                    "object": "text_completion",
                                    "created": created,
                                    "model": config.model_name,
                                    "choices": [],
                                    "usage": _usage(ev),
                                }
                            )
                        yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        parts, infos, fin = [], [], None
        async for ev in events(job, queue, request):
            if isinstance(ev, str):
                parts.append(ev)
            elif isinstance(ev, TokenInfo):
                infos.append(ev)
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, type_="server_error")
            elif isinstance(ev, Finished):
                fin = ev
        if fin is None:
            return Response(status_code=499)
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": prefix + "".join(parts),
                    "finish_reason": fin.finish_reason,
                    "logprobs": lp_json(infos),
                }
            ],
            "usage": _usage(fin),
        }

    @app.post("/v1/responses")
    async def responses(request: Request):
        req = await parse(request, ResponsesRequest)
        svc.check_model(req.model)
        messages = responses_messages(req)
        tools = responses_tools(req.tools)
        choice = req.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
            choice = {"type": "function", "function": {"name": choice["name"]}}
        fmt = (req.text or {}).get("format")
        response_format = None
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")},
            }
        elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
            response_format = {"type": "json_object"}
        queue, emit = bridge()
        job = svc.chat_job(
            messages,
            req,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=req.parallel_tool_calls,
            response_format=response_format,
            kwargs=req.chat_template_kwargs,
            max_tokens=req.max_output_tokens,
            max_field="max_output_tokens",
            logprobs=None,
            emit=emit,
        )
        await svc.run(job, queue)
        rid, created = _new_id("resp_"), int(time.time())
        shell = {
            "id": rid,
            "object": "response",
            "created_at": created,
            "model": config.model_name,
            "instructions": req.instructions,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "metadata": {},
            "error": None,
            "incomplete_details": None,
            "text": req.text or {"format": {"type": "text"}},
        }
        if req.stream:
            return StreamingResponse(_responses_stream(job, queue, request, shell), media_type="text/event-stream")
        reasoning, content, calls, fin = [], [], [], None
        async for ev in events(job, queue, request):
            if isinstance(ev, ReasoningDelta):
                reasoning.append(ev.text)
            elif isinstance(ev, ContentDelta):
                content.append(ev.text)
            elif isinstance(ev, ToolCall):
                calls.append(ev)
            elif isinstance(ev, Failed):
                raise APIError(500, ev.message, type_="server_error")
            elif isinstance(ev, Finished):
                fin = ev
        if fin is None:
            return Response(status_code=499)
        output = []
        if fin.message.get("reasoning_content"):
            output.append(_reasoning_item(_new_id("rs_"), fin.message["reasoning_content"]))
        if fin.message.get("content") or not calls:
            output.append(_message_item(_new_id("msg_"), fin.message.get("content", "")))
        output += [_call_item(_new_id("fc_"), _new_id("call_"), c) for c in calls]
        return {**shell, **_response_status(fin), "output": output, "usage": _response_usage(fin)}

    async def _responses_stream(job, queue, request, shell):
        seq = 0

        def emit(kind: str, data: dict) -> bytes:
            nonlocal seq
            seq += 1
            return _event(kind, {"sequence_number": seq, **data})

        yield emit("response.created", {"response": {**shell, "status": "in_progress", "output": []}})
        yield emit("response.in_progress", {"response": {**shell, "status": "in_progress", "output": []}})
        output: list[dict] = []
        open_item: dict | None = None  # the reasoning or message item text is streaming into
        texts: list[str] = []

        def close_open():
            nonlocal open_item
            if open_item is None:
                return []
            item, idx, text = open_item, len(output), "".join(texts)
            out = []
            if item["type"] == "reasoning":
                item = _reasoning_item(item["id"], text)
                out.append(
                    emit(
                        "response.reasoning_text.done",
                        {"item_id": item["id"], "output_index": idx, "content_index": 0, "text": text},
                    )
                )
            else:
                item = _message_item(item["id"], text)
                part = item["content"][0]
                out.append(
                    emit(
                        "response.output_text.done",
                        {"item_id": item["id"], "output_index": idx, "content_index": 0, "text": text, "logprobs": []},
                    )
                )
                out.append(
                    emit(
                        "response.content_part.done",
                        {"item_id": item["id"], "output_index": idx, "content_index": 0, "part": part},
                    )
                )
            out.append(emit("response.output_item.done", {"output_index": idx, "item": item}))
            output.append(item)
            open_item = None
            texts.clear()
            return out

        def open_new(kind: str):
            nonlocal open_item
            idx = len(output)
            if kind == "reasoning":
                open_item = {"type": "reasoning", "id": _new_id("rs_"), "summary": [], "content": []}
                return [emit("response.output_item.added", {"output_index": idx, "item": open_item})]
            open_item = {
                "type": "message",
                "id": _new_id("msg_"),
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return [
                emit("response.output_item.added", {"output_index": idx, "item": open_item}),
                emit(
                    "response.content_part.added",
                    {"item_id": open_item["id"], "output_index": idx, "content_index": 0, "part": part},
                ),
            ]

        async for ev in events(job, queue, request):
            if isinstance(ev, (ReasoningDelta, ContentDelta)):
                kind = "reasoning" if isinstance(ev, ReasoningDelta) else "message"
                if open_item is None or open_item["type"] != kind:
                    for b in close_open() + open_new(kind):
                        yield b
                texts.append(ev.text)
                name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
                extra = {} if kind == "reasoning" else {"logprobs": []}
                yield emit(
                    name,
                    {
                        "item_id": open_item["id"],
                        "output_index": len(output),
                        "content_index": 0,
                        "delta": ev.text,
                        **extra,
                    },
                )
            elif isinstance(ev, ToolCall):
                for b in close_open():
                    yield b
                item = _call_item(_new_id("fc_"), _new_id("call_"), ev)
                idx = len(output)
                yield emit(
                    "response.output_item.added",
                    {"output_index": idx, "item": {**item, "arguments": "", "status": "in_progress"}},
                )
                yield emit(
                    "response.function_call_arguments.delta",
                    {"item_id": item["id"], "output_index": idx, "delta": item["arguments"]},
                )
                yield emit(
                    "response.function_call_arguments.done",
                    {"item_id": item["id"], "output_index": idx, "arguments": item["arguments"], "name": item["name"]},
                )
                yield emit("response.output_item.done", {"output_index": idx, "item": item})
                output.append(item)
            elif isinstance(ev, Failed):
                yield emit("error", {"code": "server_error", "message": ev.message, "param": None})
                return
            elif isinstance(ev, Finished):
                for b in close_open():
                    yield b
                status = _response_status(ev)
                kind = "response.completed" if status["status"] == "completed" else "response.incomplete"
                yield emit(kind, {"response": {**shell, **status, "output": output, "usage": _response_usage(ev)}})

    if config.cors_origins:  # added last, so outermost: it answers browsers' preflights itself
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    return app


def responses_tools(tools) -> list[dict] | None:
    """Responses-API function tools ({"type": "function", "name", "parameters"}) in chat form."""
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise APIError(400, "only function tools are supported", param=f"tools[{i}]")
        if "function" in t:
            out.append(t)
            continue
        fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
        if "name" not in fn:
            raise APIError(400, "a function tool needs a name", param=f"tools[{i}].name")
        out.append({"type": "function", "function": fn})
    return out


def responses_messages(req: ResponsesRequest) -> list[dict]:
    """The Responses API's input (text, or items) as chat messages."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role == "developer":
                role = "system"
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"unknown role {role!r}", param=f"{where}.role")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            args = _arguments(item.get("arguments"), f"{where}.arguments")
            call = {"type": "function", "function": {"name": item.get("name"), "arguments": args}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not last.get("_closed"):
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            messages.append({"role": "tool", "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            text = "".join(p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict))
            messages.append({"role": "assistant", "content": "", "reasoning_content": text})
        else:
            raise APIError(400, f"unsupported input item type {kind!r}", param=f"{where}.type")
    # a reasoning item followed by the message (or calls) it belongs to: one assistant turn
    merged: list[dict] = []
    for m in messages:
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and prev["role"] == "assistant"
            and m["role"] == "assistant"
            and not prev.get("content")
            and not prev.get("tool_calls")
        ):
            merged[-1] = {**m, "reasoning_content": prev.get("reasoning_content", "")}
        else:
            merged.append(m)
    return merged


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _message_item(item_id: str, text: str) -> dict:
    return {
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(item_id: str, call_id: str, call: ToolCall) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": call.name,
        "arguments": json.dumps(call.arguments, ensure_ascii=False),
        "status": "completed",
    }


def _response_status(fin: Finished) -> dict:
    if fin.finish_reason == "length":
        return {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    return {"status": "completed", "incomplete_details": None}


def _usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


def _response_usage(fin: Finished) -> dict:
    return {
        "input_tokens": fin.prompt_tokens,
        "input_tokens_details": {"cached_tokens": fin.cached_tokens},
        "output_tokens": fin.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def _log(request, status: int, t0: float) -> None:
    log.info(
        "%s %s %s %d %.0f ms",
        request.client.host if request.client else "-",
        request.method,
        request.url.path,
        status,
        (time.perf_counter() - t0) * 1e3,
    )


def serve(
    model: Path = typer.Argument(..., help="A Qwen3.5 GGUF file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: str = typer.Option(
        None, "--api-key", envvar="QWEN35_API_KEY", help="Require Authorization: Bearer KEY on /v1 routes."
    ),
    parallel: int = typer.Option(4, "--parallel", help="Conversations decoded at once (slots)."),
    n_ctx: int = typer.Option(8192, "--ctx", help="Context of each slot, in tokens."),
    n_gpu_layers: int = typer.Option(0, "--gpu-layers", "-ngl", help="Layers to offload to the GPU."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    cache_ram: int = typer.Option(
        1024, "--cache-ram", help="MiB of host RAM for the states of conversations that lost their slot."
    ),
    cache_dir: Path = typer.Option(
        None, "--cache-dir", help="Also keep those states here; a restarted server continues from them."
    ),
    reasoning: str = typer.Option(
        "on",
        "--reasoning",
        help="Thinking when a request does not say (chat_template_kwargs.enable_thinking).",
        metavar="on|off",
    ),
    alias: str = typer.Option(None, "--alias", help="Model name clients use (default: the file's stem)."),
    cors_origin: list[str] = typer.Option(
        None, "--cors-origin", help="Allow browser requests from this origin (repeatable)."
    ),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the slots before 503."),
    max_body: int = typer.Option(16, "--max-body", help="Largest request body, MiB."),
) -> None:
    """Serve a Qwen3.5 GGUF over the OpenAI API (chat completions, completions, responses)."""
    import uvicorn

    from .model import Model, ModelError

    if reasoning not in ("on", "off"):
        raise typer.BadParameter("use on or off", param_hint="--reasoning")
    for name, value, low in (("--parallel", parallel, 1), ("--ctx", n_ctx, 64), ("--max-queue", max_queue, 0)):
        if value < low:
            raise typer.BadParameter(f"must be at least {low}", param_hint=name)
    if cache_dir is not None and cache_dir.exists() and not cache_dir.is_dir():
        raise ModelError(f"--cache-dir {cache_dir} is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    m = Model.load(
        model, n_ctx=n_ctx * parallel, n_seq_max=parallel, n_gpu_layers=n_gpu_layers, n_threads=threads or None
    )
    engine = Engine(m, max_queue=max_queue, cache_ram=cache_ram << 20, cache_dir=cache_dir)
    config = ServerConfig(
        model_name=alias or m.path.name.removesuffix(".gguf"),
        api_key=api_key or None,
        reasoning=reasoning == "on",
        cors_origins=tuple(cors_origin or ()),
        max_body_bytes=max_body << 20,
    )
    app = create_app(m, engine, config)
    engine.start()
    log.info(
        "serving %s as %r on http://%s:%d/v1 (%d slots x %d tokens, thinking %s%s)",
        m.path.name,
        config.model_name,
        host,
        port,
        parallel,
        m.n_ctx_seq,
        reasoning,
        ", API key required" if api_key else "",
    )
    from qwen35.errors import Interrupted

    def interrupted(signum, frame):
        raise Interrupted()

    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again with the
    # handlers it found: these, so that the engine still writes its states before the exit (0)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except (KeyboardInterrupt, Interrupted):
        pass
    finally:
        engine.stop()
        m.close()
        log.info("stopped")
