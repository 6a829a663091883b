"""Fuzz targets: every parser that takes outside bytes, fed mutated copies of valid inputs.

A target holds seeds (valid inputs made here: a micro checkpoint and its GGUF, imatrix files,
a saved chat, tool-call replies, request bodies) and a ``run`` that hands one input to the code
under test the way users' files and requests reach it. An input may be refused only with the
target's known error (the one-line kind the commands print); anything else is a finding, and a
crash of the process (a native abort) is one too. ``Target.check(seed)`` derives the input from
an integer, so any finding replays from its number: ``bench/fuzz.py --target T --seed N``.

Mutations are byte-level (bit flips, interesting integers at random offsets, cut, duplicated and
inserted ranges, JSON punctuation; most of them in the first 4 KiB, where headers are) and, for
JSON seeds, structural (any node replaced by a value of another type, removed, or added).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- mutation

_INTS = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]
_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"\x00", b"-1", b"1e999", b"NaN", b"null", b"\\u0000", b"\xff\xfe"]
_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, 1e308, -1e308, 0.5, math.nan, math.inf, "", "a"]
_VALUES += [[], {}, [None], {"": None}, "\u0000", "x" * 5000, [1, 2, 3], {"type": "object"}, -(2**63)]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
        head = min(len(b), 4096)
        pos = rng.randrange(head) if head and rng.random() < 0.7 else rng.randrange(len(b) + 1)
        op = rng.randrange(8)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, 0x22))
        elif op == 2:
            size = rng.choice((1, 2, 4, 8))
            v = rng.choice(_INTS + [len(b), rng.getrandbits(64)]) % (1 << (8 * size))
            b[pos : pos + size] = v.to_bytes(size, "little")
        elif op == 3:
            del b[pos : pos + rng.choice((1, 4, 16, 256, 1 << 20))]
        elif op == 4 and b:
            a = rng.randrange(len(b))
            b[pos:pos] = b[a : a + rng.choice((1, 8, 64, 1024))]
        elif op == 5:
            b[pos:pos] = rng.randbytes(rng.choice((1, 4, 32)))
        elif op == 6:
            del b[pos:]
        else:
            b[pos:pos] = rng.choice(_TOKENS)
    return bytes(b)


def _random_value(rng: random.Random, depth: int = 0):
    if depth < 2 and rng.random() < 0.2:
        if rng.random() < 0.5:
            return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(("a", "type", "", "name")): _random_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    v = rng.choice(_VALUES)
    return json.loads(json.dumps(v)) if isinstance(v, (list, dict)) else v  # never a shared object


def mutate_json(obj, rng: random.Random):
    """A copy of obj with 1-3 nodes replaced, removed or added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(rng.choice((1, 1, 2, 3))):
        nodes = []

        def walk(x, parent, key, nodes=nodes):
            nodes.append((parent, key))
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(v, x, k, nodes)
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    walk(v, x, i, nodes)

        walk(obj, None, None)
        parent, key = rng.choice(nodes)
        op = rng.randrange(3)
        if parent is None:
            obj = _random_value(rng) if op == 0 else obj
            continue
        if op == 0:
            parent[key] = _random_value(rng)
        elif op == 1:
            del parent[key]
        elif isinstance(parent, dict):
            parent[rng.choice(("extra", "type", "name", "dtype", "shape"))] = _random_value(rng)
        else:
            parent.insert(key, _random_value(rng))
    return obj


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


# ---------------------------------------------------------------- targets


class Finding(AssertionError):
    """An input the code under test did not refuse cleanly."""


class Refused(Exception):
    """A request the server answered with a 4xx and an OpenAI error object."""


@dataclass
class Target:
    name: str
    seeds: list[bytes]
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    json_seeds: list | None = None  # parsed seeds: structural mutations too
    native: bool = False  # reaches llama.cpp (bench/fuzz.py records the input before running it)
    stats: dict = field(default_factory=lambda: {"inputs": 0, "accepted": 0, "refused": 0})

    def generate(self, seed: int) -> bytes:
        rng = random.Random(seed)
        i = rng.randrange(len(self.seeds))
        if self.json_seeds is not None and rng.random() < 0.5:
            return dumps(mutate_json(self.json_seeds[i], rng))
        return mutate_bytes(self.seeds[i], rng)

    def check(self, seed: int) -> None:
        """Run the input numbered seed; raise Finding unless it is taken or refused cleanly."""
        data = self.generate(seed)
        self.stats["inputs"] += 1
        try:
            self.run(data)
        except self.allowed as e:
            msg = str(e)
            if "\n" in msg.strip() or not msg:
                raise Finding(f"{self.name} seed {seed}: a refusal that is not one line: {msg!r:.300}") from e
            self.stats["refused"] += 1
            return
        except Exception as e:
            raise Finding(f"{self.name} seed {seed}: {type(e).__name__}: {e!s:.300}") from e
        self.stats["accepted"] += 1


