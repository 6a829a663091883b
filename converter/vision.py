"""The Qwen3.5 vision projector (mmproj): Hugging Face vision tower -> llama.cpp's clip GGUF.

Every released Qwen3.5 checkpoint carries a vision tower (``model.visual.*``: a ViT with 3-D
patch embedding, learned positions, and a 2x2 patch merger into the text width). llama.cpp runs
it from a second GGUF (architecture ``clip``, projector type ``qwen3vl_merger``) beside the text
model; libmtmd loads both. ``VISION_TABLE`` is the contract, one row per tensor as in
``qwen35.LAYER_TABLE``; check it against llama.cpp's tools/mtmd/clip.cpp (PROJECTOR_TYPE_QWEN3VL)
and conversion/qwen3vl.py. The metadata keys, their order and the tensor types are those of
upstream's ``convert_hf_to_gguf.py --mmproj`` (the tests compare the files byte for byte).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import gguf
from gguf import MODEL_TENSOR as T
from gguf import TENSOR_NAMES

from . import transforms as tf
from .checkpoint import Checkpoint, CheckpointError
from .qwen35 import OutTensor

Q = gguf.GGMLQuantizationType
PREFIXES = ("model.visual.", "model.language_model.visual.", "visual.")  # the second: some fine-tunes
PROJECTOR_TYPES = ("F32", "F16", "BF16", "Q8_0")  # what upstream writes a projector in
FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
F32 = True


# (HF name inside a block, GGUF tensor, GGUF suffix, transform, stays F32)
BLOCK_TABLE: list[tuple[str, T, str, Callable, bool]] = [
    ("attn.qkv.weight", T.V_ENC_ATTN_QKV, ".weight", tf.identity, False),
    ("attn.qkv.bias", T.V_ENC_ATTN_QKV, ".bias", tf.identity, F32),
    ("attn.proj.weight", T.V_ENC_ATTN_O, ".weight", tf.identity, False),
    ("attn.proj.bias", T.V_ENC_ATTN_O, ".bias", tf.identity, F32),
    ("mlp.linear_fc1.weight", T.V_ENC_FFN_UP, ".weight", tf.identity, False),
    ("mlp.linear_fc1.bias", T.V_ENC_FFN_UP, ".bias", tf.identity, F32),
    ("mlp.linear_fc2.weight", T.V_ENC_FFN_DOWN, ".weight", tf.identity, False),
    ("mlp.linear_fc2.bias", T.V_ENC_FFN_DOWN, ".bias", tf.identity, F32),
    ("norm1.weight", T.V_ENC_INPUT_NORM, ".weight", tf.identity, F32),  # LayerNorm: stored as is
    ("norm1.bias", T.V_ENC_INPUT_NORM, ".bias", tf.identity, F32),
    ("norm2.weight", T.V_ENC_POST_ATTN_NORM, ".weight", tf.identity, F32),
    ("norm2.bias", T.V_ENC_POST_ATTN_NORM, ".bias", tf.identity, F32),
]
# (HF name, GGUF tensor, block id, GGUF suffix, transform, stays F32); the Conv3D gives two tensors
GLOBAL_TABLE: list[tuple[str, T, int | None, str, Callable, bool]] = [
    ("merger.linear_fc1.weight", T.V_MMPROJ, 0, ".weight", tf.identity, False),
    ("merger.linear_fc1.bias", T.V_MMPROJ, 0, ".bias", tf.identity, F32),
    ("merger.linear_fc2.weight", T.V_MMPROJ, 2, ".weight", tf.identity, False),
    ("merger.linear_fc2.bias", T.V_MMPROJ, 2, ".bias", tf.identity, F32),
    ("merger.norm.weight", T.V_POST_NORM, None, ".weight", tf.identity, F32),
    ("merger.norm.bias", T.V_POST_NORM, None, ".bias", tf.identity, F32),
    ("patch_embed.proj.weight", T.V_ENC_EMBD_PATCH, None, ".weight", tf.frame_0, False),
    ("patch_embed.proj.weight", T.V_ENC_EMBD_PATCH, None, ".weight.1", tf.frame_1, False),
    ("patch_embed.proj.bias", T.V_ENC_EMBD_PATCH, None, ".bias", tf.identity, F32),
    ("pos_embed.weight", T.V_ENC_EMBD_POS, None, ".weight", tf.identity, F32),  # upstream keeps it F32
]
_BLOCK = re.compile(r"^blocks\.(\d{1,6})\.(.+)$")
# vision config keys that size tensors: each a positive whole number (bounds far above any release)
_SIZES = {
    "depth": 1024,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_heads": 1024,
    "patch_size": 1024,
    "spatial_merge_size": 64,
    "num_position_embeddings": 1 << 24,
    "out_hidden_size": 1 << 17,
    "in_channels": 64,
}
_DEFAULTS = {"in_channels": 3, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304}


def vision_tensors(ckpt: Checkpoint) -> dict[str, str]:
    """The vision tower's tensors: name inside the tower -> HF name, in checkpoint order."""
    out = {}
    for hf in ckpt.tensors:
        for p in PREFIXES:
            if hf.startswith(p):
                out.setdefault(hf[len(p) :], hf)
                break
    return out


