"""Run the same tokens through a GGUF (patched llama.cpp) and through transformers; compare logits.

Meant for small checkpoints: transformers holds the whole model in float32 RAM.

>>> import numpy as np
>>> m = logit_metrics(np.zeros((2, 4)), np.zeros((2, 4)))
>>> (m["max_abs"], m["top1_agreement"], m["kld_mean"])
(0.0, 1.0, 0.0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_TEXT = (
    "The Gated DeltaNet layers of Qwen3.5 keep a fixed-size state, while every fourth layer "
    "attends over the whole context. 1, 2, 3, 5, 8, 13 — what comes next?"
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def logit_metrics(ref: np.ndarray, ours: np.ndarray) -> dict:
    """ref, ours: [n_tokens, n_vocab]. KLD is KL(ref || ours) per position, in nats."""
    if ref.shape != ours.shape:
        raise ValueError(f"logit shapes differ: {ref.shape} vs {ours.shape}")
    d = np.abs(ref.astype(np.float64) - ours)
    lp, lq = _log_softmax(ref), _log_softmax(ours)
    kld = (np.exp(lp) * (lp - lq)).sum(-1)
    return {
        "n_tokens": int(ref.shape[0]),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "logit_std": float(ref.std()),
        "top1_agreement": float((ref.argmax(-1) == ours.argmax(-1)).mean()),
        "kld_mean": float(kld.mean()),
        "kld_max": float(kld.max()),
    }


MAX_KLD = 0.1  # nats, mean over positions: the verdict's bound (a sane conversion of the same model)


def check_same_model(ckpt, gguf: str | Path) -> None:
    """ValueError naming the first difference when the GGUF was not made from this checkpoint's
    architecture: model family, expert count, layer count, width, heads, vocabulary size."""
    from qwen35.gguf_scan import scan_model

    head = scan_model(Path(gguf))
    arch = head.get("general.architecture")
    c = ckpt.config

    def g(key):
        return head.get(f"{arch}.{key}")

    nextn = g("nextn_predict_layers") or 0
    emb = next((t for t in head.tensors if t.name == "token_embd.weight"), None)
    pairs = [
        ("architecture", ckpt.arch, arch),
        ("experts", c.get("num_experts", 0) if ckpt.arch == "qwen35moe" else 0, g("expert_count") or 0),
        ("layers", c["num_hidden_layers"], (g("block_count") or 0) - nextn),
        ("hidden size", c["hidden_size"], g("embedding_length")),
        ("attention heads", c["num_attention_heads"], g("attention.head_count")),
        ("vocabulary", c["vocab_size"], emb.ne[1] if emb is not None else None),
    ]
    for what, want, got in pairs:
        if want != got:
            raise ValueError(
                f"{Path(gguf).name} is not a conversion of {ckpt.path.name}: {what} {got} in the GGUF, "
                f"{want} in the checkpoint; verify a GGUF against the checkpoint it was made from"
            )


def verify(
    hf_dir: str | Path, gguf: str | Path, *, text: str = DEFAULT_TEXT, max_tokens: int = 256, max_kld: float = MAX_KLD
) -> dict:
    """Metrics for the GGUF against transformers on the tokens of text (llama.cpp's tokenizer), and
    the verdict: ``passed`` when the mean KLD is at most max_kld nats."""
    from qwen35.bindings.model import Model
    from qwen35.converter.checkpoint import open_checkpoint

    ckpt = open_checkpoint(hf_dir)  # a local Qwen3.5 safetensors checkpoint, or a one-line error naming the fix
    try:
        check_same_model(ckpt, gguf)
    finally:
        ckpt.close()
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise RuntimeError("qwen35 verify needs torch and transformers: pip install 'qwen35-toolkit[demo]'") from e
    # the reference path: F32 KV, no flash attention (its CPU kernel rounds through F16), no repack
    with Model.load(gguf, n_ctx=max(64, max_tokens), kv_type="f32", flash_attn=False, repack=False) as m:
        tokens = m.tokenize(text, special=False)[:max_tokens]
        if not tokens:
            raise ValueError("the text tokenizes to nothing; pass a longer --text")
        ours = m.logits(tokens)
    # local files only (never a download), safetensors only (never pickle)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    n = min(ref.shape[1], ours.shape[1])  # GGUF vocab may be padded differently from lm_head
    m = logit_metrics(ref[:, :n], ours[:, :n])
    return {**m, "max_kld": max_kld, "passed": m["kld_mean"] <= max_kld}