# ---------------------------------------------------------------- seeds: a micro checkpoint

MICRO = {
    "architectures": ["Qwen3_5ForCausalLM"],
    "model_type": "qwen3_5_text",
    "hidden_size": 16,
    "num_hidden_layers": 4,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "linear_num_key_heads": 1,
    "linear_num_value_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_conv_kernel_dim": 4,
    "vocab_size": 272,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "full_attention_interval": 4,
    "mtp_num_hidden_layers": 1,
    "rope_parameters": {
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "rope_type": "default",
        "mrope_section": [1, 1, 0],
        "mrope_interleaved": True,
    },
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"]


def micro_checkpoint(out: Path) -> Path:
    """A valid two-shard Qwen3.5 checkpoint of a few KB (hidden 16, 4 layers, MTP, a 272-token
    byte-level vocabulary), written with numpy from the converter's own shape table."""
    from safetensors.numpy import save_file

    from qwen35.converter.checkpoint import text_config
    from qwen35.converter.qwen35 import _expected_shape, heads
    from qwen35.converter.vocab import QWEN35_PRETOKENIZER
    from support.tiny import _bytes_to_unicode

    cfg = text_config(MICRO)
    h = heads(cfg)
    rng = np.random.default_rng(0)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i, t in enumerate(cfg["layer_types"]):
        kind = "linear_attn." if t == "linear_attention" else "self_attn."
        layer = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ]
        layer += [
            r
            for r in (
                "linear_attn.in_proj_qkv.weight",
                "linear_attn.in_proj_z.weight",
                "linear_attn.in_proj_a.weight",
                "linear_attn.in_proj_b.weight",
                "linear_attn.A_log",
                "linear_attn.dt_bias",
                "linear_attn.conv1d.weight",
                "linear_attn.norm.weight",
                "linear_attn.out_proj.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "self_attn.q_norm.weight",
                "self_attn.k_norm.weight",
            )
            if r.startswith(kind)
        ]
        names += [f"model.layers.{i}.{r}" for r in layer]
    mtp_block = [r for r in names if r.startswith("model.layers.3.")]
    names += [r.replace("model.layers.3.", "mtp.layers.0.") for r in mtp_block]
    names += ["mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"]
    tensors = {}
    for n in names:
        rest = n.split(".", 3)[-1] if n.startswith(("model.layers.", "mtp.layers.")) else n.removeprefix("model.")
        shape = _expected_shape(rest, cfg, h)
        dtype = np.float16 if "norm" in n else np.float32  # both stored widths
        tensors[n] = (rng.standard_normal(shape) * 0.1).astype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    split = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:split], "model-00002-of-00002.safetensors": names[split:]}
    for fname, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, members in shards.items() for n in members}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(MICRO))
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = ["Ġ t", "h e", "Ġt he"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    added = [{"id": 262 + i, "content": s, "special": True} for i, s in enumerate(SPECIALS)]
    tok = {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN35_PRETOKENIZER}}],
        },
        "added_tokens": added,
    }
    (out / "tokenizer.json").write_text(json.dumps(tok))
    from support.tiny import TEMPLATE

    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE.read_text()}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def micro_gguf(ckpt: Path, out: Path) -> Path:
    from qwen35.converter.convert import convert

    convert(ckpt, out, file_type="F32", force=True)
    return out


# ---------------------------------------------------------------- the targets


