"""One streaming pass: Hugging Face checkpoint -> (quantized) GGUF.

read (checkpoint.py) -> map (qwen35.py) -> transform (transforms.py) -> quantize (quantize.py)
-> write (here). The header, with every tensor's final type and size, is written before any
weight is read; tensors then stream in order with a small window of work in flight, so memory
is bounded by a few tensors whatever the model size.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import shutil
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import WriterState

from qwen35.errors import Qwen35Error

from . import checkpoint as ckpt_mod
from . import imatrix as imx
from . import quantize, qwen35, recipes, vision, vocab
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint

log = logging.getLogger(__name__)

MTP_MODES = ("keep", "drop", "only")
Q = gguf.GGMLQuantizationType


class ConvertError(Qwen35Error):
    """A conversion that cannot proceed; the message names the problem and the fix."""


@dataclass
class PlannedTensor:
    out: qwen35.OutTensor
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    shape: tuple[int, ...] = ()  # as stored (numpy order); defaults to out.shape
    raised: bool = False  # the recipe gave it more bits than llama-quantize's choice

    def __post_init__(self):
        self.shape = self.shape or self.out.shape


@dataclass
class Plan:
    ckpt: Checkpoint
    file_type: str
    mtp: str
    n_mtp: int
    tensors: list[PlannedTensor]
    imatrix: imx.Imatrix | None = None
    imatrix_missing: list[str] = field(default_factory=list)  # quantized without importance weights
    recipe: str = "upstream"
    projector: Projector | None = None  # the vision projector GGUF written in the same pass

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.out.shape)) for t in self.tensors)


@dataclass
class Projector:
    """The vision projector (mmproj) GGUF: its tensors, type and checked vision config."""

    file_type: str
    tensors: list[PlannedTensor]
    config: dict

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_projector(ckpt: Checkpoint, file_type: str) -> Projector:
    if file_type not in vision.PROJECTOR_TYPES:
        raise ConvertError(f"--mmproj-type {file_type} is not one of {', '.join(vision.PROJECTOR_TYPES)}")
    outs, cfg = vision.plan_projector(ckpt)
    vision.preprocessor(ckpt)  # checked now: a bad one must stop the conversion before any file is written
    tensors = []
    for o in outs:
        q = vision.choose_type(o, file_type)
        tensors.append(PlannedTensor(o, q, quantize.nbytes(q, o.shape)))
    return Projector(file_type, tensors, cfg)


def projector_type(file_type: str) -> str:
    """The projector's type by default: the model's own when upstream writes projectors in it
    (F32, F16, BF16, Q8_0), else F16 (as projectors ship beside K-quant models)."""
    return file_type if file_type in vision.PROJECTOR_TYPES else "F16"


@dataclass
class Summary:
    path: str
    file_type: str
    bytes: int
    params: int
    bits_per_weight: float
    tensors_per_type: dict[str, int]
    seconds: float
    dry_run: bool = False
    recipe: str = "upstream"
    plan: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    imatrix_missing: list[str] = field(default_factory=list)
    mmproj: dict | None = None  # path, bytes, params, type and tensors per type of the projector


def make_plan(
    hf_dir: str | Path,
    file_type: str = "BF16",
    mtp: str = "keep",
    recipe: str = "upstream",
    tensor_types: list[str] = (),
    imatrix: str | Path | None = None,
    mmproj: bool | None = None,
    mmproj_type: str | None = None,
) -> Plan:
    """mmproj: True to plan the vision projector too (an error without a vision tower), False
    not to, None when the checkpoint has a vision tower (and the model is not the MTP head alone)."""
    if mtp not in MTP_MODES:
        raise ConvertError(f"--mtp {mtp} is not one of {', '.join(MTP_MODES)}")
    if recipe not in recipes.RECIPES:
        raise ConvertError(f"--recipe {recipe} is not known; available: {', '.join(recipes.RECIPES)}")
    if recipe == "qwen35" and file_type not in recipes.QWEN35_TABLE:
        raise ConvertError(
            f"--recipe qwen35 has mixes for {', '.join(recipes.QWEN35_TABLE)}; "
            f"use one of them or --recipe upstream for --type {file_type}"
        )
    quantize.check_file_type(file_type)
    try:
        overrides = recipes.parse_overrides(list(tensor_types))
    except ValueError as e:
        raise ConvertError(str(e)) from e
    if overrides and file_type in quantize.CONVERTER_TYPES:
        raise ConvertError(f"--tensor-type applies to quantized mixes (Q4_K_M, Q6_K, ...), not --type {file_type}")
    if imatrix is not None and file_type in quantize.CONVERTER_TYPES:
        raise ConvertError(
            f"--imatrix has no effect on --type {file_type}; use it with K- and i-quant mixes "
            "(Q4_K_M, IQ4_XS, IQ2_XS, ...)"
        )
    try:
        im = imx.load(imatrix) if imatrix is not None else None
    except imx.ImatrixError as e:
        raise ConvertError(str(e)) from e
    if mmproj_type is not None and mmproj_type not in vision.PROJECTOR_TYPES:
        raise ConvertError(f"--mmproj-type {mmproj_type} is not one of {', '.join(vision.PROJECTOR_TYPES)}")
    ckpt = open_checkpoint(hf_dir)
    try:
        return _make_plan(ckpt, file_type, mtp, recipe, overrides, im, mmproj, mmproj_type)
    except BaseException:
        ckpt.close()
        raise


def _make_plan(ckpt, file_type, mtp, recipe, overrides, im, mmproj, mmproj_type) -> Plan:
    outs = qwen35.plan_tensors(ckpt, mtp)
    n_mtp = qwen35.n_mtp_layers(ckpt) if mtp != "drop" else 0
    missing: list[str] = []
    if file_type in quantize.CONVERTER_TYPES:
        types = [quantize.choose_type(o.name, o.kind, o.shape, o.keep_f32, file_type) for o in outs]
        if recipe == "qwen35":  # Q8_0: the converter's choices, then the table's cells
            rules = recipes.qwen35_rules(file_type, ckpt.config["num_hidden_layers"])
            types = [
                max(q, next((r for rx, r in rules if rx.search(o.name)), q), key=recipes.bits_per_weight)
                if q == gguf.GGMLQuantizationType.Q8_0
                else q
                for o, q in zip(outs, types)
            ]
    else:
        c = ckpt.config
        model = recipes.ModelDesc(
            c["num_hidden_layers"] + n_mtp,
            c.get("num_experts", 0) if ckpt.arch == "qwen35moe" else 0,
            c["num_attention_heads"] // c["num_key_value_heads"],
        )
        descs = [recipes.TensorDesc(o.name, tuple(reversed(o.shape))) for o in outs]
        ftype = quantize.FILE_TYPES[file_type][0]
        base = recipes.upstream_types(descs, ftype, model, (), has_imatrix=im is not None)
        chosen = (
            recipes.qwen35_types(
                descs, file_type, ftype, model, c["num_hidden_layers"], overrides, has_imatrix=im is not None
            )
            if recipe == "qwen35"
            else recipes.upstream_types(descs, ftype, model, overrides, has_imatrix=im is not None)
        )
        raised = [
            q is not None and b is not None and recipes.bits_per_weight(q) > recipes.bits_per_weight(b)
            for q, b in zip(chosen, base)
        ]
        missing = _check_imatrix(outs, chosen, file_type, im, c["num_hidden_layers"])
        types = [q if q is not None else gguf.GGMLQuantizationType.F32 for q in chosen]
    if file_type in quantize.CONVERTER_TYPES:
        base_types = [quantize.choose_type(o.name, o.kind, o.shape, o.keep_f32, file_type) for o in outs]
        raised = [recipes.bits_per_weight(q) > recipes.bits_per_weight(b) for q, b in zip(types, base_types)]
    planned = [PlannedTensor(o, q, quantize.nbytes(q, o.shape), raised=r) for o, q, r in zip(outs, types, raised)]
    if file_type not in quantize.CONVERTER_TYPES:
        for t in planned:  # llama-quantize stores ggml_n_dims dimensions: trailing size-1 dims go
            shape = t.out.shape
            while len(shape) > 1 and shape[0] == 1:
                shape = shape[1:]
            t.shape = shape
    projector = None
    if mmproj is None:
        mmproj = mtp != "only" and vision.has_vision(ckpt)
    if mmproj:
        if not isinstance(ckpt.raw_config.get("vision_config"), dict) and not vision.vision_tensors(ckpt):
            raise ConvertError(
                f"{ckpt.path} is a text-only checkpoint ({ckpt.hf_arch}): it has no vision tower for --mmproj"
            )
        projector = plan_projector(ckpt, mmproj_type or projector_type(file_type))
    return Plan(ckpt, file_type, mtp, n_mtp, planned, im, missing if im is not None else [], recipe, projector)


def _check_imatrix(
    outs: list[qwen35.OutTensor], chosen: list, file_type: str, im: imx.Imatrix | None, n_layer: int
) -> list[str]:
    """Before anything is written: every tensor whose type is garbage without importance weights
    has them, and every importance vector fits its tensor (llama-quantize finds out mid-file).
    Returns the quantized tensors the imatrix has no weights for, token_embd (a lookup table) and
    output (llama-imatrix skips it unless --process-output) aside."""
    missing, uncovered = [], []
    for o, q in zip(outs, chosen):
        if q is None or q in (Q.F32, Q.F16, Q.BF16):
            continue
        if im is not None:
            try:
                w = im.for_tensor(o.name, o.shape[-1], _n_matrices(o.shape))
            except imx.ImatrixError as e:
                raise ConvertError(str(e)) from e
        else:
            w = None
        if w is None and recipes.requires_imatrix(o.name, q):
            uncovered.append((o.name, q))
        elif w is None and o.name not in ("token_embd.weight", "output.weight"):
            missing.append(o.name)
    if uncovered:
        raise ConvertError(_uncovered_message(uncovered, file_type, im, n_layer))
    return missing


def _uncovered_message(uncovered: list[tuple[str, Q]], file_type: str, im, n_layer: int) -> str:
    """One line: every tensor that would be quantized below 3 bits without importance weights,
    led by the fix that works."""
    names = [n for n, _ in uncovered]
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    types = "/".join(sorted({q.name for _, q in uncovered}))
    if im is None:
        return (
            f"--type {file_type} needs an importance matrix: {len(names)} tensors would be {types}, which is "
            f"garbage without one ({listed}); compute it with `qwen35 quant imatrix MODEL.gguf --text TEXT "
            "-o imatrix.gguf` (on an F32/BF16/Q8_0 conversion) and pass --imatrix imatrix.gguf"
        )
    blocks = sorted({_block(n) for n in names})
    if all(b >= n_layer for b in blocks):
        fix = (
            "add --mtp drop (llama-imatrix does not run the MTP block), or keep the block above 3 bits with "
            + " ".join(f"--tensor-type 'blk\\.{b}\\.=q4_k'" for b in blocks)
        )
    else:
        fix = "compute the imatrix on this model (`qwen35 quant imatrix`)"
    return (
        f"imatrix {im.path} has no weights for {len(names)} tensors that --type {file_type} makes {types} "
        f"(garbage without them): {listed}; {fix}"
    )


def _n_matrices(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1


def _block(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else -1


def general_metadata(w: gguf.GGUFWriter, model_dir: Path) -> gguf.Metadata:
    """The general.* keys upstream's converter writes, found as it finds them (gguf-py's
    Metadata.load): the recommended sampling from generation_config.json, license, tags,
    languages and base models from the model card's front matter, name and size label (from the
    parameters of the tensors already added to w)."""
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = model_dir.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    return meta


def _add_metadata(w: gguf.GGUFWriter, plan: Plan) -> None:
    """The same keys, types and values as upstream's Qwen3_5[Moe]TextModel."""
    c = plan.ckpt.config
    n_layer = c["num_hidden_layers"]
    rope = c["rope_parameters"]
    w.add_type(gguf.GGUFType.MODEL)
    general_metadata(w, plan.ckpt.path).set_gguf_meta_model(w)
    w.add_block_count(n_layer + plan.n_mtp)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    if "intermediate_size" in c:
        w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    if "mrope_section" in rope:
        w.add_rope_dimension_sections((list(rope["mrope_section"]) + [0, 0, 0, 0])[:4])
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    if plan.ckpt.arch == "qwen35moe":
        w.add_expert_count(c["num_experts"])
        w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(quantize.FILE_TYPES[plan.file_type][0])
    if plan.ckpt.arch == "qwen35moe":
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if plan.n_mtp:
        w.add_nextn_predict_layers(plan.n_mtp)
    w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
    w.add_ssm_state_size(c["linear_key_head_dim"])
    w.add_ssm_group_count(c["linear_num_key_heads"])
    w.add_ssm_time_step_rank(c["linear_num_value_heads"])
    w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
    w.add_recurrent_layers([t == "linear_attention" for t in c["layer_types"]] + [False] * plan.n_mtp)
    w.add_full_attention_interval(c.get("full_attention_interval", 4))
    w.add_rope_dimension_count(int(c["head_dim"] * rope.get("partial_rotary_factor", 0.25)))
    if "mrope_section" not in rope:
        w.add_rope_dimension_sections([11, 11, 10, 0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_vocab(w, plan.ckpt.path, c["vocab_size"])
    if plan.imatrix is not None:  # as llama-quantize records it (its kv overrides, 127-byte strings)
        im = plan.imatrix
        w.add_string(imx.KV_FILE, im.path.encode()[:127].decode(errors="ignore"))
        if im.datasets:
            w.add_string(imx.KV_DATASET, im.datasets[0].encode()[:127].decode(errors="ignore"))
        w.add_uint32(imx.KV_N_ENTRIES, len(im.entries))
        if im.chunk_count > 0:
            w.add_uint32(imx.KV_N_CHUNKS, im.chunk_count)


def _check_output(out: Path, force: bool, need: int) -> None:
    if out.exists() and not force:
        raise ConvertError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise ConvertError(f"output folder {out.parent} does not exist; create it first")
    free = shutil.disk_usage(out.parent).free
    if free < need + (64 << 20):
        raise ConvertError(
            f"{out.parent} has {free / 2**30:.1f} GiB free, the GGUF needs {need / 2**30:.1f} GiB; "
            "free space or write elsewhere"
        )


def parse_size(text: str) -> int:
    """llama.cpp's --split-max-size syntax: bytes, or a number with K, M or G (powers of 1000).

    >>> parse_size("2G"), parse_size("500M"), parse_size("0")
    (2000000000, 500000000, 0)
    """
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    try:
        n = float(text[:-1] if scale != 1 else text)
    except ValueError:
        raise ConvertError(f"--split-max-size {text!r} is not a size; write e.g. 2G, 500M or 1000000") from None
    return int(n * scale)


def convert(
    hf_dir: str | Path,
    out: str | Path,
    *,
    file_type: str = "BF16",
    mtp: str = "keep",
    recipe: str = "upstream",
    tensor_types: list[str] = (),
    imatrix: str | Path | None = None,
    force: bool = False,
    threads: int | None = None,
    dry_run: bool = False,
    split_max_size: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    mmproj: str | Path | bool | None = None,
    mmproj_type: str | None = None,
) -> Summary:
    """Convert hf_dir to out in one pass. The output appears atomically or not at all.

    With split_max_size > 0 the model is written as llama.cpp split files
    (OUT-00001-of-0000N.gguf ...), each file at most that many bytes, metadata included.

    mmproj: where to write the vision projector GGUF (a path), False for none, None for
    upstream's default name (mmproj-Name-TYPE.gguf) beside out when the checkpoint has a vision
    tower; a file of that name (an earlier conversion's: the name has the checkpoint and the
    type) is kept unless force. Both files are written before either appears."""
    t0 = time.perf_counter()
    want = None if mmproj is None or mmproj is True else bool(mmproj)
    try:
        plan = make_plan(hf_dir, file_type, mtp, recipe, tensor_types, imatrix, want, mmproj_type)
    except (CheckpointError, quantize.QuantizeError) as e:
        raise ConvertError(str(e)) from e
    out = Path(out)
    proj_out = None
    if plan.projector is not None:
        if isinstance(mmproj, (str, Path)):
            proj_out = Path(mmproj)
        else:
            proj_out = out.parent / vision.default_name(plan.ckpt, plan.projector.file_type)
        if proj_out.resolve() == out.resolve():
            plan.ckpt.close()
            raise ConvertError(f"--mmproj {proj_out} is the model's own output file; name another")
    kept = None  # a projector of the default name left by an earlier conversion of this checkpoint
    if proj_out is not None and not isinstance(mmproj, (str, Path)) and proj_out.exists() and not force:
        kept, proj_out = proj_out, None
        plan.projector = None
    counts = Counter(t.qtype.name for t in plan.tensors)
    summary = Summary(
        str(out),
        file_type,
        plan.total_bytes,
        plan.n_params,
        8 * plan.total_bytes / max(plan.n_params, 1),
        dict(counts),
        0.0,
        dry_run,
        recipe=recipe,
        imatrix_missing=plan.imatrix_missing,
    )
    if dry_run:
        summary.plan = [
            {
                "name": t.out.name,
                "shape": list(reversed(t.shape)),
                "type": t.qtype.name,
                "bytes": t.nbytes,
                "raised": t.raised,
            }
            for t in plan.tensors
        ]
        try:
            summary.bytes = _planned_file_bytes(plan, split_max_size)
            if kept is not None:
                summary.mmproj = {"path": str(kept), "kept": True, "bytes": kept.stat().st_size}
            elif plan.projector is not None:
                summary.mmproj = _projector_summary(plan.projector, proj_out, _planned_projector_bytes(plan))
                summary.mmproj["plan"] = [
                    {"name": t.out.name, "shape": list(reversed(t.shape)), "type": t.qtype.name, "bytes": t.nbytes}
                    for t in plan.projector.tensors
                ]
        finally:
            plan.ckpt.close()
        summary.seconds = time.perf_counter() - t0
        return summary
    try:
        split_limit = _split_limit(plan, split_max_size)
    except BaseException:
        plan.ckpt.close()
        raise
    try:
        _check_output(out, force, plan.total_bytes + (plan.projector.total_bytes if plan.projector else 0))
        if proj_out is not None:
            _check_output(proj_out, force, plan.projector.total_bytes)
    except BaseException:
        plan.ckpt.close()
        raise
    # splits are written into a hidden folder beside the output and moved out when all are complete
    tmp_dir = out.parent / f".{out.name}.partial"
    tmp = tmp_dir / out.name if split_max_size else out.with_name(out.name + ".partial")
    proj_tmp = proj_out.with_name(proj_out.name + ".partial") if proj_out is not None else None
    total = plan.total_bytes + (plan.projector.total_bytes if plan.projector else 0)
    progress = (lambda done, _t: on_progress(done, total)) if on_progress else None
    try:
        if split_max_size:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
        n_threads = threads or quantize.default_threads()
        written = _write(plan, tmp, n_threads, progress, split_limit)
        if plan.projector is not None:
            proj_progress = (lambda done, _t: on_progress(plan.total_bytes + done, total)) if on_progress else None
            _write(plan, proj_tmp, n_threads, proj_progress, projector=plan.projector)
        finals = [out.parent / p.name for p in written] if split_max_size else [out]
        for f in finals:
            if f.exists() and not force and f != out:
                raise ConvertError(f"{f} exists; pass --force to overwrite it")
        for src, dst in zip(written, finals):
            os.replace(src, dst)
        if proj_tmp is not None:
            os.replace(proj_tmp, proj_out)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConvertError(
                f"the disk holding {out.parent} is full (no space left while writing {out.name}); "
                "free space or write elsewhere"
            ) from None
        raise ConvertError(f"converting to {out} failed: {e.strerror or e} ({e.filename or 'I/O'})") from None
    finally:
        plan.ckpt.close()
        tmp.unlink(missing_ok=True)
        if proj_tmp is not None:
            proj_tmp.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    summary.path = str(finals[0])
    summary.files = [str(f) for f in finals]
    summary.bytes = sum(f.stat().st_size for f in finals)
    if proj_out is not None:
        summary.mmproj = _projector_summary(plan.projector, proj_out, proj_out.stat().st_size)
    elif kept is not None:
        summary.mmproj = {"path": str(kept), "kept": True, "bytes": kept.stat().st_size}
    summary.seconds = time.perf_counter() - t0
    return summary


def _projector_summary(p: Projector, path: Path, nbytes: int) -> dict:
    return {
        "path": str(path),
        "file_type": p.file_type,
        "bytes": nbytes,
        "params": sum(int(np.prod(t.out.shape)) for t in p.tensors),
        "tensors_per_type": dict(Counter(t.qtype.name for t in p.tensors)),
    }


def _planned_projector_bytes(plan: Plan) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        w = _Writer(path=None, arch="clip")
        _projector_header(w, plan)
        f = Path(d) / "header.gguf"
        w.write_header_to_file(path=f)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = f.stat().st_size
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    return sum(-(-n // align) * align for n in [head] + [t.nbytes for t in plan.projector.tensors])


def _projector_header(w: gguf.GGUFWriter, plan: Plan) -> None:
    for t in plan.projector.tensors:
        w.add_tensor_info(t.out.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    vision.add_metadata(w, plan.ckpt, plan.projector.config, plan.projector.file_type, general_metadata)


def _encode(load, qtype, weights: np.ndarray | None, first: int):
    """One piece, read and encoded (runs on a pool thread); an untransformed piece whose output
    type is its stored type comes back as its shard Span, for the writer to copy in the kernel
    (bf16 with a NaN is read instead: its NaNs are made quiet, as ggml's rounding does)."""
    span = getattr(load, "span", None)
    if span is not None:
        sp = span()
        if quantize.COPY_TYPES[sp.dtype] == qtype:
            if sp.dtype != "bf16":
                return sp
            if not any(quantize.bf16_has_nan(block) for block in sp.blocks()):
                return sp
    x = load()
    w = None if weights is None else weights[first : first + _n_matrices(x.shape)]
    return quantize.encode(x, qtype, w)


def _tofile(data: np.ndarray, fout) -> int:
    data.tofile(fout)
    if data.nbytes >= 1 << 20:
        fout.flush()
        _start_writeback(fout.fileno(), fout.tell() - data.nbytes, data.nbytes)
    return data.nbytes


def _copy_span(span: ckpt_mod.Span, fout) -> int:
    """Append span's bytes to fout: copy_file_range (in the kernel, no pass through Python),
    else pread/write in 16 MiB steps (other platforms, filesystems that refuse it)."""
    fout.flush()
    dst, pos, left, src = fout.fileno(), fout.tell(), span.nbytes, span.offset
    copy = getattr(os, "copy_file_range", None)
    while left and copy is not None:
        try:
            n = copy(span.fd, dst, left, src, pos)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
                raise
            copy = None
            break
        if n == 0:
            raise ConvertError(
                f"{span.shard} ended while copying {span.nbytes} bytes at offset {span.offset}; "
                "the checkpoint is truncated, re-download it"
            )
        src, pos, left = src + n, pos + n, left - n
    while left:
        buf = os.pread(span.fd, min(left, 16 << 20), src)
        if not buf:
            raise ConvertError(
                f"{span.shard} ended while copying {span.nbytes} bytes at offset {span.offset}; "
                "the checkpoint is truncated, re-download it"
            )
        os.pwrite(dst, buf, pos)
        src, pos, left = src + len(buf), pos + len(buf), left - len(buf)
    fout.seek(pos)
    _start_writeback(dst, pos - span.nbytes, span.nbytes)
    return span.nbytes


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Let the kernel start writing a finished range to disk now (Linux: fadvise DONTNEED starts
    asynchronous writeback of dirty pages), so the closing fsync has little left to wait for."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class _Budget:
    """Bytes of pieces handed to the pool and not yet written; take() waits for room (a piece
    larger than the whole budget goes alone) and gives up once stop is set."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop, self.cv = limit, 0, stop, threading.Condition()

    def take(self, n: int) -> bool:
        with self.cv:
            while self.used and self.used + n > self.limit and not self.stop.is_set():
                self.cv.wait(0.1)
            self.used += n
            return not self.stop.is_set()

    def give(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


def _begin_tensor(w: gguf.GGUFWriter, nbytes: int):
    """Start the next tensor's data in the writer's file, as GGUFWriter.write_tensor_data does for
    a whole array (its info popped, the file aligned); the caller writes the bytes in pieces."""
    file_id = next(i for i, tensors in enumerate(w.tensors) if tensors)
    fout = w.fout[file_id]
    info = w.tensors[file_id].pop(next(iter(w.tensors[file_id])))
    if info.nbytes != nbytes:
        raise ConvertError(f"tensor data out of order: expected {info.nbytes} bytes, got {nbytes}")
    w.write_padding(fout, fout.tell())
    return fout


class _Writer(gguf.GGUFWriter):
    """GGUFWriter with vectorised packing of long string and integer arrays (the 248K-token list,
    its types and the merges took ~3 s in the per-item packer). Same bytes: the tests compare the
    metadata with upstream's converter, which uses the stock writer."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if (
            vtype != gguf.GGUFValueType.ARRAY
            or sub_type is not None
            or self.endianess != gguf.GGUFEndian.LITTLE
            or not isinstance(val, (list, tuple))
            or len(val) < 1024
        ):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<I", vtype) if add_vtype else b""
        if all(type(v) is str for v in val):
            enc = [v.encode("utf-8") for v in val]
            lens = np.fromiter(map(len, enc), dtype="<u8", count=len(enc)).tobytes()
            body = b"".join(itertools.chain.from_iterable(zip((lens[i : i + 8] for i in range(0, len(lens), 8)), enc)))
            return head + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(val)) + body
        if all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            arr = np.asarray(val, dtype=np.int64)
            if arr.min() >= -(2**31) and arr.max() < 2**31:  # get_type(int) is INT32, as the stock packer
                return head + struct.pack("<IQ", gguf.GGUFValueType.INT32, len(val)) + arr.astype("<i4").tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _part_sizes(plan: Plan, split_max_size: int = 0) -> list[tuple[int, int]]:
    """(file size, tensors) of each output file with the writer's split limit split_max_size
    (tensor data per part): headers and metadata (written to a scratch folder and measured) plus
    the aligned tensor data."""
    import tempfile

    w = _Writer(path=None, arch=plan.ckpt.arch, split_max_size=split_max_size)
    for t in plan.tensors:
        w.add_tensor_info(t.out.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    _add_metadata(w, plan)
    with tempfile.TemporaryDirectory() as d:
        w.write_header_to_file(path=Path(d) / "plan.gguf")
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        parts = []
        for fout, tensors in zip(w.fout, w.tensors):
            fout.flush()
            head = fout.tell()
            parts.append(
                (
                    head
                    + (-head % w.data_alignment)
                    + sum(info.nbytes + (-info.nbytes % w.data_alignment) for info in tensors.values()),
                    len(tensors),
                )
            )
        w.close()
    return parts


def _planned_file_bytes(plan: Plan, split_max_size: int = 0) -> int:
    """The output's size, all parts together."""
    return sum(size for size, _ in _part_sizes(plan, _split_limit(plan, split_max_size)))


def _split_limit(plan: Plan, max_file_bytes: int) -> int:
    """The writer's limit on tensor data per part that keeps every file, header and metadata
    included, within max_file_bytes (0: no split). A tensor larger than that goes in a part of
    its own, as with llama-gguf-split."""
    if not max_file_bytes:
        return 0
    limit = max_file_bytes
    for _ in range(8):
        over = max((size for size, n in _part_sizes(plan, limit) if n > 1), default=0) - max_file_bytes
        if over <= 0:
            return limit
        limit -= over
        if limit <= 0:
            break
    raise ConvertError(
        f"--split-max-size {max_file_bytes} is too small for the metadata of the first part; use a larger size"
    )


def _write(
    plan: Plan,
    path: Path,
    threads: int,
    on_progress: Callable[[int, int], None] | None,
    split_max_size: int = 0,
    projector: Projector | None = None,
) -> list[Path]:
    """Write the GGUF (or its splits) at path; returns the files written. With projector: the
    vision projector GGUF instead of the model."""
    heads = qwen35.heads(plan.ckpt.config)
    tensors = projector.tensors if projector is not None else plan.tensors
    imatrix = plan.imatrix if projector is None else None
    total_bytes = sum(t.nbytes for t in tensors)
    # a producer thread cuts tensors into pieces and hands them to a pool that reads, transforms
    # and quantizes them in parallel; the writer takes the results in file order from a bounded
    # queue, so memory holds a few pieces whatever the model size. The pool starts at once, so
    # it works while this thread builds the header (vocabulary: ~2 s of Python)
    chunks: queue.Queue = queue.Queue()
    # pieces of at most 64 MiB of float32, smaller on many cores; the producer runs ahead of the
    # writer by bytes, not by pieces (~0.5 GiB in flight at most), so a run of small tensors
    # behind a big one does not starve the pool
    piece_bytes = max(8 << 20, min(64 << 20, (512 << 20) // (threads + 2)))
    stop = threading.Event()
    budget = _Budget(piece_bytes * (threads + 2), stop)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for t in tensors:
                    weights = None
                    if imatrix is not None and t.qtype not in (Q.F32, Q.F16, Q.BF16):
                        weights = imatrix.for_tensor(t.out.name, t.out.shape[-1], _n_matrices(t.out.shape))
                    charge = min(piece_bytes, 4 * int(np.prod(t.out.shape)))
                    for first, load in t.out.pieces(plan.ckpt, heads, piece_bytes):
                        if not budget.take(charge):
                            return
                        chunks.put((t, (charge, pool.submit(_encode, load, t.qtype, weights, first))))
                    chunks.put((t, None))
        except BaseException as e:  # handed to the writer, which raises it
            chunks.put((None, e))

    producer = threading.Thread(target=produce, name="qwen35-convert-producer", daemon=True)
    producer.start()
    done = 0
    w = _Writer(path=None, arch="clip" if projector else plan.ckpt.arch, split_max_size=split_max_size)
    try:
        if projector is not None:
            _projector_header(w, plan)
        else:
            for t in tensors:
                # logical shape (numpy order) with raw_dtype: the writer stores it as ggml ne reversed
                w.add_tensor_info(t.out.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            _add_metadata(w, plan)  # after the tensors: general.size_label counts their parameters
        files = w.format_shard_names(path)
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            fout = _begin_tensor(w, t.nbytes)
            written = 0
            while True:
                got, item = chunks.get()
                if got is None:
                    raise item
                if item is None:
                    break
                charge, future = item
                data = future.result()
                n = _copy_span(data, fout) if isinstance(data, ckpt_mod.Span) else _tofile(data, fout)
                written += n
                done += n
                if on_progress:
                    on_progress(done, total_bytes)
                budget.give(charge)
            if written != t.nbytes:
                raise ConvertError(f"{t.out.name}: produced {written} bytes, planned {t.nbytes}")
            w.write_padding(fout, t.nbytes)
        w.state = WriterState.WEIGHTS
    except BaseException:
        for f in w.fout or []:
            f.close()
        raise
    finally:
        stop.set()
        while producer.is_alive() or not chunks.empty():
            try:
                _, item = chunks.get(timeout=0.1)
                if isinstance(item, tuple):
                    item[1].cancel()
            except queue.Empty:
                pass
    for f in w.fout or []:
        f.flush()
        os.fsync(f.fileno())
    w.close()
    return files
