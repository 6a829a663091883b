"""``qwen35 quant``: quantization quality reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Quantization quality: compare GGUF files against a reference.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


class _Bar:
    """A rich progress bar on stderr when it is a terminal; progress() and step() are no-ops otherwise."""

    def __init__(self, what: str):
        self.what, self.bar, self.task = what, None, None

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(self.what, total=None)
            self.bar.start()
        return self

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=what, completed=0, total=None)

    def progress(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _check_plot_path(path: Path | None) -> None:
    from qwen35.bindings.model import ModelError

    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise ModelError(f"--plot {path}: write a .png file name")
    if not path.parent.is_dir():
        raise ModelError(f"--plot {path}: folder {path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModelError("--plot needs matplotlib: pip install 'qwen35-toolkit[plot]'") from None


def _need_gguf(p: Path) -> None:
    """A GGUF file, or one error line saying what p is instead and the fix."""
    from qwen35.bindings.model import ModelError

    if p.is_dir() and (p / "config.json").is_file():
        raise ModelError(
            f"{p} is a Hugging Face checkpoint folder, not a GGUF; convert it first: "
            f"qwen35-convert {p} -o {p.name}-F32.gguf --type F32"
        )
    if not p.is_file():
        raise ModelError(f"{p} does not exist")


@app.command("eval")
def eval_cmd(
    ref: Path = typer.Argument(..., help="Reference GGUF (e.g. the BF16 or F32 conversion)."),
    candidates: list[Path] = typer.Argument(..., help="Quantized GGUF files to score."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to evaluate on."),
    n_ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (the first half is context only)."),
    max_chunks: int = typer.Option(0, "--chunks", help="Use at most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    plot_to: Path = typer.Option(None, "--plot", help="Also write a PNG: bits per weight vs mean KLD."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Mean, p99 and max KLD against REF, top-1 agreement and perplexity, one row per file."""
    from qwen35.bindings.model import ModelError
    from qwen35.quant import evaluate

    for p in (ref, *candidates):
        _need_gguf(p)
    if not text.is_file():
        raise ModelError(f"{text} does not exist")
    _check_plot_path(plot_to)
    from qwen35.quant import model_differences

    for c in candidates:
        diff = model_differences(ref, c)
        if diff:
            typer.echo(
                f"warning: {c.name} is not the same model as {ref.name} ({'; '.join(diff)}): its scores "
                "measure the difference between two models, not a quantization",
                err=True,
            )
    with _Bar(f"scoring {len(candidates)} file(s)") as bar:
        try:
            results = evaluate(
                ref,
                list(candidates),
                text.read_text(encoding="utf-8"),
                n_ctx=n_ctx,
                max_chunks=max_chunks or None,
                n_threads=threads or None,
                on_progress=bar.progress,
            )
        except ValueError as e:
            raise ModelError(str(e)) from None
    if plot_to is not None:
        from qwen35.quant import plot

        plot(results, plot_to, title=f"against {ref.name}")
    if as_json:
        print(json.dumps([r.as_dict() for r in results]))
        return
    print(f"reference {ref.name}: perplexity {results[0].ref_ppl:.4g} over {results[0].tokens} positions")
    print(
        f"{'file':40s} {'MiB':>8s} {'bpw':>6s} {'KLD mean':>10s} {'KLD p99':>10s} {'KLD max':>10s} "
        f"{'top-1':>7s} {'PPL':>10s}"
    )
    for r in results:
        print(
            f"{Path(r.path).name:40s} {r.bytes / 2**20:8.1f} {r.bits_per_weight:6.2f} {r.kld_mean:10.5f} "
            f"{r.kld_p99:10.5f} {r.kld_max:10.5f} {100 * r.top1_agreement:6.2f}% {r.ppl:10.4g}"
        )


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

    _need_gguf(model)
    if not text.is_file():
        raise ModelError(f"{text} does not exist")
    if out.exists() and not force:
        raise ModelError(f"{out} exists; pass --force to overwrite it")
    with _Bar("computing the importance matrix") as bar:
        try:
            im = compute_imatrix(
                model,
                text,
                out,
                n_ctx=n_ctx,
                chunks=chunks,
                n_threads=threads or None,
                process_output=process_output,
                on_progress=bar.progress,
            )
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
            msg += (
                f"; least covered {w['tensor']}: {w['covered']} of {w['experts']} (experts never routed keep "
                "weight 1; use more or more varied text)"
            )
        print(msg)