def checkpoint_targets(work: Path) -> list[Target]:
    """config.json, the shard index and a safetensors shard of a checkpoint being opened and planned."""
    from qwen35.converter.checkpoint import CheckpointError, open_checkpoint
    from qwen35.converter.qwen35 import plan_tensors

    base = micro_checkpoint(work / "micro-hf")
    out = []
    for name, fname in (
        ("checkpoint-config", "config.json"),
        ("checkpoint-index", "model.safetensors.index.json"),
        ("checkpoint-safetensors", "model-00001-of-00002.safetensors"),
    ):
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        seed = (d / fname).read_bytes()

        def run(data: bytes, d=d, fname=fname) -> None:
            (d / fname).write_bytes(data)
            ckpt = open_checkpoint(d)
            try:
                for t in plan_tensors(ckpt):
                    for src in t.sources:
                        ckpt.read(src)
            finally:
                ckpt.close()

        js = [json.loads(seed)] if fname.endswith(".json") else None
        out.append(Target(name, [seed], run, (CheckpointError,), json_seeds=js))

    d = work / "checkpoint-tokenizer"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(base, d)
    seed = (d / "tokenizer.json").read_bytes()

    def vocab(data: bytes) -> None:
        import gguf

        from qwen35.converter.vocab import add_vocab

        (d / "tokenizer.json").write_bytes(data)
        add_vocab(gguf.GGUFWriter(None, "qwen35"), d, MICRO["vocab_size"])

    out.append(Target("checkpoint-tokenizer", [seed], vocab, (CheckpointError,), json_seeds=[json.loads(seed)]))
    return out


def gguf_target(work: Path, gguf: Path) -> Target:
    """The header scan as inspect, verify, chat and Model.load use it, with the hyper-parameter check."""
    from qwen35.converter.inspect import inspect
    from qwen35.gguf_scan import GGUFScanError

    path = work / "fuzz.gguf"

    def run(data: bytes) -> None:
        path.write_bytes(data)
        inspect(path)

    return Target("gguf", [gguf.read_bytes()], run, (GGUFScanError,))


def gguf_load_target(work: Path, gguf: Path) -> Target:
    """Model.load on the result, and a decode: what passes the checks reaches llama.cpp's loader."""
    from qwen35.bindings.model import Model, ModelError

    path = work / "fuzz-load.gguf"

    def run(data: bytes) -> None:
        path.write_bytes(data)
        with Model.load(path, n_ctx=64, n_threads=1, check_fit=False) as m:
            m.logits([1, 2, 3])

    return Target("gguf-load", [gguf.read_bytes()], run, (ModelError,), native=True)


def imatrix_targets(work: Path, gguf_names: list[tuple[str, int]]) -> list[Target]:
    """GGUF and legacy .dat importance matrices. gguf_names: (tensor, n_per_row) to weight."""
    import gguf as gg

    from qwen35.converter import imatrix

    rng = np.random.default_rng(1)
    w = gg.GGUFWriter(str(work / "seed.imatrix.gguf"), arch="", endianess=gg.GGUFEndian.LITTLE)
    w.add_type("imatrix")
    w.add_array(gg.Keys.IMatrix.DATASETS, ["calibration.txt"])
    w.add_uint32(gg.Keys.IMatrix.CHUNK_COUNT, 10)
    w.add_uint32(gg.Keys.IMatrix.CHUNK_SIZE, 512)
    legacy = [struct.pack("<i", len(gguf_names))]
    for name, n in gguf_names:
        sums = rng.random(n, dtype=np.float32) * 50
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", np.array([10.0], np.float32))
        legacy += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", 10, n), sums.tobytes()]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    legacy += [struct.pack("<i", 10), struct.pack("<i", 15), b"calibration.txt"]
    seeds = {"imatrix-gguf": (work / "seed.imatrix.gguf").read_bytes(), "imatrix-dat": b"".join(legacy)}
    out = []
    for name, seed in seeds.items():
        path = work / f"fuzz.{name}"

        def run(data: bytes, path=path) -> None:
            path.write_bytes(data)
            im = imatrix.load(path)
            for tname, n in gguf_names:
                im.for_tensor(tname, n, 1)

        out.append(Target(name, [seed], run, (imatrix.ImatrixError,)))
    return out


