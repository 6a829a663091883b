"""What a Qwen3.5 GGUF (or Hugging Face directory) holds, and what running it will cost in memory.

>>> kv_bytes_per_token(n_attn_layers=16, n_kv_heads=4, head_dim=256, kv_type="f16")
65536
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GPU_SIZES_GB = (8, 12, 16, 24, 48, 80)
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def kv_bytes_per_token(n_attn_layers: int, n_kv_heads: int, head_dim: int, kv_type: str) -> int:
    """K and V for one token across the full-attention layers (DeltaNet layers keep no KV)."""
    return int(2 * n_attn_layers * n_kv_heads * head_dim * KV_ELEMENT_BYTES[kv_type])


def recurrent_bytes_per_seq(n_linear_layers: int, conv_kernel: int, n_k: int, d_k: int, n_v: int, d_v: int) -> int:
    """The fixed F32 state of one sequence: conv window + delta-rule matrix per DeltaNet layer."""
    conv = (conv_kernel - 1) * (2 * n_k * d_k + n_v * d_v)
    ssm = n_v * d_k * d_v
    return 4 * n_linear_layers * (conv + ssm)


@dataclass
class Report:
    path: str
    architecture: str
    blocks: str  # one letter per block: L = DeltaNet, A = attention, M = MTP
    n_params: int
    weight_bytes: int
    tensors_per_type: dict[str, int]
    bits_per_weight: float
    hparams: dict
    memory: dict = field(default_factory=dict)
    projector: dict | None = None  # the vision projector counted in the plan: path, bytes, params, types


def _n_params(tensors) -> int:
    """Elements of the scanned tensors (Python ints: no overflow whatever the sizes)."""
    n = 0
    for t in tensors:
        k = 1
        for d in t.ne:
            k *= d
        n += k
    return n


def _from_gguf(path: Path) -> Report:
    from qwen35.gguf_scan import qwen35_hparams, scan_model

    s = scan_model(path)  # a split model: all its parts
    if s.get("general.type") == "imatrix" or any(k.startswith("imatrix.") for k in s.kv):
        raise ValueError(
            f"{path} is an importance matrix (llama-imatrix output), not a model; give it to "
            "`qwen35-convert --imatrix` to quantize with it"
        )
    h = qwen35_hparams(s)  # GGUFScanError (a ValueError) names what is wrong
    n_layer, n_mtp = h["n_layer"], h["n_mtp"]
    blocks = "".join("L" if r else "A" for r in h["recurrent"]) + "M" * n_mtp
    n_params = _n_params(s.tensors)
    hp = dict(
        n_layer=n_layer,
        n_mtp=n_mtp,
        hidden=h["n_embd"],
        n_head=h["n_head"],
        n_kv_head=h["n_head_kv"],
        head_dim=h["head_dim"],
        conv_kernel=h["conv_kernel"],
        n_k=h["n_k"],
        d_k=h["d_k"],
        n_v=h["n_v"],
        d_v=h["d_v"],
        n_expert=h["n_expert"],
        n_expert_used=h["n_expert_used"],
        context_length=h["n_ctx_train"],
    )
    wbytes = sum(t.nbytes for t in s.tensors)
    types = Counter(t.qtype.name for t in s.tensors)
    return Report(str(path), h["arch"], blocks, n_params, wbytes, dict(types), 8 * wbytes / max(n_params, 1), hp)


def _projector_gguf(path: Path) -> dict:
    from qwen35.gguf_scan import scan

    s = scan(path)
    if s.get("general.architecture") != "clip" or not s.get("clip.has_vision_encoder"):
        raise ValueError(f"{path} is not a vision projector (general.architecture {s.get('general.architecture')!r})")
    return {
        "path": str(path),
        "bytes": sum(t.nbytes for t in s.tensors),
        "params": _n_params(s.tensors),
        "tensors_per_type": dict(Counter(t.qtype.name for t in s.tensors)),
    }


def _from_hf(path: Path, file_type: str) -> Report:
    from .convert import make_plan, projector_type

    plan = make_plan(path, file_type)
    c = plan.ckpt.config
    plan.ckpt.close()
    blocks = "".join("L" if t == "linear_attention" else "A" for t in c["layer_types"]) + "M" * plan.n_mtp
    hp = dict(
        n_layer=c["num_hidden_layers"],
        n_mtp=plan.n_mtp,
        hidden=c["hidden_size"],
        n_head=c["num_attention_heads"],
        n_kv_head=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        conv_kernel=c["linear_conv_kernel_dim"],
        n_k=c["linear_num_key_heads"],
        d_k=c["linear_key_head_dim"],
        n_v=c["linear_num_value_heads"],
        d_v=c["linear_value_head_dim"],
        n_expert=c.get("num_experts", 0),
        n_expert_used=c.get("num_experts_per_tok", 0),
        context_length=c["max_position_embeddings"],
    )
    types = Counter(t.qtype.name for t in plan.tensors)
    proj = None
    if plan.projector is not None:
        pt = plan.projector.tensors
        proj = {
            "path": f"planned, {projector_type(file_type)}",
            "bytes": plan.projector.total_bytes,
            "params": sum(int(np.prod(t.out.shape)) for t in pt),
            "tensors_per_type": dict(Counter(t.qtype.name for t in pt)),
        }
    return Report(
        str(path),
        plan.ckpt.arch,
        blocks,
        plan.n_params,
        plan.total_bytes,
        dict(types),
        8 * plan.total_bytes / max(plan.n_params, 1),
        hp,
        projector=proj,
    )


def inspect(
    path: str | Path,
    *,
    ctx: int = 4096,
    kv_type: str = "f16",
    parallel: int = 1,
    file_type: str = "BF16",
    mmproj: str | Path | bool | None = None,
) -> Report:
    """Report for a GGUF file or, planned as if converted to file_type, a Hugging Face directory.

    ctx is the total context of all sequences (llama.cpp's -c); each of the parallel sequences
    also holds its fixed recurrent state. mmproj: the vision projector GGUF to count in the plan
    (None: the one mmproj-*.gguf beside a GGUF, or the one a checkpoint would get; False: none)."""
    if parallel < 1:
        raise ValueError(f"--parallel {parallel}: use 1 or more sequences")
    if ctx < 1:
        raise ValueError(f"--ctx {ctx}: use 1 or more tokens")
    if kv_type not in KV_ELEMENT_BYTES:
        raise ValueError(f"--kv-type {kv_type} is not one of {', '.join(KV_ELEMENT_BYTES)}")
    path = Path(path)
    rep = _from_hf(path, file_type) if path.is_dir() else _from_gguf(path)
    if mmproj is False:
        rep.projector = None
    elif mmproj is not None:
        rep.projector = _projector_gguf(Path(mmproj))
    elif not path.is_dir():
        found = sorted(path.resolve().parent.glob("mmproj-*.gguf"))
        if len(found) == 1:
            rep.projector = _projector_gguf(found[0])
    hp = rep.hparams
    n_attn = rep.blocks[: hp["n_layer"]].count("A")
    n_lin = rep.blocks[: hp["n_layer"]].count("L")
    kv = ctx * kv_bytes_per_token(n_attn, hp["n_kv_head"], hp["head_dim"], kv_type)
    state = parallel * recurrent_bytes_per_seq(n_lin, hp["conv_kernel"], hp["n_k"], hp["d_k"], hp["n_v"], hp["d_v"])
    proj = rep.projector["bytes"] if rep.projector else 0
    total = rep.weight_bytes + kv + state + proj
    rep.memory = {
        "ctx": ctx,
        "kv_type": kv_type,
        "parallel": parallel,
        "weights": rep.weight_bytes,
        "projector": proj,
        "kv_cache": kv,
        "recurrent_state": state,
        "total": total,
        "fits_gb": [gb for gb in GPU_SIZES_GB if total * 1.05 + (512 << 20) <= gb * 1e9],
    }
    return rep


def render(rep: Report) -> str:
    gib = 2**30
    m, hp = rep.memory, rep.hparams
    lines = [
        f"{rep.path}",
        f"architecture   {rep.architecture}  ({hp['n_layer']} layers"
        + (f", {hp['n_expert']} experts top-{hp['n_expert_used']}" if hp["n_expert"] else "")
        + (f", MTP {hp['n_mtp']}" if hp["n_mtp"] else "")
        + ")",
        f"blocks         {rep.blocks}   (L DeltaNet, A attention, M MTP)",
        f"parameters     {rep.n_params:,}   weights {rep.weight_bytes / gib:.2f} GiB, "
        f"{rep.bits_per_weight:.2f} bits/weight",
        "types          " + ", ".join(f"{n} {t}" for t, n in sorted(rep.tensors_per_type.items())),
        f"memory plan    ctx {m['ctx']} ({m['kv_type']} KV), {m['parallel']} sequence(s):",
        f"  weights          {m['weights'] / gib:8.2f} GiB",
        f"  KV cache         {m['kv_cache'] / gib:8.2f} GiB   (full-attention layers only)",
        f"  recurrent state  {m['recurrent_state'] / gib:8.2f} GiB   (fixed per sequence, F32)",
        *([f"  vision projector {m['projector'] / gib:8.2f} GiB   ({rep.projector['path']})"] if rep.projector else []),
        f"  total            {m['total'] / gib:8.2f} GiB   + compute buffers",
        "  fits in         " + (", ".join(f"{g} GB" for g in m["fits_gb"]) or "none of 8-80 GB"),
    ]
    return "\n".join(lines)


def as_dict(rep: Report) -> dict:
    return asdict(rep)