def has_vision(ckpt: Checkpoint) -> bool:
    return isinstance(ckpt.raw_config.get("vision_config"), dict) and bool(vision_tensors(ckpt))


def vision_config(ckpt: Checkpoint) -> dict:
    """config.json's vision_config with the defaults of transformers' Qwen3_5VisionConfig, every
    value that sizes a tensor checked."""
    raw = ckpt.raw_config.get("vision_config")
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{ckpt.path} has no vision_config in config.json; it has no vision tower to convert (leave out --mmproj)"
        )
    v = {**_DEFAULTS, **raw}
    for key, top in _SIZES.items():
        x = v.get(key)
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= top:
            raise CheckpointError(
                f"config.json vision_config.{key} is {x!r:.40}; it must be a whole number from 1 to {top}"
            )
    if "image_size" in v and (
        isinstance(v["image_size"], bool) or not isinstance(v["image_size"], int) or not 0 < v["image_size"] <= 1 << 20
    ):
        raise CheckpointError(
            f"config.json vision_config.image_size is {v['image_size']!r:.40}; it must be a whole number of pixels"
        )
    if v["temporal_patch_size"] != 2:
        raise CheckpointError(
            f"config.json vision_config.temporal_patch_size is {v['temporal_patch_size']!r:.20}; "
            "llama.cpp's Qwen3.5 projector takes 2 (as released)"
        )
    if v["hidden_size"] % v["num_heads"]:
        raise CheckpointError(
            f"config.json vision_config.hidden_size ({v['hidden_size']}) is not a multiple of "
            f"num_heads ({v['num_heads']})"
        )
    if v["out_hidden_size"] != ckpt.config["hidden_size"]:
        raise CheckpointError(
            f"config.json vision_config.out_hidden_size ({v['out_hidden_size']}) must equal the text "
            f"model's hidden_size ({ckpt.config['hidden_size']}): the projector feeds image embeddings to it"
        )
    ds = v.get("deepstack_visual_indexes", [])
    if ds:
        raise CheckpointError(
            "config.json vision_config.deepstack_visual_indexes is not empty: that is a Qwen3-VL tower, "
            "not Qwen3.5's; convert it with upstream's convert_hf_to_gguf.py --mmproj"
        )
    return v


