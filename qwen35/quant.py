"""Quantization quality: KLD, top-1 agreement and perplexity of GGUF files against a reference.

The text is tokenized with the reference model and cut into chunks of ``n_ctx`` tokens; each
chunk runs from an empty context through the reference and through every candidate (full
logits from the bindings, F32 KV cache). As llama-perplexity does, the first half of each chunk
only gives context: the statistics are over the positions of its second half.

>>> kld_rows(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]]))
array([0.])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class EvalResult:
    path: str
    bytes: int
    bits_per_weight: float
    tokens: int  # positions scored
    kld_mean: float  # nats, KL(reference || candidate) per position
    kld_p99: float
    kld_max: float
    top1_agreement: float  # share of positions where both pick the same most likely token
    ppl: float  # candidate's perplexity on the text
    ref_ppl: float

    def as_dict(self) -> dict:
        return asdict(self)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kld_rows(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(cand)) for each row, in float64."""
    lp, lq = log_softmax(ref_logits), log_softmax(cand_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def file_stats(path: Path) -> tuple[int, float]:
    """(file bytes, bits per weight of the tensor data); a split model: all its parts."""
    from qwen35.gguf_scan import scan_model

    info = scan_model(path)
    data = sum(t.nbytes for t in info.tensors)
    params = sum(int(np.prod(t.ne)) for t in info.tensors)
    files = {info.path} | {t.file for t in info.tensors if t.file}
    return sum(f.stat().st_size for f in files), 8 * data / max(params, 1)


def chunks(tokens: list[int], n_ctx: int, max_chunks: int | None) -> list[list[int]]:
    out = [tokens[i : i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    return out[:max_chunks] if max_chunks else out


def model_differences(a: str | Path, b: str | Path) -> list[str]:
    """How GGUF b's model differs from a's (architecture, layers, width, experts, vocabulary):
    empty when they can be quantizations of one model."""
    from qwen35.gguf_scan import scan_model

    ha, hb = scan_model(Path(a)), scan_model(Path(b))
    out = []
    for what, key in (
        ("architecture", "general.architecture"),
        ("layers", "{}.block_count"),
        ("hidden size", "{}.embedding_length"),
        ("experts", "{}.expert_count"),
        ("attention heads", "{}.attention.head_count"),
    ):
        va, vb = (h.get(key.format(h.get("general.architecture"))) for h in (ha, hb))
        if va != vb:
            out.append(f"{what} {vb} vs {va}")
    ea, eb = ({t.name: t.ne for t in h.tensors}.get("token_embd.weight") for h in (ha, hb))
    if ea is not None and eb is not None and tuple(ea) != tuple(eb):
        out.append(f"embeddings {list(eb)} vs {list(ea)}")
    return out


def evaluate(
    ref: str | Path,
    candidates: list[str | Path],
    text: str,
    *,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    n_threads: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[EvalResult]:
    """Score each candidate against ref on text; raises ValueError when the text is too short."""
    from qwen35.bindings.model import Model

    def load(p):
        return Model.load(p, n_ctx=n_ctx, n_threads=n_threads, kv_type="f32", flash_attn=False)

    import contextlib

    with contextlib.ExitStack() as stack:
        # all models at once (weights are memory-mapped), so the reference's full distributions
        # never need storing: one chunk of log-probabilities is alive at a time
        ref_m = stack.enter_context(load(ref))
        cand_m = [stack.enter_context(load(c)) for c in candidates]
        tokens = ref_m.tokenize(text, special=False)
        parts = chunks(tokens, n_ctx, max_chunks)
        if not parts:
            raise ValueError(
                f"the text has {len(tokens)} tokens; it needs at least --ctx {n_ctx} "
                "(give a longer text or a smaller --ctx)"
            )
        ref_nll, klds, nll, agree = [], [[] for _ in candidates], [[] for _ in candidates], [[] for _ in candidates]
        for i, c in enumerate(parts):
            nxt = np.asarray(c[n_ctx // 2 :])
            rows = np.arange(len(nxt))
            lp = log_softmax(ref_m.logits(c)[n_ctx // 2 - 1 : -1])
            ref_nll.append(-lp[rows, nxt])
            top, p = lp.argmax(-1), np.exp(lp)
            for j, m in enumerate(cand_m):
                lq = log_softmax(m.logits(c)[n_ctx // 2 - 1 : -1])
                klds[j].append(np.maximum((p * (lp - lq)).sum(-1), 0.0))
                nll[j].append(-lq[rows, nxt])
                agree[j].append(lq.argmax(-1) == top)
            if on_progress:
                on_progress(i + 1, len(parts))
    ref_ppl = float(np.exp(np.concatenate(ref_nll).mean()))
    results = []
    for j, cand in enumerate(candidates):
        k = np.concatenate(klds[j])
        size, bpw = file_stats(Path(cand))
        results.append(
            EvalResult(
                str(cand),
                size,
                bpw,
                int(k.size),
                float(k.mean()),
                float(np.percentile(k, 99)),
                float(k.max()),
                float(np.concatenate(agree[j]).mean()),
                float(np.exp(np.concatenate(nll[j]).mean())),
                ref_ppl,
            )
        )
    return results


# ---------------------------------------------------------------- importance matrices


def build_bin() -> Path:
    """The patched build's tools (beside the libraries the bindings load)."""
    from qwen35 import native

    return next(native.library_dir().glob("libllama.*")).resolve().parent


def compute_imatrix(
    model: str | Path,
    text: str | Path,
    out: str | Path,
    *,
    n_ctx: int = 512,
    chunks: int = 0,
    n_threads: int | None = None,
    process_output: bool = False,
    on_progress=None,
):
    """Run the patched llama-imatrix over a text; the file appears atomically. model: the GGUF, or
    any part of a split one. on_progress(done, total): chunks evaluated so far. Returns the loaded
    imatrix (converter.imatrix.Imatrix, with per-tensor expert coverage); ValueError with
    llama-imatrix's own reason when it fails."""
    import os
    import re
    import subprocess
    import threading

    from qwen35 import native
    from qwen35.bindings.model import _cpu_has_amx
    from qwen35.converter import imatrix as imx
    from qwen35.cpus import usable_cpus
    from qwen35.gguf_scan import GGUFScanError, scan_model

    try:
        model = scan_model(Path(model)).path  # llama.cpp loads a split model from its first part
    except (GGUFScanError, OSError, ValueError) as e:
        raise ValueError(f"{model} is not a readable GGUF file ({e})") from None
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    cmd = [
        str(build_bin() / "llama-imatrix"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-o",
        str(tmp),
        "-c",
        str(n_ctx),
        "-t",
        str(n_threads or usable_cpus()),
    ]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if process_output:
        cmd += ["--process-output"]
    native.load()
    if _cpu_has_amx():  # the pinned llama.cpp crashes evaluating Qwen3.5 from AMX/repacked buffers
        cmd += ["--no-repack"]
    lines: list[str] = []
    total = [0]

    def watch(stream):  # llama-imatrix's log: "computing over N chunks", then "[k]ppl," per chunk
        buf = ""
        for piece in iter(lambda: stream.read(256), ""):
            buf += piece
            *done, buf = re.split(r"(?<=[\n,])", buf)
            for ln in done:
                lines.append(ln)
                if m := re.search(r"computing over (\d+) chunks", ln):
                    total[0] = int(m.group(1))
                elif (m := re.match(r"\s*\[(\d+)\][\d.naif]+,", ln)) and on_progress and total[0]:
                    on_progress(int(m.group(1)), total[0])
        lines.append(buf)

    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        reader = threading.Thread(target=watch, args=(proc.stdout,), daemon=True)
        reader.start()
        rc = proc.wait()
        reader.join()
        if rc != 0 or not tmp.exists():
            log = "".join(lines).splitlines()
            # llama.cpp's log marks errors with " E " after the timestamp; else its last words
            errs = [m.group(1).strip() for ln in log if (m := re.match(r"^[\d.]+\s+E\s+(?:\w+: )?(.*)$", ln))]
            said = errs or [ln.strip() for ln in log if ln.strip()][-2:]
            raise ValueError(f"llama-imatrix failed on {model} (exit {rc}): {'; '.join(said) or 'no output'}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return imx.load(out)


def coverage(im) -> dict:
    """Expert coverage of an imatrix: per MoE tensor (covered, total), and the worst one."""
    moe = {k: v for k, v in im.coverage.items() if v[1] > 1}
    worst = min(moe.items(), key=lambda kv: kv[1][0] / kv[1][1]) if moe else None
    return {
        "tensors": len(im.entries),
        "chunks": im.chunk_count,
        "moe_tensors": moe,
        "worst": {"tensor": worst[0], "covered": worst[1][0], "experts": worst[1][1]} if worst else None,
    }


# ---------------------------------------------------------------- plots and sweeps


def plot(
    results: list[EvalResult],
    path: str | Path,
    *,
    labels: list[str] | None = None,
    groups: list[str] | None = None,
    title: str = "",
) -> Path:
    """A PNG of bits per weight vs mean KLD (log scale), one point per file, coloured by group
    (e.g. the recipe); written atomically."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'qwen35-toolkit[plot]'") from None
    import os

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    labels = labels or [Path(r.path).stem for r in results]
    groups = groups or ["" for _ in results]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for g in dict.fromkeys(groups):
        pts = sorted(
            (r.bits_per_weight, max(r.kld_mean, 1e-6), lab) for r, lab, gg in zip(results, labels, groups) if gg == g
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1, label=g or None)
        for x, y, lab in pts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KLD vs reference (nats)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if any(groups):
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


@dataclass
class SweepRow:
    target: str
    recipe: str
    result: EvalResult
    kld_vs_upstream: float | None = None  # this file's mean KLD / upstream's at the same target
    size_vs_upstream: float | None = None

    def as_dict(self) -> dict:
        return {
            "target": self.target,
            "recipe": self.recipe,
            **self.result.as_dict(),
            "kld_vs_upstream": self.kld_vs_upstream,
            "size_vs_upstream": self.size_vs_upstream,
        }


def sweep(
    hf_dir: str | Path,
    out_dir: str | Path,
    targets: list[str],
    recipes: list[str],
    text: str,
    *,
    ref_type: str = "BF16",
    imatrix_text: str | Path | None = None,
    mtp: str = "keep",
    n_ctx: int = 512,
    max_chunks: int | None = None,
    n_threads: int | None = None,
    on_step: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[SweepRow]:
    """Convert hf_dir to ref_type and to every target x recipe (with an imatrix computed on
    imatrix_text from the reference, for all quantized files, when given), then score them all
    against the reference on text. Files go to out_dir; returns one row per file."""
    from qwen35.converter import recipes as rc
    from qwen35.converter.convert import convert

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in recipes:
        if r not in rc.RECIPES:
            raise ValueError(f"--recipes: {r} is not known; available: {', '.join(rc.RECIPES)}")
    if "qwen35" in recipes and (odd := [t for t in targets if t not in rc.QWEN35_TABLE]):
        raise ValueError(f"--recipe qwen35 has mixes for {', '.join(rc.QWEN35_TABLE)}, not {', '.join(odd)}")
    say = on_step or (lambda s: None)
    name = Path(hf_dir).name
    ref = out_dir / f"{name}-{ref_type}.gguf"
    say(f"converting the reference ({ref_type})")
    convert(hf_dir, ref, file_type=ref_type, mtp=mtp, force=True)
    im = None
    if imatrix_text is not None:
        im = out_dir / f"{name}-imatrix.gguf"
        say("computing the importance matrix")
        compute_imatrix(ref, imatrix_text, im, n_ctx=n_ctx, n_threads=n_threads)
    files, keys = [], []
    for target in targets:
        for recipe in recipes:
            out = out_dir / f"{name}-{target}-{recipe}.gguf"
            say(f"converting {target} ({recipe})")
            convert(
                hf_dir,
                out,
                file_type=target,
                mtp=mtp,
                recipe=recipe,
                force=True,
                imatrix=im if target not in ("F32", "F16", "BF16", "Q8_0") else None,
            )
            files.append(out)
            keys.append((target, recipe))
    say(f"scoring {len(files)} files")
    results = evaluate(
        ref, files, text, n_ctx=n_ctx, max_chunks=max_chunks, n_threads=n_threads, on_progress=on_progress
    )
    rows = [SweepRow(t, r, res) for (t, r), res in zip(keys, results)]
    base = {row.target: row.result for row in rows if row.recipe == "upstream"}
    for row in rows:
        b = base.get(row.target)
        if b is not None and b.kld_mean > 0:
            row.kld_vs_upstream = row.result.kld_mean / b.kld_mean
            row.size_vs_upstream = row.result.bytes / b.bytes
    return rows
