"""``qwen35-convert`` (also ``qwen35 convert``): Hugging Face Qwen3.5 checkpoint -> GGUF."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, rich_markup_mode=None)  # typer's rich help shows flags as "<bool>"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def convert(
    hf_dir: Path = typer.Argument(..., help="Hugging Face model directory (config.json, *.safetensors, tokenizer)."),
    outfile: Path = typer.Option(None, "--outfile", "-o", help="Output .gguf (default: HF_DIR-TYPE.gguf beside it)."),
    type_: str = typer.Option(
        "BF16",
        "--type",
        "-t",
        help="F32, F16, BF16, Q8_0 (as upstream's converter); Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, Q5_0, IQ4_NL, IQ4_XS, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, IQ3_M, IQ3_S (as llama-quantize); IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S (need --imatrix).",
    ),
    imatrix: Path = typer.Option(
        None,
        "--imatrix",
        help="Importance matrix from llama-imatrix (GGUF or legacy .dat), as llama-quantize's --imatrix.",
    ),
    recipe: str = typer.Option(
        "upstream",
        "--recipe",
        help="Per-tensor type recipe: upstream (llama-quantize's choices) or qwen35 (Qwen3.5-aware mixes for Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M, IQ3_XXS; see converter/recipes.py).",
    ),
    tensor_type: list[str] = typer.Option(
        [], "--tensor-type", help="REGEX=TYPE override, as llama-quantize's (repeatable)."
    ),
    mtp: str = typer.Option(
        "keep", "--mtp", help="keep: append the MTP block; drop: leave it out; only: the draft head alone."
    ),
    mmproj: Path = typer.Option(
        None,
        "--mmproj",
        help="Where to write the vision projector GGUF (default: upstream's name, mmproj-NAME-TYPE.gguf, beside the model, whenever the checkpoint has a vision tower).",
    ),
    no_mmproj: bool = typer.Option(False, "--no-mmproj", help="Convert the text model alone."),
    mmproj_type: str = typer.Option(
        None,
        "--mmproj-type",
        help="The projector's type: F32, F16, BF16 or Q8_0 (default: the model's type when it is one of them, else F16).",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    threads: int = typer.Option(0, "--threads", help="Quantization threads (default: all cores)."),
    split_max_size: str = typer.Option(
        "0", "--split-max-size", help="Write llama.cpp split files of at most this size (e.g. 2G, 500M)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the per-tensor plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Convert a Qwen3.5 checkpoint to GGUF in one streaming pass."""
    from .convert import convert as run
    from .convert import parse_size

    type_ = type_.upper()
    if mmproj is not None and no_mmproj:
        raise typer.BadParameter("--mmproj and --no-mmproj contradict each other; pass one", param_hint="--mmproj")
    suffix = "-mtp" if mtp == "only" else ""
    out = outfile or hf_dir.resolve().parent / f"{hf_dir.resolve().name}{suffix}-{type_}.gguf"
    progress = None
    bar = None
    if sys.stderr.isatty() and not dry_run:
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        task = bar.add_task(f"converting to {type_}", total=None)
        bar.start()

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

    partial = Path(str(out) + ".partial")
    if not dry_run and partial.exists():
        typer.echo(f"note: replacing {partial}, left by a conversion that did not finish", err=True)
    try:
        s = run(
            hf_dir,
            out,
            file_type=type_,
            mtp=mtp,
            recipe=recipe,
            tensor_types=tensor_type,
            imatrix=imatrix,
            force=force,
            threads=threads or None,
            dry_run=dry_run,
            split_max_size=parse_size(split_max_size),
            on_progress=progress,
            mmproj=False if no_mmproj else mmproj,
            mmproj_type=mmproj_type.upper() if mmproj_type else None,
        )
    finally:
        if bar is not None:
            bar.stop()
    if s.imatrix_missing:
        typer.echo(
            f"note: the imatrix has no weights for {len(s.imatrix_missing)} quantized tensors (e.g. "
            f"{s.imatrix_missing[0]}); they are quantized without, as llama-quantize does",
            err=True,
        )
    if as_json:
        print(json.dumps(s.__dict__))
        return
    if dry_run:
        raised = any(t["raised"] for t in s.plan)
        print(f"{'tensor':40s} {'shape (ggml ne)':24s} {'type':8s} {'bytes':>14s}")
        for t in s.plan:
            mark = "*" if t["raised"] else ""
            print(f"{t['name']:40s} {t['shape']!s:24s} {t['type'] + mark:8s} {t['bytes']:>14,d}")
        if raised:
            print(f"* more bits than llama-quantize's choice for {type_}, from --recipe {recipe} or --tensor-type")
        if s.mmproj and not s.mmproj.get("kept"):
            print(f"\nvision projector ({s.mmproj['path']}):")
            for t in s.mmproj["plan"]:
                print(f"{t['name']:40s} {t['shape']!s:24s} {t['type']:8s} {t['bytes']:>14,d}")
    where = s.path if len(s.files) <= 1 else f"{len(s.files)} split files {s.files[0]} …"
    print(
        f"{'planned' if dry_run else 'wrote'} {where}: {_human(s.bytes)}, {s.params:,} parameters, "
        f"{s.bits_per_weight:.2f} bits/weight, "
        + ", ".join(f"{n} {k}" for k, n in sorted(s.tensors_per_type.items()))
        + f", {s.seconds:.1f} s"
    )
    if s.mmproj and s.mmproj.get("kept"):
        typer.echo(
            f"note: kept {s.mmproj['path']}, the projector of an earlier conversion (--force rewrites it)", err=True
        )
    elif s.mmproj:
        p = s.mmproj
        print(
            f"{'planned' if dry_run else 'wrote'} {p['path']}: {_human(p['bytes'])}, {p['params']:,} parameters "
            "(vision projector), " + ", ".join(f"{n} {k}" for k, n in sorted(p["tensors_per_type"].items()))
        )


def main() -> None:
    from qwen35.errors import run_app

    run_app(app)
