"""``qwen35 chat MODEL.gguf``: an interactive terminal chat, or one reply with ``-p``."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

HELP = """commands: /image FILE  /think on|off  /reset  /save FILE  /load FILE  /stats  /help  /quit
multi-line input: end a line with \\ to continue it, or enclose lines in triple quotes (\"\"\")
Ctrl-C stops a reply (what came is kept); Ctrl-D or /quit leaves"""
OVERFLOW = {"error": "error", "drop-oldest": "drop_oldest"}


def _print_notes() -> None:
    """The bindings' notes (logger "qwen35", e.g. -ngl on a CPU-only build) as one stderr line each."""
    log = logging.getLogger("qwen35")
    if not any(getattr(h, "qwen35_notes", False) for h in log.handlers):
        notes = logging.StreamHandler(sys.stderr)
        notes.setFormatter(logging.Formatter("note: %(message)s"))
        notes.qwen35_notes = True
        log.addHandler(notes)
        log.propagate = False


def chat(
    model: Path = typer.Argument(..., help="A Qwen3.5 GGUF file."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Reply to this one message and exit."),
    system: str = typer.Option(None, "--system", help="System message."),
    think: bool = typer.Option(True, "--think/--no-think", help="Let the model reason before answering."),
    n_ctx: int = typer.Option(8192, "--ctx", help="Context size in tokens."),
    n_gpu_layers: int = typer.Option(0, "--gpu-layers", "-ngl", help="Layers to offload to the GPU."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    temperature: float = typer.Option(
        None,
        "--temp",
        help="Sampling temperature; 0 = greedy. [default: the "
        "GGUF's recommended sampling, else llama.cpp's defaults; likewise below]",
    ),
    top_k: int = typer.Option(None, "--top-k", help="Keep the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(None, "--top-p", help="Keep the most likely tokens up to this probability mass."),
    min_p: float = typer.Option(
        None, "--min-p", help="Drop tokens below this fraction of the top token's probability."
    ),
    presence_penalty: float = typer.Option(
        0.0,
        "--presence-penalty",
        help="Subtracted from the logit of every token the reply already has "
        "(Qwen suggests up to 1.5 against repetition).",
    ),
    frequency_penalty: float = typer.Option(
        0.0, "--frequency-penalty", help="Subtracted once per earlier occurrence in the reply."
    ),
    repeat_penalty: float = typer.Option(None, "--repeat-penalty", help="Divides repeated tokens' logits (1 = off)."),
    repeat_last_n: int = typer.Option(
        None, "--repeat-last-n", help="How many of the reply's last tokens the penalties see (-1 = all)."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the draws (same seed, same reply). [default: random]"),
    stop: list[str] = typer.Option(None, "--stop", help="End the reply at this text (repeatable)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", help="Most tokens per reply."),
    as_json: bool = typer.Option(False, "--json", help="With -p: print the reply as JSON."),
    speculative: str = typer.Option(
        None,
        "--speculative",
        metavar="mtp",
        help="Speculative decoding with the GGUF's MTP head (same output, drafts verified by the model).",
    ),
    draft_max: int = typer.Option(3, "--draft-max", help="With --speculative: most tokens drafted per step."),
    draft_p_min: float = typer.Option(
        0.0, "--draft-p-min", help="With --speculative: stop a draft below this head probability."
    ),
    overflow: str = typer.Option(
        "error",
        "--overflow",
        metavar="error|drop-oldest",
        help="When the conversation outgrows --ctx: refuse the message, or drop the oldest exchanges (with a note).",
    ),
    image: list[Path] = typer.Option(
        None, "--image", help="An image for the first message (repeatable; in the chat: /image FILE)."
    ),
    mmproj: Path = typer.Option(
        None,
        "--mmproj",
        help="The vision projector GGUF (default with --image: the one mmproj-*.gguf beside the model).",
    ),
) -> None:
    """Chat with a Qwen3.5 GGUF; each turn evaluates only what is new."""
    from rich.console import Console

    from qwen35.errors import Interrupted

    from .chat import Chat, ContextOverflow
    from .model import Model, ModelError, SamplingParams
    from .vision import ImageError, load_image

    try:
        sampling = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repeat_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            penalty_last_n=repeat_last_n,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if speculative not in (None, "mtp"):
        raise typer.BadParameter(
            f"{speculative!r} is not a speculative mode; use --speculative mtp", param_hint="--speculative"
        )
    if draft_max < 1:
        raise typer.BadParameter(f"{draft_max} drafts per step; use 1 or more", param_hint="--draft-max")
    if overflow not in OVERFLOW:
        raise typer.BadParameter(f"{overflow!r} is not a policy; use error or drop-oldest", param_hint="--overflow")
    out = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    spec = speculative is not None
    _print_notes()
    pending = [load_image(p) for p in image or ()]  # decoded now: a bad file stops here, before loading
    if mmproj is None and pending:
        mmproj = _find_projector(model)
    with Model.load(
        model,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        n_threads=threads or None,
        load_mtp=spec,
        n_rs_seq=max(draft_max, 1) if spec else None,
        mmproj=mmproj,
    ) as m:
        session = Chat(
            m,
            system=system,
            enable_thinking=think,
            speculative=speculative,
            draft_max=draft_max,
            draft_p_min=draft_p_min,
            overflow=OVERFLOW[overflow],
            sampling=sampling,
        )
        if prompt is not None:
            try:
                _turn(session, prompt, sampling, out, err, quiet=as_json, images=pending)
            except ContextOverflow as e:
                raise ModelError(_overflow_line(e, interactive=False)) from None
            except (Interrupted, KeyboardInterrupt):
                out.print()
                print("error: interrupted", file=sys.stderr)
                raise typer.Exit(130) from None
            if as_json:
                print(json.dumps({**_reply_json(session.last), "sampling": _sampling_json(session.sampling(sampling))}))
            return
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        err.print(
            f"{m.path.name}: {m.n_ctx} tokens of context, thinking {'on' if think else 'off'}, "
            f"images {'on (' + m.projector.path.name + ')' if m.projector else 'off (--mmproj)'}, "
            f"sampling: {session.sampling(sampling).describe()}. {HELP}",
            style="dim",
            markup=False,
        )
        if pending:
            err.print(f"{len(pending)} image(s) go with your first message", style="dim")
        while True:
            try:
                text = _read_message()
            except EOFError:
                out.print()
                return
            except (Interrupted, KeyboardInterrupt):  # at the prompt: the line goes, the chat stays (as in a shell)
                out.print()
                err.print("(Ctrl-D or /quit leaves)", style="dim")
                continue
            if text is None:
                continue
            last = session.last
            try:
                if text.startswith("/image"):
                    _attach(session, text, pending, err)
                elif text.startswith("/"):
                    if _command(session, text, err):
                        return
                else:
                    _turn(session, text, sampling, out, err, images=pending)
                    pending = []  # sent (a refused message keeps them for the next try)
            except ContextOverflow as e:
                err.print(f"error: {_overflow_line(e, interactive=True)}", style="red", markup=False)
            except (ModelError, ImageError) as e:
                err.print(f"error: {e}", style="red", markup=False)
            except (Interrupted, KeyboardInterrupt):
                out.print()
                if text.startswith("/"):
                    err.print("[interrupted]", style="dim", markup=False)
                else:
                    kept = session.last is not last  # the chat recorded the reply so far
                    err.print(
                        "[stopped: the reply so far is kept]" if kept else "[interrupted: the message was not sent]",
                        style="dim",
                        markup=False,
                    )


@contextmanager
def _signals_held():
    """Ctrl-C while a piece of the reply is being written arrives just after it: raised inside
    rich's write, it would leave the text in rich's buffer to be written a second time."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    try:  # a Ctrl-C already pending is raised by the call that blocks: the finally must unblock
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _overflow_line(e, interactive: bool) -> str:
    """A ContextOverflow in the command's own terms."""
    fixes = "/reset, a larger --ctx" if interactive else "a larger --ctx"
    return (
        f"the conversation ({e.tokens} tokens) + a reply of up to {e.max_tokens} tokens does not fit the "
        f"{e.limit}-token context, so the message was not sent; use {fixes}, a lower --max-tokens"
        + (", or --overflow drop-oldest" if interactive else "")
    )


def _find_projector(model: Path) -> Path:
    """The one mmproj-*.gguf beside model (qwen35-convert writes it there)."""
    from .vision import ImageError

    found = sorted(model.resolve().parent.glob("mmproj-*.gguf"))
    if len(found) != 1:
        where = f"{len(found)} mmproj-*.gguf files" if found else "no mmproj-*.gguf"
        raise ImageError(f"--image needs the vision projector: {model.parent} has {where}; pass --mmproj FILE")
    return found[0]


def _attach(session, text: str, pending: list, err) -> None:
    """/image FILE: decode it now; it goes with the next message."""
    from .vision import ImageError, load_image

    path = text.partition(" ")[2].strip()
    if not path:
        raise ImageError("/image needs a file: /image cat.png")
    if session.model.projector is None:
        raise ImageError("this model was loaded without a vision projector; restart with --mmproj FILE")
    im = load_image(Path(path).expanduser())
    pending.append(im)
    err.print(f"image {path} ({im.width}x{im.height}) goes with your next message", style="dim", markup=False)


def _turn(session, text: str | None, sampling, out, err, quiet: bool = False, images=None) -> None:
    """One reply, streamed to the terminal: reasoning dimmed, tool calls in colour."""
    from contextlib import closing

    from .chat import ContentDelta, ReasoningDelta
    from .toolcalls import MalformedToolCall, ToolCall

    shown_reasoning = False
    with closing(session.stream(text, sampling, images=images or None)) as events:  # Ctrl-C: the chat keeps what came
        for e in events:
            if quiet:
                continue
            with _signals_held():
                if isinstance(e, ReasoningDelta):
                    out.print(e.text, end="", style="dim", markup=False)
                    shown_reasoning = True
                elif isinstance(e, ContentDelta):
                    if shown_reasoning:
                        out.print()
                        shown_reasoning = False
                    out.print(e.text, end="", markup=False)
                elif isinstance(e, ToolCall):
                    out.print(
                        f"\n[tool call] {e.name}({json.dumps(e.arguments, ensure_ascii=False)})",
                        style="cyan",
                        markup=False,
                    )
                elif isinstance(e, MalformedToolCall):
                    out.print(f"\n[malformed tool call: {e.reason}]", style="red", markup=False)
    if not quiet:
        out.print()
    dropped = session.last.usage.dropped_messages
    if dropped:
        err.print(
            f"note: the {dropped} oldest messages were left out to fit the {session.model.n_ctx_seq}-token context",
            style="dim",
        )


def _reply_json(r) -> dict:
    return {
        "content": r.content,
        "reasoning": r.reasoning,
        "finish_reason": r.finish_reason,
        "tool_calls": [c.as_message_call() for c in r.tool_calls],
        "usage": r.usage.__dict__,
        "speculation": r.speculation and {**r.speculation.__dict__, "acceptance_rate": r.speculation.acceptance_rate},
        "timings": {
            **r.timings.__dict__,
            "prefill_tok_s": r.timings.prefill_tok_s,
            "decode_tok_s": r.timings.decode_tok_s,
        },
    }


def _sampling_json(p) -> dict:
    return {k: v for k, v in p.__dict__.items() if k not in ("grammar", "logit_bias")} | {"stop": list(p.stop)}


def _command(session, text: str, err) -> bool:
    """A /command; True when the chat should end."""
    cmd, _, arg = text.partition(" ")
    arg = arg.strip()
    if cmd in ("/quit", "/exit"):
        return True
    if cmd == "/help":
        err.print(HELP, markup=False)
    elif cmd == "/think" and arg in ("on", "off"):
        session.enable_thinking = arg == "on"
        err.print(f"thinking {arg}", style="dim")
    elif cmd == "/reset":
        session.reset()
        err.print("conversation cleared", style="dim")
    elif cmd == "/save" and arg:
        session.save(arg)
        err.print(f"saved to {arg}", style="dim", markup=False)
    elif cmd == "/load" and arg:
        session.load(arg)
        err.print(
            f"loaded {arg}: {len(session.messages)} messages, {len(session.cache.tokens)} tokens, nothing re-evaluated",
            style="dim",
            markup=False,
        )
    elif cmd == "/stats":
        err.print(_stats(session), style="dim", markup=False)
    else:
        err.print(f"unknown command {text!r}; {HELP}", style="red", markup=False)
    return False


def _stats(session) -> str:
    r = session.last
    if r is None:
        return f"no reply yet | sampling: {session.sampling(session.sampling_params).describe()}"
    line = (
        f"prompt {r.usage.prompt_tokens} tokens: {r.usage.reused_tokens} reused, "
        f"{r.usage.evaluated_tokens} evaluated at {r.timings.prefill_tok_s:.1f} tok/s | "
        f"reply {r.usage.completion_tokens} tokens at {r.timings.decode_tok_s:.1f} tok/s | "
        f"{len(session.cache.checkpoints)} checkpoints ({session.cache.checkpoint_bytes / 2**20:.1f} MiB)"
    )
    if r.speculation:
        sp = r.speculation
        line += (
            f" | MTP drafts: {sp.accepted}/{sp.drafted} accepted ({sp.acceptance_rate:.0%}), "
            f"{sp.tokens_per_step:.2f} tokens per step"
        )
    return line + f" | sampling: {session.sampling(session.sampling_params).describe()}"


def _read_message() -> str | None:
    """One message from the terminal: continuation lines with a trailing \\, or a \"\"\" block."""
    line = input("> ")
    if line.strip() == '"""':
        lines = []
        while True:
            nxt = input(". ")
            if nxt.strip() == '"""':
                break
            lines.append(nxt)
        text = "\n".join(lines)
    else:
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input(". "))
        text = "\n".join(lines)
    text = text.strip()
    return text or None
