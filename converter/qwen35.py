"""The Qwen3.5 mapping: Hugging Face tensors -> GGUF tensors, and the GGUF metadata.

``LAYER_TABLE`` and ``GLOBAL_TABLE`` are the whole contract, one row per tensor: the HF name
(relative to the layer), the GGUF tensor (``gguf.MODEL_TENSOR``), the transform, and whether it
stays F32. Check them line by line against llama.cpp's src/models/qwen35*.cpp loaders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

from . import transforms as tf
from .checkpoint import Checkpoint, CheckpointError, widen

F32, QUANT = True, False

# (HF name inside a block, GGUF tensor, GGUF suffix, transform, stays F32)
LAYER_TABLE: list[tuple[str, T, str, Callable, bool]] = [
    ("input_layernorm.weight", T.ATTN_NORM, ".weight", tf.norm_plus_one, F32),
    ("post_attention_layernorm.weight", T.ATTN_POST_NORM, ".weight", tf.norm_plus_one, F32),
    # Gated DeltaNet
    ("linear_attn.in_proj_qkv.weight", T.ATTN_QKV, ".weight", tf.qkv_rows, QUANT),
    ("linear_attn.in_proj_z.weight", T.ATTN_GATE, ".weight", tf.v_rows, QUANT),
    ("linear_attn.in_proj_a.weight", T.SSM_ALPHA, ".weight", tf.head_rows, QUANT),
    ("linear_attn.in_proj_b.weight", T.SSM_BETA, ".weight", tf.head_rows, QUANT),
    ("linear_attn.A_log", T.SSM_A, "", tf.neg_exp, F32),
    ("linear_attn.dt_bias", T.SSM_DT, ".bias", tf.head_rows, F32),
    ("linear_attn.conv1d.weight", T.SSM_CONV1D, ".weight", tf.conv1d, F32),
    ("linear_attn.norm.weight", T.SSM_NORM, ".weight", tf.identity, F32),  # gated norm: no +1
    ("linear_attn.out_proj.weight", T.SSM_OUT, ".weight", tf.v_cols, QUANT),
    # gated full attention (q_proj rows interleave [q | gate] per head; the graph splits them)
    ("self_attn.q_proj.weight", T.ATTN_Q, ".weight", tf.identity, QUANT),
    ("self_attn.k_proj.weight", T.ATTN_K, ".weight", tf.identity, QUANT),
    ("self_attn.v_proj.weight", T.ATTN_V, ".weight", tf.identity, QUANT),
    ("self_attn.o_proj.weight", T.ATTN_OUT, ".weight", tf.identity, QUANT),
    ("self_attn.q_norm.weight", T.ATTN_Q_NORM, ".weight", tf.norm_plus_one, F32),
    ("self_attn.k_norm.weight", T.ATTN_K_NORM, ".weight", tf.norm_plus_one, F32),
    # dense MLP
    ("mlp.gate_proj.weight", T.FFN_GATE, ".weight", tf.identity, QUANT),
    ("mlp.up_proj.weight", T.FFN_UP, ".weight", tf.identity, QUANT),
    ("mlp.down_proj.weight", T.FFN_DOWN, ".weight", tf.identity, QUANT),
    # MoE: router, fused experts (per-expert checkpoints are stacked first), shared expert
    ("mlp.gate.weight", T.FFN_GATE_INP, ".weight", tf.identity, F32),
    ("mlp.experts.gate_up_proj#gate", T.FFN_GATE_EXP, ".weight", tf.gate_half, QUANT),
    ("mlp.experts.gate_up_proj#up", T.FFN_UP_EXP, ".weight", tf.up_half, QUANT),
    ("mlp.experts.down_proj", T.FFN_DOWN_EXP, ".weight", tf.identity, QUANT),
    ("mlp.shared_expert.gate_proj.weight", T.FFN_GATE_SHEXP, ".weight", tf.identity, QUANT),
    ("mlp.shared_expert.up_proj.weight", T.FFN_UP_SHEXP, ".weight", tf.identity, QUANT),
    ("mlp.shared_expert.down_proj.weight", T.FFN_DOWN_SHEXP, ".weight", tf.identity, QUANT),
    ("mlp.shared_expert_gate.weight", T.FFN_GATE_INP_SHEXP, ".weight", tf.identity, F32),
    # MTP head (appended as block n_layer; its transformer block uses the rows above)
    ("mtp.fc.weight", T.NEXTN_EH_PROJ, ".weight", tf.identity, QUANT),
    ("mtp.pre_fc_norm_embedding.weight", T.NEXTN_ENORM, ".weight", tf.norm_plus_one, F32),
    ("mtp.pre_fc_norm_hidden.weight", T.NEXTN_HNORM, ".weight", tf.norm_plus_one, F32),
    ("mtp.norm.weight", T.NEXTN_SHARED_HEAD_NORM, ".weight", tf.norm_plus_one, F32),
]

GLOBAL_TABLE: list[tuple[str, T, str, Callable, bool]] = [
    ("embed_tokens.weight", T.TOKEN_EMBD, ".weight", tf.identity, QUANT),
    ("norm.weight", T.OUTPUT_NORM, ".weight", tf.norm_plus_one, F32),
    ("lm_head.weight", T.OUTPUT, ".weight", tf.identity, QUANT),
]

_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")
_VISUAL = ("visual.", "vision", "merger.", "audio")


@dataclass
class OutTensor:
    """One GGUF tensor: where it comes from and how it is made."""

    name: str  # GGUF name
    kind: T
    bid: int | None
    sources: list[str]  # HF tensor names read (several for per-expert stacking)
    transform: Callable
    keep_f32: bool
    shape: tuple[int, ...]  # numpy order (ggml ne reversed)
    order: tuple  # upstream's write order: (position of the HF tensor read last, sub-index)

    def build(self, ckpt: Checkpoint, heads: tf.Heads) -> np.ndarray:
        """The whole tensor as float32."""
        return widen_transformed(next(self.pieces(ckpt, heads, max_bytes=1 << 62))[1]())

    def pieces(self, ckpt: Checkpoint, heads: tf.Heads, max_bytes: int = 64 << 20):
        """The tensor in pieces along its first axis, each at most ~max_bytes of float32: yields
        (first matrix, loader). A loader may run on any thread; it returns the piece either as
        stored (bf16 as uint16, f16, f32) with a reordering transform already applied — no
        arithmetic, so a same-type output can copy it — or, for transforms that compute
        (norm + 1, -exp), as transformed float32. Row-wise transforms are cut into row ranges
        (per-expert stacks one expert at a time), the others come whole. For 3-D tensors a
        piece holds whole matrices (experts) and the first matrix index says which. Loaders of
        untransformed pieces also have ``span()``: where the piece lies in its shard."""
        permutes = self.transform in tf.REORDERS
        row_wise = self.transform in (tf.identity, tf.norm_plus_one, tf.gate_half, tf.up_half)
        total = 4 * int(np.prod(self.shape))

        def load(sources, rows=None, one_expert=False):
            def run():
                if one_expert:
                    x = ckpt.read_raw(sources[0])[None]
                elif len(sources) == 1:
                    x = ckpt.read_raw(sources[0], rows)
                else:
                    x = np.stack([ckpt.read_raw(s) for s in sources])
                if permutes:
                    return self.transform(x, heads)
                return np.ascontiguousarray(self.transform(widen(x), heads), dtype=np.float32)

            if self.transform is tf.identity and len(sources) == 1 and not one_expert:
                run.span = lambda: ckpt.span(sources[0], rows)  # the piece as stored, for a same-type copy
            return run

        if not row_wise or total <= max_bytes or not self.shape:
            yield 0, load(self.sources)
            return
        if len(self.sources) > 1:  # per-expert stacking: one expert at a time
            for i, s in enumerate(self.sources):
                yield i, load([s], one_expert=True)
            return
        n = self.shape[0]
        step = max(1, n * max_bytes // total)
        for a in range(0, n, step):
            yield (a if len(self.shape) > 2 else 0), load(self.sources, (a, min(n, a + step)))


def widen_transformed(x: np.ndarray) -> np.ndarray:
    """A piece (see OutTensor.pieces) as contiguous float32."""
    return np.ascontiguousarray(x if x.dtype == np.float32 else widen(x))


def _split_name(hf: str) -> tuple[str, str | None, str]:
    """HF name -> (scope, block, rest): scope is 'model', 'mtp', 'mtp_layer', 'lm_head' or 'skip';
    block is a decimal block number (a name whose block is not one is refused)."""
    name = hf
    for prefix in ("model.language_model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if any(p in name for p in _VISUAL):
        return "skip", None, hf
    if name.startswith("mtp.layers."):
        parts = name.split(".", 3)
        if len(parts) != 4 or not parts[2].isdecimal() or len(parts[2]) > 6:
            raise CheckpointError(f"unknown tensor {hf!r:.80}: not part of the Qwen3.5 MTP head")
        return "mtp_layer", parts[2], parts[3]
    if name.startswith("mtp."):
        return "mtp", None, name
    if name.startswith("layers."):
        parts = name.split(".", 2)
        if len(parts) != 3 or not parts[1].isdecimal() or len(parts[1]) > 6:
            raise CheckpointError(f"unknown tensor {hf!r:.80}: not part of the Qwen3.5 text model")
        return "model", parts[1], parts[2]
    return "model", None, name


def _expected_shape(rest: str, cfg: dict, h: tf.Heads) -> tuple[int, ...] | None:
    """HF shape of a block tensor from the config (None when not checked here)."""
    H, n_q, n_kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qkv = 2 * h.n_k * h.d_k + h.n_v * h.d_v
    table = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "linear_attn.in_proj_qkv.weight": (qkv, H),
        "linear_attn.in_proj_z.weight": (h.n_v * h.d_v, H),
        "linear_attn.in_proj_a.weight": (h.n_v, H),
        "linear_attn.in_proj_b.weight": (h.n_v, H),
        "linear_attn.A_log": (h.n_v,),
        "linear_attn.dt_bias": (h.n_v,),
        "linear_attn.conv1d.weight": (qkv, 1, cfg["linear_conv_kernel_dim"]),
        "linear_attn.norm.weight": (h.d_v,),
        "linear_attn.out_proj.weight": (H, h.n_v * h.d_v),
        "self_attn.q_proj.weight": (2 * n_q * hd, H),
        "self_attn.k_proj.weight": (n_kv * hd, H),
        "self_attn.v_proj.weight": (n_kv * hd, H),
        "self_attn.o_proj.weight": (H, n_q * hd),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
    }
    V = cfg["vocab_size"]
    table.update(
        {
            # the model's own tensors
            "embed_tokens.weight": (V, H),
            "norm.weight": (H,),
            "lm_head.weight": (V, H),
            # the MTP head's own tensors (its transformer block is checked as a layer)
            "mtp.fc.weight": (H, 2 * H),
            "mtp.pre_fc_norm_embedding.weight": (H,),
            "mtp.pre_fc_norm_hidden.weight": (H,),
            "mtp.norm.weight": (H,),
        }
    )
    if "intermediate_size" in cfg:
        I = cfg["intermediate_size"]
        table.update({"mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I)})
    if "num_experts" in cfg and "moe_intermediate_size" in cfg:
        E, I, S = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
        table.update(
            {
                "mlp.gate.weight": (E, H),
                "mlp.experts.gate_up_proj": (E, 2 * I, H),
                "mlp.experts.down_proj": (E, H, I),
                "mlp.shared_expert.gate_proj.weight": (S, H),
                "mlp.shared_expert.up_proj.weight": (S, H),
                "mlp.shared_expert.down_proj.weight": (H, S),
                "mlp.shared_expert_gate.weight": (1, H),
                # transformers' per-expert save format, stacked into the fused layout
                "mlp.experts.N.gate_proj.weight": (I, H),
                "mlp.experts.N.up_proj.weight": (I, H),
                "mlp.experts.N.down_proj.weight": (H, I),
            }
        )
    return table.get(_EXPERT_INDEX.sub(".experts.N.", rest))


def _check_shape(hf: str, shape, rest: str, cfg: dict, h: tf.Heads) -> None:
    want = _expected_shape(rest, cfg, h)
    if want is not None and tuple(shape) != want:
        raise CheckpointError(
            f"tensor {hf} has shape {list(shape)}, expected {list(want)} from config.json; "
            "the checkpoint and its config do not match"
        )


def heads(cfg: dict) -> tf.Heads:
    h = tf.Heads(
        cfg["linear_num_key_heads"],
        cfg["linear_num_value_heads"],
        cfg["linear_key_head_dim"],
        cfg["linear_value_head_dim"],
    )
    if h.n_v % h.n_k:
        raise CheckpointError(f"linear_num_value_heads ({h.n_v}) must be a multiple of linear_num_key_heads ({h.n_k})")
    return h


def n_mtp_layers(ckpt: Checkpoint) -> int:
    """MTP blocks: from the config, else counted from the mtp.layers.* tensors."""
    n = ckpt.config.get("mtp_num_hidden_layers") or 0
    if n:
        return n
    idx = {int(b) for s, b, _ in map(_split_name, ckpt.tensors) if s == "mtp_layer" and b is not None}
    return max(idx) + 1 if idx else 0


def plan_tensors(ckpt: Checkpoint, mtp: str = "keep") -> list[OutTensor]:
    """Every GGUF tensor of the model, in upstream's order. mtp: keep | drop | only."""
    cfg, h = ckpt.config, heads(ckpt.config)
    n_layer = cfg["num_hidden_layers"]
    n_mtp = n_mtp_layers(ckpt) if mtp != "drop" else 0
    if mtp == "only" and n_mtp == 0:
        raise CheckpointError(f"{ckpt.path} has no MTP head (no mtp.* tensors); --mtp only needs one")
    rows = {row[0]: row for row in LAYER_TABLE}
    grows = {row[0]: row for row in GLOBAL_TABLE}
    out: list[OutTensor] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}

    position = {hf: i for i, hf in enumerate(ckpt.tensors)}

    def add(row, bid, sources, hf_shape, sub=0):
        key, kind, suffix, fn, keep = row
        gname = TENSOR_NAMES[kind].format(bid=bid) + suffix
        out.append(
            OutTensor(gname, kind, bid, sources, fn, keep, _shape_of(key, hf_shape), (position[sources[0]], sub))
        )

    for hf, ref in ckpt.tensors.items():
        scope, block, rest = _split_name(hf)
        if scope == "skip":
            continue
        if scope in ("mtp", "mtp_layer") and (mtp == "drop" or n_mtp == 0):
            continue
        if scope == "mtp":
            row = rows.get(rest)
            if row is None or not rest.startswith("mtp."):
                raise CheckpointError(f"unknown tensor {hf} {list(ref.shape)}: not part of the Qwen3.5 MTP head")
            _check_shape(hf, ref.shape, rest, cfg, h)
            add(row, n_layer, [hf], ref.shape)
            continue
        if scope == "mtp_layer":
            bid = n_layer + int(block)
        else:
            if mtp == "only" and rest not in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
                continue
            bid = int(block) if block is not None else None
        if bid is None:
            row = grows.get(rest)
            if row is None:
                raise CheckpointError(f"unknown tensor {hf} {list(ref.shape)}: not part of the Qwen3.5 text model")
            _check_shape(hf, ref.shape, rest, cfg, h)
            add(row, None, [hf], ref.shape)
            continue
        if bid >= n_layer + max(n_mtp, 0) or (scope == "model" and bid >= n_layer):
            raise CheckpointError(f"tensor {hf} is in block {bid}, but the config has {n_layer} layers")
        _check_shape(hf, ref.shape, rest, cfg, h)
        m = _EXPERT.match(rest)
        if m:
            experts.setdefault((bid, m.group(2)), {})[int(m.group(1))] = hf
            continue
        if rest == "mlp.experts.gate_up_proj":
            add(rows["mlp.experts.gate_up_proj#gate"], bid, [hf], ref.shape)
            add(rows["mlp.experts.gate_up_proj#up"], bid, [hf], ref.shape, sub=1)
            continue
        row = rows.get(rest)
        if row is None or row[0].startswith("mtp."):
            raise CheckpointError(f"unknown tensor {hf} {list(ref.shape)}: not part of the Qwen3.5 text model")
        add(row, bid, [hf], ref.shape)

    # per-expert tensors: stacked [E, ...] and written, down/gate/up, where the block's last one was read
    n_exp = cfg.get("num_experts", 0)
    for bid in sorted({b for b, _ in experts}):
        last = max(position[hf] for (b, _), members in experts.items() if b == bid for hf in members.values())
        for sub, w in enumerate(("down", "gate", "up")):
            members = experts.get((bid, w), {})
            if sorted(members) != list(range(n_exp)):
                missing = sorted(set(range(n_exp)) - set(members))
                raise CheckpointError(
                    f"block {bid}: per-expert mlp.experts.N.{w}_proj tensors missing for "
                    f"experts {missing[:5]} (num_experts={n_exp})"
                )
            srcs = [members[i] for i in range(n_exp)]
            kind = {"down": T.FFN_DOWN_EXP, "gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP}[w]
            out.append(
                OutTensor(
                    TENSOR_NAMES[kind].format(bid=bid) + ".weight",
                    kind,
                    bid,
                    srcs,
                    tf.identity,
                    QUANT,
                    (n_exp, *ckpt.tensors[srcs[0]].shape),
                    (last, sub),
                )
            )
    _check_complete(out, ckpt, n_layer, n_mtp, mtp)
    out.sort(key=lambda o: o.order)
    return out


def _shape_of(key: str, hf_shape) -> tuple[int, ...]:
    if key.endswith("#gate") or key.endswith("#up"):
        return (hf_shape[0], hf_shape[1] // 2, *hf_shape[2:])
    if key == "linear_attn.conv1d.weight":
        return (hf_shape[0], hf_shape[-1])
    return tuple(hf_shape)


def _check_complete(out: list[OutTensor], ckpt: Checkpoint, n_layer: int, n_mtp: int, mtp: str) -> None:
    types = ckpt.config["layer_types"]
    for o in out:  # layer_types must match the tensors each block actually has
        if o.bid is not None and o.bid < n_layer:
            linear = types[o.bid] == "linear_attention"
            if (linear and o.kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)) or (
                not linear and o.kind in (T.SSM_A, T.ATTN_QKV)
            ):
                raise CheckpointError(
                    f"config layer_types[{o.bid}] = {types[o.bid]} but the checkpoint has "
                    f"{o.sources[0]}; fix layer_types in config.json"
                )
    names = {o.name for o in out}
    moe = ckpt.arch == "qwen35moe"
    need = []
    if mtp != "only":
        need += ["token_embd.weight", "output_norm.weight"]
        for b in range(n_layer):
            need.append(f"blk.{b}.attn_norm.weight")
            need.append(f"blk.{b}.ssm_a" if types[b] == "linear_attention" else f"blk.{b}.attn_q.weight")
            need.append(f"blk.{b}.ffn_gate_inp.weight" if moe else f"blk.{b}.ffn_down.weight")
    for b in range(n_layer, n_layer + n_mtp):
        need += [f"blk.{b}.nextn.eh_proj.weight", f"blk.{b}.attn_q.weight"]
    for n in need:
        if n not in names:
            raise CheckpointError(
                f"missing tensor for {n} (layer types "
                f"{''.join('L' if t[0] == 'l' else 'A' for t in types)}): "
                "the checkpoint is incomplete or its config does not match its tensors"
            )