@app.command("sweep")
def sweep_cmd(
    hf_dir: Path = typer.Argument(..., help="Hugging Face Qwen3.5 checkpoint directory."),
    targets: str = typer.Option(
        "Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,Q3_K_M", "--targets", help="Comma-separated file types to make."
    ),
    recipe_list: str = typer.Option("upstream,qwen35", "--recipes", help="Comma-separated recipes to compare."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text to score on (held out from calibration)."),
    imatrix_text: Path = typer.Option(
        None,
        "--imatrix-text",
        help="Calibration text: compute an imatrix on the reference and use it for "
        "every quantized file (needed by IQ3_XXS and lower).",
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the GGUF files (created)."),
    ref_type: str = typer.Option("BF16", "--ref-type", help="Reference conversion: BF16 or F32."),
    mtp: str = typer.Option("keep", "--mtp", help="keep or drop the MTP block in every file."),
    n_ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (the first half is context only)."),
    max_chunks: int = typer.Option(0, "--chunks", help="Use at most this many chunks (0: all)."),
    threads: int = typer.Option(0, "--threads", help="CPU threads (default: all cores)."),
    plot_to: Path = typer.Option(None, "--plot", help="Also write a PNG: bits per weight vs mean KLD by recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Convert, evaluate and report in one command: every target x recipe against one reference."""
    from qwen35.bindings.model import ModelError
    from qwen35.converter import quantize
    from qwen35.quant import plot, sweep

    for p in (text, imatrix_text):
        if p is not None and not p.is_file():
            raise ModelError(f"{p} does not exist")
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"{hf_dir} is not a Hugging Face checkpoint (no config.json)")
    if ref_type not in ("BF16", "F32"):
        raise ModelError(f"--ref-type {ref_type}: use BF16 or F32")
    tl = [t.strip().upper() for t in targets.split(",") if t.strip()]
    rl = [r.strip() for r in recipe_list.split(",") if r.strip()]
    for t in tl:
        try:
            quantize.check_file_type(t)
        except quantize.QuantizeError as e:
            raise ModelError(f"--targets: {e}") from None
    _check_plot_path(plot_to)
    with _Bar("converting") as bar:
        try:
            rows = sweep(
                hf_dir,
                out_dir,
                tl,
                rl,
                text.read_text(encoding="utf-8"),
                ref_type=ref_type,
                imatrix_text=imatrix_text,
                mtp=mtp,
                n_ctx=n_ctx,
                max_chunks=max_chunks or None,
                n_threads=threads or None,
                on_step=bar.step,
                on_progress=bar.progress,
            )
        except ValueError as e:
            raise ModelError(str(e)) from None
    if plot_to is not None:
        plot(
            [r.result for r in rows],
            plot_to,
            labels=[r.target for r in rows],
            groups=[r.recipe for r in rows],
            title=f"{hf_dir.name} vs {ref_type}",
        )
    if as_json:
        print(json.dumps([r.as_dict() for r in rows]))
        return
    res0 = rows[0].result
    print(f"reference {hf_dir.name} {ref_type}: perplexity {res0.ref_ppl:.4g} over {res0.tokens} positions")
    print(
        f"{'target':8s} {'recipe':9s} {'MiB':>7s} {'bpw':>6s} {'KLD mean':>9s} {'KLD p99':>9s} {'KLD max':>8s} "
        f"{'top-1':>7s} {'PPL':>8s} {'KLD/up':>7s} {'size/up':>7s}"
    )
    for r in rows:
        x = r.result
        ratio = "" if r.kld_vs_upstream is None or r.recipe == "upstream" else f"{r.kld_vs_upstream:.3f}"
        size = "" if r.size_vs_upstream is None or r.recipe == "upstream" else f"{r.size_vs_upstream:.3f}"
        print(
            f"{r.target:8s} {r.recipe:9s} {x.bytes / 2**20:7.2f} {x.bits_per_weight:6.2f} {x.kld_mean:9.5f} "
            f"{x.kld_p99:9.4f} {x.kld_max:8.3f} {100 * x.top1_agreement:6.2f}% {x.ppl:8.4g} {ratio:>7s} {size:>7s}"
        )
