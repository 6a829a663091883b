"""``qwen35 quant``: quantization quality reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="Quantization quality: compare GGUF files against a reference.", no_args_is_help=True,
                  add_completion=False)


@app.command("eval")
def eval_cmd(
    ref: Path = typer.Argument(..., help="Reference GGUF (e.g. the BF16 or F32 conversion)."),
    candidates: list[Path] = typer.Argument(..., help="Quantized GGUF files to score."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to evaluate on."),
    n_ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (the first half is context only)."),
    max_chunks: int = typer.Option(0, "--chunks", help="Use at most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Mean, p99 and max KLD against REF, top-1 agreement and perplexity, one row per file."""
    from qwen35.bindings.model import ModelError
    from qwen35.quant import evaluate

    for p in (ref, *candidates, text):
        if not p.is_file():
            raise ModelError(f"{p} does not exist")
    progress = bar = None
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), transient=True)
        task = bar.add_task(f"scoring {len(candidates)} file(s)", total=None)
        bar.start()

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
    try:
        results = evaluate(ref, list(candidates), text.read_text(encoding="utf-8"), n_ctx=n_ctx,
                           max_chunks=max_chunks or None, n_threads=threads or None, on_progress=progress)
    except ValueError as e:
        raise ModelError(str(e)) from None
    finally:
        if bar is not None:
            bar.stop()
    if as_json:
        print(json.dumps([r.as_dict() for r in results]))
        return
    print(f"reference {ref.name}: perplexity {results[0].ref_ppl:.4g} over {results[0].tokens} positions")
    print(f"{'file':40s} {'MiB':>8s} {'bpw':>6s} {'KLD mean':>10s} {'KLD p99':>10s} {'KLD max':>10s} "
          f"{'top-1':>7s} {'PPL':>10s}")
    for r in results:
        print(f"{Path(r.path).name:40s} {r.bytes / 2**20:8.1f} {r.bits_per_weight:6.2f} {r.kld_mean:10.5f} "
              f"{r.kld_p99:10.5f} {r.kld_max:10.5f} {100 * r.top1_agreement:6.2f}% {r.ppl:10.4g}")


@app.command("imatrix")
def imatrix_cmd(
    model: Path = typer.Argument(..., help="GGUF to measure (F32/BF16/F16 or Q8_0 conversion of the model)."),
    text: Path = typer.Option(..., "--text", help="Calibration text (UTF-8)."),
    out: Path = typer.Option(..., "--output", "-o", help="Where to write the imatrix (GGUF format)."),
    n_ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk."),
    chunks: int = typer.Option(0, "--chunks", help="Use at most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    process_output: bool = typer.Option(False, "--process-output", help="Also measure output.weight."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    as_json: bool = typer.Option(False, "--json", help="Print the coverage report as JSON."),
) -> None:
    """Compute an importance matrix with the patched llama-imatrix and report expert coverage."""
    from qwen35.bindings.model import ModelError
    from qwen35.quant import compute_imatrix, coverage

    for p in (model, text):
        if not p.is_file():
            raise ModelError(f"{p} does not exist")
    if out.exists() and not force:
        raise ModelError(f"{out} exists; pass --force to overwrite it")
    try:
        im = compute_imatrix(model, text, out, n_ctx=n_ctx, chunks=chunks, n_threads=threads or None,
                             process_output=process_output)
    except ValueError as e:
        raise ModelError(str(e)) from None
    rep = coverage(im)
    if as_json:
        print(json.dumps({"path": str(out), **rep, "moe_tensors": {k: list(v) for k, v in rep["moe_tensors"].items()}}))
        return
    print(f"wrote {out}: {rep['tensors']} tensors measured over {rep['chunks']} chunks")
    if rep["worst"]:
        w = rep["worst"]
        full = sum(c == n for c, n in rep["moe_tensors"].values())
        msg = f"experts: {full} of {len(rep['moe_tensors'])} MoE tensors saw every expert"
        if w["covered"] < w["experts"]:
            msg += (f"; least covered {w['tensor']}: {w['covered']} of {w['experts']} (experts never routed keep "
                    "weight 1; use more or more varied text)")
        print(msg)