def preprocessor(ckpt: Checkpoint) -> dict:
    """image_mean and image_std, as upstream reads them: preprocessor_config.json, then
    processor_config.json's image_processor over it."""
    cfg: dict = {}
    for name, inner in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        f = ckpt.path / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_bytes())
        except ValueError as e:
            raise CheckpointError(f"{f} is not valid JSON ({e!s:.80}); re-download it") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{f} must be a JSON object; re-download it")
        if isinstance(d.get(inner), dict):
            d = {**d, **d[inner]}
        cfg.update(d)
    if not cfg:
        raise CheckpointError(
            f"{ckpt.path} has no preprocessor_config.json (the image mean and std the projector needs); "
            "download it with the checkpoint, or pass --no-mmproj for the text model alone"
        )
    for key in ("image_mean", "image_std"):
        x = cfg.get(key)
        if not (
            isinstance(x, list)
            and len(x) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c == c and abs(c) < 1e6 for c in x)
        ):
            raise CheckpointError(f"preprocessor_config.json {key} is {x!r:.60}; it must be 3 numbers (R, G, B)")
        if key == "image_std" and not all(c > 0 for c in x):
            raise CheckpointError(f"preprocessor_config.json image_std is {x!r:.60}; every value must be above 0")
    return cfg


def _expected(rest: str, v: dict) -> tuple[int, ...]:
    H, I, m2 = v["hidden_size"], v["intermediate_size"], v["spatial_merge_size"] ** 2
    p, c = v["patch_size"], v["in_channels"]
    return {
        "attn.qkv.weight": (3 * H, H),
        "attn.qkv.bias": (3 * H,),
        "attn.proj.weight": (H, H),
        "attn.proj.bias": (H,),
        "mlp.linear_fc1.weight": (I, H),
        "mlp.linear_fc1.bias": (I,),
        "mlp.linear_fc2.weight": (H, I),
        "mlp.linear_fc2.bias": (H,),
        "norm1.weight": (H,),
        "norm1.bias": (H,),
        "norm2.weight": (H,),
        "norm2.bias": (H,),
        "merger.linear_fc1.weight": (H * m2, H * m2),
        "merger.linear_fc1.bias": (H * m2,),
        "merger.linear_fc2.weight": (v["out_hidden_size"], H * m2),
        "merger.linear_fc2.bias": (v["out_hidden_size"],),
        "merger.norm.weight": (H,),
        "merger.norm.bias": (H,),
        "patch_embed.proj.weight": (H, c, 2, p, p),
        "patch_embed.proj.bias": (H,),
        "pos_embed.weight": (v["num_position_embeddings"], H),
    }[rest]


def plan_projector(ckpt: Checkpoint) -> tuple[list[OutTensor], dict]:
    """Every tensor of the projector GGUF, in upstream's order, and the checked vision config."""
    v = vision_config(ckpt)
    tensors = vision_tensors(ckpt)
    if not tensors:
        raise CheckpointError(
            f"{ckpt.path} has a vision_config but no model.visual.* tensors; download the whole "
            "checkpoint, or pass --no-mmproj for the text model alone"
        )
    position = {hf: i for i, hf in enumerate(ckpt.tensors)}
    rows = {r[0]: r for r in BLOCK_TABLE}
    out: list[OutTensor] = []
    seen: set[str] = set()
    for rest, hf in tensors.items():
        ref = ckpt.tensors[hf]
        m = _BLOCK.match(rest)
        if m:
            bid, inner = int(m.group(1)), m.group(2)
            if bid >= v["depth"]:
                raise CheckpointError(f"tensor {hf} is in vision block {bid}, but vision_config.depth is {v['depth']}")
            row = rows.get(inner)
            if row is None:
                raise CheckpointError(f"unknown tensor {hf} {list(ref.shape)}: not part of the Qwen3.5 vision tower")
            matches = [(row[0], row[1], bid, row[2], row[3], row[4])]
        else:
            matches = [r for r in GLOBAL_TABLE if r[0] == rest]
            if not matches:
                raise CheckpointError(f"unknown tensor {hf} {list(ref.shape)}: not part of the Qwen3.5 vision tower")
        want = _expected(matches[0][0], v)
        if tuple(ref.shape) != want:
            raise CheckpointError(
                f"tensor {hf} has shape {list(ref.shape)}, the vision config says {list(want)}; "
                "the checkpoint and its config.json do not match"
            )
        seen.add(rest)
        for sub, (_, kind, bid, suffix, fn, keep) in enumerate(matches):
            name = TENSOR_NAMES[kind].format(bid=bid) + suffix
            shape = tuple(ref.shape) if fn not in (tf.frame_0, tf.frame_1) else (want[0], want[1], want[3], want[4])
            out.append(OutTensor(name, kind, bid, [hf], fn, keep, shape, (position[hf], sub)))
    need = [f"blocks.{b}.{r[0]}" for b in range(v["depth"]) for r in BLOCK_TABLE] + [r[0] for r in GLOBAL_TABLE]
    missing = [n for n in dict.fromkeys(need) if n not in seen]
    if missing:
        raise CheckpointError(
            f"the vision tower is incomplete: no model.visual.{missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; download the whole checkpoint, or pass --no-mmproj for the text model alone"
        )
    out.sort(key=lambda o: o.order)
    return out, v


