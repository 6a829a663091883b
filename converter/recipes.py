"""Per-tensor type recipes for quantized file types.

``upstream`` reproduces llama-quantize's choices (src/llama-quant.cpp of the pinned llama.cpp:
tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback) for the tensors a
Qwen3.5 GGUF holds, as if llama-quantize ran on this converter's F32 output. It is one pure
function over the ordered tensor list, because llama-quantize's choices depend on counters that
advance in file order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q

F = LlamaFileType

# ftype -> default tensor type (llama_ftype_get_default_type)
DEFAULT_TYPE = {
    F.MOSTLY_Q4_0: Q.Q4_0,
    F.MOSTLY_Q5_0: Q.Q5_0,
    F.MOSTLY_Q8_0: Q.Q8_0,
    F.MOSTLY_Q2_K: Q.Q2_K,
    F.MOSTLY_Q3_K_S: Q.Q3_K,
    F.MOSTLY_Q3_K_M: Q.Q3_K,
    F.MOSTLY_Q3_K_L: Q.Q3_K,
    F.MOSTLY_Q4_K_S: Q.Q4_K,
    F.MOSTLY_Q4_K_M: Q.Q4_K,
    F.MOSTLY_Q5_K_S: Q.Q5_K,
    F.MOSTLY_Q5_K_M: Q.Q5_K,
    F.MOSTLY_Q6_K: Q.Q6_K,
    F.MOSTLY_IQ4_NL: Q.IQ4_NL,
    F.MOSTLY_IQ4_XS: Q.IQ4_XS,
    F.MOSTLY_IQ2_XXS: Q.IQ2_XXS,
    F.MOSTLY_IQ2_XS: Q.IQ2_XS,
    F.MOSTLY_IQ2_S: Q.IQ2_XS,
    F.MOSTLY_IQ2_M: Q.IQ2_S,
    F.MOSTLY_IQ3_XXS: Q.IQ3_XXS,
    F.MOSTLY_IQ3_XS: Q.IQ3_S,
    F.MOSTLY_IQ3_S: Q.IQ3_S,
    F.MOSTLY_IQ3_M: Q.IQ3_S,
    F.MOSTLY_IQ1_S: Q.IQ1_S,
    F.MOSTLY_IQ1_M: Q.IQ1_M,
}

# tensor_type_fallback: a type whose block does not divide the row length falls back to these
FALLBACK = {
    Q.IQ1_S: Q.IQ4_NL,
    Q.IQ1_M: Q.IQ4_NL,
    Q.IQ2_XXS: Q.IQ4_NL,
    Q.IQ2_XS: Q.IQ4_NL,
    Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL,
    Q.IQ3_S: Q.IQ4_NL,
    Q.IQ4_XS: Q.IQ4_NL,
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}

# tensor types that are garbage without an importance matrix (tensor_requires_imatrix)
REQUIRES_IMATRIX = frozenset({Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S})

# ftypes of the very-low-bit i-quant branch of llama_tensor_get_type_impl
_IQ12 = (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)


@dataclass(frozen=True)
class TensorDesc:
    name: str
    ne: tuple[int, ...]  # ggml order (ne[0] = row length)


@dataclass(frozen=True)
class ModelDesc:
    n_layer_all: int  # block_count, MTP blocks included
    n_expert: int
    n_gqa: int  # attention heads per KV head


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_qkv"),
        ("attn_kv_b.weight", "attn_kv_b"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def allows_quantization(t: TensorDesc) -> bool:
    n_dims = len(t.ne)
    while n_dims > 1 and t.ne[n_dims - 1] == 1:
        n_dims -= 1
    if n_dims < 2 or not t.name.endswith("weight"):
        return False
    return not any(s in t.name for s in ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d"))


def _fallback(t: TensorDesc, qtype: Q) -> Q:
    ncols = t.ne[0]
    if ncols % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    return out if ncols % GGML_QUANT_SIZES[out][0] == 0 else Q.F16


def requires_imatrix(name: str, qtype: Q | None) -> bool:
    """tensor_requires_imatrix: token_embd and output never do (Q2_K_S is not offered here)."""
    if qtype is None or name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in REQUIRES_IMATRIX


def upstream_types(
    tensors: list[TensorDesc],
    ftype: LlamaFileType,
    model: ModelDesc,
    overrides: list[tuple[str, Q]] = (),
    has_imatrix: bool = False,
) -> list[Q | None]:
    """llama-quantize's type for each tensor, in order; None = not quantized (stays F32).

    A port of llama_tensor_get_type_impl for arch qwen35/qwen35moe (the Falcon, GLM, MXFP4,
    ternary and 70B branches cannot trigger); branch order and counters as in the C++."""
    default = DEFAULT_TYPE[ftype]
    cats = [_category(t.name) for t in tensors]
    n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
    tied = "output" not in cats
    n_ffn = model.n_layer_all
    n_expert = model.n_expert
    gqa = model.n_gqa
    i = {"attn_wv": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    compiled = [(re.compile(p), q) for p, q in overrides]

    def more_bits(il: int, n: int) -> bool:
        return il < n // 8 or il >= 7 * n // 8 or (il - n // 8) % 3 == 2

    def layer(counter: str, name: str) -> int:
        if max(1, n_expert) > 1:
            m = re.match(r"blk\.(\d+)\.", name)
            return int(m.group(1))
        return i[counter]

    def impl(t: TensorDesc, cat: str, new: Q) -> Q:
        if cat == "output" or (tied and cat == "token_embd"):
            if t.ne[0] % GGML_QUANT_SIZES[new][0]:
                return Q.Q8_0
            if ftype in _IQ12 or ftype == F.MOSTLY_IQ3_XXS:
                return Q.Q5_K
            return new if new == Q.Q8_0 else Q.Q6_K
        if cat == "token_embd":
            if ftype in (F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                return Q.Q2_K
            if ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ3_XXS):
                return Q.IQ3_S
            return new
        if ftype in _IQ12:
            iq2sm = ftype in (F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
            if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
                new = Q.Q4_K if gqa >= 4 or n_expert >= 4 else (Q.IQ3_S if iq2sm else Q.Q2_K)
                i["attn_wv"] += 1
            elif n_expert == 8 and cat == "attn_k":
                new = Q.Q4_K
            elif cat == "ffn_down":
                if i["ffn_down"] < n_ffn // 8:
                    new = Q.IQ3_S if iq2sm else Q.Q2_K
                i["ffn_down"] += 1
            elif cat == "attn_output":
                if n_expert == 8:
                    new = Q.Q5_K
                elif ftype in (F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M):
                    new = Q.IQ2_XXS
                elif iq2sm:
                    new = Q.IQ3_S
            return new
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if ftype == F.MOSTLY_Q2_K:
                new = Q.Q4_K if gqa >= 4 else Q.Q3_K
            elif ftype == F.MOSTLY_IQ3_XXS:
                new = Q.Q4_K if gqa >= 4 else (Q.IQ3_S if not has_imatrix else Q.IQ3_XXS)
            elif (ftype in (F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S) and gqa >= 4) or ftype == F.MOSTLY_IQ3_M:
                new = Q.Q4_K
            elif ftype == F.MOSTLY_Q3_K_M:
                new = Q.Q5_K if i["attn_wv"] < 2 else Q.Q4_K
            elif ftype == F.MOSTLY_Q3_K_L or (ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and gqa >= 4):
                new = Q.Q5_K
            elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and more_bits(i["attn_wv"], n_attention_wv):
                new = Q.Q6_K
            elif ftype == F.MOSTLY_Q4_K_S and i["attn_wv"] < 4:
                new = Q.Q5_K
            if n_expert == 8:
                new = Q.Q8_0
            i["attn_wv"] += 1
        elif cat == "attn_k":
            if n_expert == 8:
                new = Q.Q8_0
            elif ftype == F.MOSTLY_IQ3_XS:
                new = Q.IQ3_XXS
            elif ftype == F.MOSTLY_IQ3_XXS:
                new = Q.IQ2_S
        elif cat == "attn_q":
            if ftype == F.MOSTLY_IQ3_XS:
                new = Q.IQ3_XXS
            elif ftype == F.MOSTLY_IQ3_XXS:
                new = Q.IQ2_S
        elif cat == "ffn_down":
            il, n = layer("ffn_down", t.name), n_ffn
            if ftype == F.MOSTLY_Q2_K:
                new = Q.Q3_K
            elif ftype == F.MOSTLY_IQ3_XXS and not has_imatrix:
                new = Q.Q4_K if il < n // 8 else Q.Q3_K
            elif ftype == F.MOSTLY_Q3_K_M:
                new = Q.Q5_K if il < n // 16 else Q.Q4_K
            elif ftype == F.MOSTLY_IQ3_M and (il < n // 8 or (n_expert == 8 and more_bits(il, n))):
                new = Q.Q4_K
            elif ftype == F.MOSTLY_Q3_K_L:
                new = Q.Q5_K
            elif ftype == F.MOSTLY_Q4_K_M:
                if more_bits(il, n):
                    new = Q.Q6_K
            elif il < n // 8 and ftype in (F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS) and not has_imatrix:
                new = Q.Q5_K
            elif ftype == F.MOSTLY_Q5_K_M and more_bits(il, n):
                new = Q.Q6_K
            elif ftype == F.MOSTLY_Q4_K_S and il < n // 8:
                new = Q.Q5_K
            elif ftype in (F.MOSTLY_Q4_0, F.MOSTLY_Q5_0) and has_imatrix and il < n // 8:
                new = Q.Q4_1 if ftype == F.MOSTLY_Q4_0 else Q.Q5_1
            i["ffn_down"] += 1
        elif cat == "attn_output":
            if n_expert == 8:
                if ftype in (
                    F.MOSTLY_Q2_K,
                    F.MOSTLY_IQ3_XS,
                    F.MOSTLY_IQ3_XXS,
                    F.MOSTLY_Q3_K_S,
                    F.MOSTLY_Q3_K_M,
                    F.MOSTLY_IQ4_NL,
                    F.MOSTLY_Q4_K_S,
                    F.MOSTLY_Q4_K_M,
                    F.MOSTLY_IQ3_S,
                    F.MOSTLY_IQ3_M,
                    F.MOSTLY_IQ4_XS,
                ):
                    new = Q.Q5_K
            else:
                new = {
                    F.MOSTLY_Q2_K: Q.Q3_K,
                    F.MOSTLY_IQ3_XXS: Q.IQ3_S,
                    F.MOSTLY_Q3_K_M: Q.Q4_K,
                    F.MOSTLY_Q3_K_L: Q.Q5_K,
                    F.MOSTLY_IQ3_M: Q.Q4_K,
                }.get(ftype, new)
        elif cat in ("ffn_gate", "ffn_up"):
            il, n = layer(cat, t.name), n_ffn
            if ftype == F.MOSTLY_IQ3_XS and n // 8 <= il < 7 * n // 8:
                new = Q.IQ3_XXS
            i[cat] += 1
        return new

    out: list[Q | None] = []
    for t, cat in zip(tensors, cats):
        if not allows_quantization(t):
            out.append(None)
            continue
        manual = next((q for rx, q in compiled if rx.search(t.name)), None)
        new = manual if manual is not None else impl(t, cat, default)
        out.append(_fallback(t, new))
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, Q]]:
    """llama-quantize's --tensor-type REGEX=TYPE (type names as ggml spells them, any case)."""
    out = []
    for item in items:
        pattern, sep, name = item.rpartition("=")
        try:
            qtype = Q[name.strip().upper()]
        except KeyError:
            qtype = None
        if not sep or not pattern or qtype is None:
            raise ValueError(f"--tensor-type {item!r}: write REGEX=TYPE, e.g. 'ffn_down=q6_k'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"--tensor-type {item!r}: bad regex ({e})") from None
        out.append((pattern, qtype))
    return out


# ---------------------------------------------------------------- the qwen35 recipe
#
# Where llama-quantize spends bits by tensor kind for dense Llama-style models, Qwen3.5's hybrid
# layers have their own sensitive parts. Measured on the trained demo checkpoints
# (bench/quant_sensitivity.py, Q4_K_M base): the Gated DeltaNet projections buy the most quality
# per extra byte -- its decay/beta gates (ssm_alpha, ssm_beta: tiny matrices whose error
# compounds through the recurrent state), its output (ssm_out) and its input projections
# (attn_qkv, and the output gate attn_gate) -- then the shared expert, which every token passes
# through; the two full-attention layers of a 3:1 stack gained nothing from more bits, and the
# MLP and routed experts gain least per byte. So the recipe raises the DeltaNet path and the
# shared expert and keeps everything else at llama-quantize's choice.
#
# The table is applied over llama-quantize's own choices for the same target: a cell is a floor
# for that group (a tensor upstream stores in fewer bits gets the cell's type; one upstream
# already gives more keeps it), "." keeps upstream's choice, so the recipe only adds bits.
# Row-length fallbacks and --tensor-type overrides apply as upstream. "mtp" is every tensor of
# the MTP block: llama-imatrix never runs it, so low-bit targets keep it at 4 bits or more.

QWEN35_GROUPS = {  # column -> GGUF tensor names (regex); "mtp" is every tensor of the MTP block
    "gates": r"\.ssm_(alpha|beta)\.weight$",
    "attn": r"\.attn_(q|k|v|output)\.weight$",
    "dn_in": r"\.attn_(qkv|gate)\.weight$",
    "dn_out": r"\.ssm_out\.weight$",
    "shexp": r"\.ffn_(gate|up|down)_shexp\.weight$",
    "exp_gu": r"\.ffn_(gate|up)_exps\.weight$",
    "exp_down": r"\.ffn_down_exps\.weight$",
    "ffn_gu": r"\.ffn_(gate|up)\.weight$",
    "ffn_down": r"\.ffn_down\.weight$",
    "output": r"^output\.weight$",
    "embd": r"^token_embd\.weight$",
}

QWEN35_COLUMNS = ("mtp",) + tuple(QWEN35_GROUPS)
QWEN35_TABLE = {
    # target     mtp     gates  attn  dn_in   dn_out  shexp   exp_gu exp_down ffn_gu ffn_down output embd
    "Q8_0": (".", "F16", ".", ".", ".", ".", ".", ".", ".", ".", ".", "."),
    "Q6_K": (".", "F16", ".", ".", "Q8_0", "Q8_0", ".", ".", ".", ".", ".", "."),
    "Q5_K_M": (".", "F16", ".", "Q6_K", "Q6_K", "Q6_K", ".", ".", ".", ".", ".", "."),
    "Q4_K_M": ("Q4_K", "F16", ".", "Q5_K", "Q6_K", "Q5_K", ".", ".", ".", ".", ".", "."),
    "IQ4_XS": ("Q4_K", "F16", ".", "Q5_K", "Q5_K", "Q5_K", ".", ".", ".", ".", ".", "."),
    "Q3_K_M": ("Q4_K", "F16", ".", "Q4_K", "Q5_K", "Q4_K", ".", ".", ".", ".", ".", "."),
    "IQ3_XXS": ("Q4_K", "F16", ".", "IQ4_XS", "Q4_K", "IQ4_XS", ".", ".", ".", ".", ".", "."),
}


def qwen35_rules(target: str, n_layer: int) -> list[tuple[re.Pattern, Q]]:
    """The table's row for target as (compiled regex, type) rules, first match wins; n_layer is
    the trunk's block count (blocks from n_layer on are the MTP block)."""
    if target not in QWEN35_TABLE:
        raise KeyError(f"--recipe qwen35 has mixes for {', '.join(QWEN35_TABLE)}, not {target}")
    rules = []
    for col, cell in zip(QWEN35_COLUMNS, QWEN35_TABLE[target]):
        if cell == ".":
            continue
        rx = rf"^blk\.(?!(?:{'|'.join(str(i) for i in range(n_layer))})\.)\d+\." if col == "mtp" else QWEN35_GROUPS[col]
        rules.append((re.compile(rx), Q[cell]))
    return rules


def qwen35_types(
    tensors: list[TensorDesc],
    target: str,
    ftype: LlamaFileType,
    model: ModelDesc,
    n_layer: int,
    overrides: list[tuple[str, Q]] = (),
    has_imatrix: bool = False,
) -> list[Q | None]:
    """The qwen35 recipe: upstream's types for ftype, then the table's cells for target on the
    tensors upstream quantizes (a --tensor-type override still wins), with upstream's fallbacks."""
    base = upstream_types(tensors, ftype, model, overrides, has_imatrix)
    user = [re.compile(p) for p, _ in overrides]
    rules = qwen35_rules(target, n_layer)
    out = []
    for t, q in zip(tensors, base):
        cell = next((r for rx, r in rules if rx.search(t.name)), None)
        if q is not None and cell is not None and not any(rx.search(t.name) for rx in user):
            cand = _fallback(t, cell)
            if bits_per_weight(cand) > bits_per_weight(q):
                q = cand
        out.append(q)
    return out


def bits_per_weight(q: Q) -> float:
    block, size = GGML_QUANT_SIZES[q]
    return 8 * size / block


RECIPES = ("upstream", "qwen35")