def saved_chat_targets(work: Path, model) -> list[Target]:
    """A saved chat as it is on disk (the checksum refuses damage), and one edited with a checksum
    made to match, whose fields then reach the checks behind it and llama.cpp's state reader."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from qwen35.bindings import statefile
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import ModelError
    from qwen35.bindings.sampling import SamplingParams

    chat = Chat(model)
    chat.send("Hello there", SamplingParams(temperature=0, max_tokens=4))
    good = work / "seed.chat"
    chat.save(good)
    with safe_open(str(good), "numpy") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(good))
    path = work / "fuzz.chat"

    def load(data: bytes) -> None:
        path.write_bytes(data)
        c = Chat(model)
        c.load(path)
        c.send("and?", SamplingParams(temperature=0, max_tokens=1))

    def sealed(data: bytes) -> None:
        rng = random.Random(data)
        t = dict(tensors)
        m = dict(meta)
        names = sorted(t)
        for _ in range(rng.choice((1, 2))):
            if rng.random() < 0.3:
                key = rng.choice(["messages", "tools", "enable_thinking", "format"])
                m[key] = dumps(mutate_json(json.loads(m[key]) if key != "format" else m[key], rng)).decode(
                    "utf-8", "replace"
                )
            else:
                n = rng.choice(names)
                raw = mutate_bytes(t[n].tobytes(), rng)
                dt = rng.choice([t[n].dtype, np.uint8, np.int32, np.float32])
                raw = raw[: len(raw) // np.dtype(dt).itemsize * np.dtype(dt).itemsize]
                t[n] = np.frombuffer(raw, dtype=dt).copy()
        m["sha256"] = statefile.checksum(t, m)
        save_file(t, str(path), metadata=m)
        c = Chat(model)
        c.load(path)
        c.send("and?", SamplingParams(temperature=0, max_tokens=1))

    return [
        Target("saved-chat", [good.read_bytes()], load, (ModelError,), native=True),
        Target("saved-chat-sealed", [b"seed"], sealed, (ModelError,), native=True),
    ]


REPLY_PIECES = [
    "<think>",
    "</think>",
    "\n",
    "<tool_call>",
    "</tool_call>",
    "<function=get_weather>",
    "<function=",
    "</function>",
    "<parameter=city>",
    "<parameter=days>",
    "<parameter=",
    "</parameter>",
    ">",
    "Paris",
    "3",
    '{"a": [1, 2]}',
    "[1, 2",
    "true",
    "STOP",
    "é",
    "\ufffd",
    " ",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "opts": {"type": "object"}},
            },
        },
    }
]


def image_target() -> Target:
    """Image bytes as users send them (PNG, JPEG, GIF, WebP, a data URL in a content part)
    through load_image: an Image, or ImageError in one line."""
    import base64
    import io

    import numpy as np
    from PIL import Image as PILImage

    from qwen35.bindings.vision import ImageError, load_image

    px = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    seeds = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "RGB"), ("GIF", "P"), ("WEBP", "RGB")):
        buf = io.BytesIO()
        PILImage.fromarray(px).convert(mode).save(buf, format=fmt)
        seeds.append(buf.getvalue())
    url = "data:image/png;base64," + base64.b64encode(seeds[0]).decode()
    part = {"type": "image_url", "image_url": {"url": url}}

    def run(data: bytes) -> None:
        if data.startswith(b"{"):
            try:
                src = json.loads(data)
            except ValueError as e:
                raise Refused("not JSON") from e
        else:
            src = data
        im = load_image(src)
        if len(im.rgb) != im.width * im.height * 3:
            raise Finding(f"an image of {im.width}x{im.height} with {len(im.rgb)} bytes")

    return Target("image", [*seeds, dumps(part)], run, (ImageError, Refused), json_seeds=None, native=True)


def reply_target() -> Target:
    """The reply path's text side: UTF-8 across token boundaries, stop strings, </think>, and the
    tool-call parser with schema conversion, fed the reply in arbitrary pieces."""
    from qwen35.bindings.chat import _ReplyText
    from qwen35.bindings.toolcalls import MalformedToolCall, Text, ToolCall, ToolCallParser

    seeds = [
        b"<think>\nLet me see.\n</think>\n\nIt is sunny.",
        (
            b"<think>\nweather\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            b"</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
        ),
        "Answer: é and done STOP more".encode(),
    ]

    def run(data: bytes) -> None:
        rng = random.Random(data)
        for thinking in (True, False):
            parser = ToolCallParser(TOOLS) if rng.random() < 0.8 else None
            r = _ReplyText(None, parser, thinking, ("STOP",) if rng.random() < 0.5 else ())
            events = []
            i = 0
            while i < len(data):
                n = rng.choice((1, 2, 3, 7, 64))
                events += r.feed_bytes(data[i : i + n])
                i += n
                if r.stopped:
                    break
            tail, message = r.finish()
            events += tail
            assert all(isinstance(e, (Text, ToolCall, MalformedToolCall)) or hasattr(e, "text") for e in events)
            assert isinstance(message, dict) and isinstance(message.get("content", ""), str)

    def generate_extra(seed_rng: random.Random) -> bytes:
        return "".join(seed_rng.choice(REPLY_PIECES) for _ in range(seed_rng.randrange(1, 40))).encode()

    t = Target("reply", seeds, run, ())
    base = t.generate

    def generate(seed: int) -> bytes:
        rng = random.Random(seed)
        return generate_extra(rng) if rng.random() < 0.5 else base(seed)

    t.generate = generate  # type: ignore[method-assign]
    return t


CHAT_BODY = {
    "model": "fuzz",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ],
    "tools": TOOLS,
    "tool_choice": "auto",
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.1,
    "repetition_penalty": 1.1,
    "seed": 3,
    "stop": ["\n\n"],
    "max_tokens": 2,
    "logprobs": True,
    "top_logprobs": 2,
    "logit_bias": {"15": -5},
    "chat_template_kwargs": {"enable_thinking": False},
    "stream": False,
}
SCHEMA_BODY = {
    "model": "fuzz",
    "messages": [{"role": "user", "content": "Give a city."}],
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "c", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    },
    "max_completion_tokens": 2,
    "stream": True,
    "stream_options": {"include_usage": True},
}
COMPLETION_BODY = {"model": "fuzz", "prompt": "Once upon", "max_tokens": 2, "temperature": 0, "stream": False}
RESPONSES_BODY = {
    "model": "fuzz",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ],
    "tools": [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}],
    "max_output_tokens": 2,
    "reasoning": {"effort": "low"},
}
BODIES = [
    ("/v1/chat/completions", CHAT_BODY),
    ("/v1/chat/completions", SCHEMA_BODY),
    ("/v1/completions", COMPLETION_BODY),
    ("/v1/responses", RESPONSES_BODY),
]
MAX_FUZZ_TOKENS = 4  # a fuzzed request may generate at most this many (each run stays short)


def _bounded(body):
    """body with every token limit it names at most MAX_FUZZ_TOKENS (an absent one set to it)."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_FUZZ_TOKENS:
            body[key] = MAX_FUZZ_TOKENS
    if not any(k in body for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")):
        body["max_tokens"] = MAX_FUZZ_TOKENS
    return body


def server_target(client) -> Target:
    """Request bodies through the whole app (client: a TestClient of create_app over a real model
    and engine): any status but a 5xx, a JSON error body for every 4xx, and the server still
    answering."""

    def run(data: bytes) -> None:
        route_i, raw = data[0] % len(BODIES), data[1:]
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if body is not None:
            raw = dumps(_bounded(body))
        r = client.post(BODIES[route_i][0], content=raw, headers={"content-type": "application/json"})
        if r.status_code >= 500:
            raise Finding(f"HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code >= 400:
            err = r.json().get("error")
            if not isinstance(err, dict) or not isinstance(err.get("message"), str):
                raise Finding(f"HTTP {r.status_code} without an OpenAI error object: {r.text[:300]}")
            raise Refused(f"HTTP {r.status_code}: {err['message']!r:.200}")

    seeds = [bytes([i]) + dumps(b) for i, (_, b) in enumerate(BODIES)]
    t = Target("server-body", seeds, run, (Refused,), native=True)

    def generate(seed: int) -> bytes:
        rng = random.Random(seed)
        i = rng.randrange(len(BODIES))
        if rng.random() < 0.7:
            return bytes([i]) + dumps(mutate_json(BODIES[i][1], rng))
        return bytes([i]) + mutate_bytes(seeds[i][1:], rng)

    t.generate = generate  # type: ignore[method-assign]
    return t


def server_client(gguf: Path, cache_ram: int = 1 << 30):
    """A TestClient of the real app on gguf (2 slots of 1024 tokens, cache_ram bytes for saved
    conversation states), with its engine running; close() stops both."""
    from fastapi.testclient import TestClient

    from qwen35.bindings.engine import Engine
    from qwen35.bindings.model import Model
    from qwen35.bindings.server import ServerConfig, create_app

    m = Model.load(gguf, n_ctx=2048, n_seq_max=2, n_threads=1)
    engine = Engine(m, max_queue=8, cache_ram=cache_ram)
    app = create_app(m, engine, ServerConfig(model_name="fuzz", reasoning=False))
    engine.start()
    client = TestClient(app)
    client.__enter__()  # one event loop for every request, as under uvicorn

    def close() -> None:
        client.__exit__(None, None, None)
        engine.stop()
        m.close()

    client.shutdown = close  # type: ignore[attr-defined]
    client.engine = engine  # type: ignore[attr-defined]
    return client