def choose_type(o: OutTensor, file_type: str) -> Q:
    """Upstream's MmprojModel choices: the patch embedding in F16 for F16 files, else F32; 1-D
    tensors, biases and the position embedding F32; the rest the file type's base type (Q8_0
    falls back to F16 when a row does not fill whole blocks)."""
    if o.kind == T.V_ENC_EMBD_PATCH and o.name.endswith((".weight", ".weight.1")):
        return Q.F16 if file_type == "F16" else Q.F32
    if o.keep_f32 or len(o.shape) <= 1 or not o.name.endswith(".weight"):
        return Q.F32
    base = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0}[file_type]
    if o.shape[-1] % gguf.GGML_QUANT_SIZES[base][0]:
        return Q.F16
    return base


def add_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, v: dict, file_type: str, general) -> None:
    """The keys, types and order of upstream's Qwen3VLVisionModel (clip, qwen3vl_merger)."""
    pre = preprocessor(ckpt)
    w.add_type(gguf.GGUFType.MMPROJ)
    general(w, ckpt.path).set_gguf_meta_model(w)
    w.add_file_type(FILE_TYPES[file_type])
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(ckpt.config["hidden_size"])
    # image_size: the learned position grid's side in pixels, unless the config names one
    side = int(v["num_position_embeddings"] ** 0.5 * v["patch_size"])
    w.add_vision_image_size(v.get("image_size", side))
    w.add_vision_patch_size(v["patch_size"])
    w.add_vision_embedding_length(v["hidden_size"])
    w.add_vision_feed_forward_length(v["intermediate_size"])
    w.add_vision_block_count(v["depth"])
    w.add_vision_head_count(v["num_heads"])
    w.add_vision_image_mean(pre["image_mean"])
    w.add_vision_image_std(pre["image_std"])
    w.add_clip_projector_type(gguf.VisionProjectorType.QWEN3VL)
    w.add_vision_use_gelu(True)
    if "spatial_merge_size" in ckpt.raw_config["vision_config"]:  # as upstream: only when the config has it
        w.add_vision_spatial_merge_size(v["spatial_merge_size"])
    # upstream takes text_config's rms_norm_eps (1e-6 when absent) for the vision layer norms
    text = ckpt.raw_config.get("text_config")
    w.add_vision_attention_layernorm_eps((text if isinstance(text, dict) else {}).get("rms_norm_eps", 1e-6))
    w.add_vision_is_deepstack_layers([False] * v["depth"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def default_name(ckpt: Checkpoint, file_type: str) -> str:
    """Upstream's default projector file name: mmproj-{Name}-{Type}.gguf."""
    meta = gguf.Metadata.load(None, ckpt.path, None, 0)
    if meta.name is None:
        meta.name = ckpt.path.resolve().name
    stem = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, None, file_type, None)
    return f"mmproj-{stem}.gguf"
