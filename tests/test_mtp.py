"""MTP speculative decoding on the trained demo checkpoints (their MTP heads are trained, so drafts
are accepted at a real rate): llama.cpp's MTP graph fed by the bindings equals the checkpoint's MTP
block in PyTorch; speculative output is the plain output token for token (greedy and seeded); the
prompt cache stays exact through rejected drafts; saved chats resume with their draft state."""

from pathlib import Path

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
NAMES = ["qwen35-dense-tiny", "qwen35-moe-tiny"]
TOL_LOGITS_REL_STD = 2e-3  # f32 weights, F32 KV cache, no flash attention (as the converter tests)
QUESTIONS = ["What does json.dumps do?", "How do I read a file line by line?", "What is a generator?"]


@pytest.fixture(scope="module")
def f32(tmp_path_factory, lib_dir):
    from qwen35.converter.convert import convert

    d = tmp_path_factory.mktemp("mtp")
    return {n: convert(MODELS / n, d / f"{n}-F32.gguf", file_type="F32").path for n in NAMES}


def _load(path, **kw):
    from qwen35.bindings.model import Model

    return Model.load(path, n_ctx=1024, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, **kw)


def _torch_mtp(name: str, config):
    """The checkpoint's mtp.* block as Qwen3.5 defines it, from transformers' own layer classes."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    if "moe" in name:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer as Layer
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm as Norm
    else:
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer as Layer
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm as Norm

    H, eps = config.hidden_size, config.rms_norm_eps
    mtp = nn.Module()
    mtp.fc = nn.Linear(2 * H, H, bias=False)
    mtp.pre_fc_norm_embedding, mtp.pre_fc_norm_hidden, mtp.norm = Norm(H, eps=eps), Norm(H, eps=eps), Norm(H, eps=eps)
    assert config.layer_types[-1] == "full_attention"
    mtp.layers = nn.ModuleList([Layer(config, layer_idx=config.num_hidden_layers - 1)])
    state = {}
    for shard in sorted((MODELS / name).glob("*.safetensors")):
        state.update({k[4:]: v.float() for k, v in load_file(shard).items() if k.startswith("mtp.")})
    mtp.load_state_dict(state, strict=True)
    return mtp.eval().to(torch.float32)


@pytest.mark.parametrize("name", NAMES)
def test_mtp_head_logits_match_pytorch(name, f32):
    """Target prefill, then the head's guess for the token after next: llama.cpp's MTP graph over
    the pairs the bindings queue (x_p, h_{p-1}) equals the mtp.* block run in PyTorch on
    transformers' hidden states."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from qwen35.bindings.session import PromptCache

    text = (MODELS / "text" / "heldout.txt").read_text(encoding="utf-8")[:3000]
    tokens = Tokenizer.from_file(str(MODELS / name / "tokenizer.json")).encode(text).ids[:120]
    prompt, nxt = tokens[:-1], tokens[-1]
    ref = AutoModelForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).eval()
    mtp = _torch_mtp(name, ref.config)
    with torch.no_grad():
        ids = torch.tensor([tokens])
        h = ref.model(ids[:, :-1]).last_hidden_state  # final-normed, as llama.cpp's h_nextn
        emb = ref.model.embed_tokens(ids[:, 1:])
        pos = torch.arange(len(prompt)).view(1, 1, -1).expand(3, 1, -1)
        x = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(emb), mtp.pre_fc_norm_hidden(h)], -1))
        x = mtp.layers[0](x, position_embeddings=ref.model.rotary_emb(x, pos), attention_mask=None)
        want = ref.lm_head(mtp.norm(x))[0].numpy()
    with _load(f32[name], load_mtp=True) as m:
        cache = PromptCache(m, checkpoint_every=0)
        cache.eval(prompt)
        got, _ = m.mtp.predict(cache.seq_id, nxt, len(prompt))
    err = np.abs(got - want[-1]).max()
    assert err <= TOL_LOGITS_REL_STD * want[-1].std(), (err, want[-1].std())
    assert got.argmax() == want[-1].argmax()


def _replies(path, *, speculative, sampling, thinking=True, **kw):
    from qwen35.bindings.chat import Chat

    with _load(path, load_mtp=speculative is not None) as m:
        c = Chat(m, enable_thinking=thinking, speculative=speculative, **kw)
        return [c.send(q, sampling) for q in QUESTIONS]


@pytest.mark.parametrize("name", NAMES)
def test_speculative_greedy_output_is_the_plain_greedy_output(name, f32):
    from qwen35.bindings.model import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=80)
    plain = _replies(f32[name], speculative=None, sampling=sp)
    spec = _replies(f32[name], speculative="mtp", sampling=sp)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert [r.finish_reason for r in spec] == [r.finish_reason for r in plain]
    assert all(r.speculation is None for r in plain)
    drafted = sum(r.speculation.drafted for r in spec)
    accepted = sum(r.speculation.accepted for r in spec)
    # trained heads agree with their model often; a head fed the wrong hidden rows would not
    assert drafted > 50 and accepted / drafted > 0.25, (accepted, drafted)


def test_speculative_sampling_draws_the_same_tokens(f32):
    """The sampler walks the target's logits and consumes one draw per token either way."""
    from qwen35.bindings.model import SamplingParams

    sp = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=60)
    path = f32[NAMES[0]]
    plain = _replies(path, speculative=None, sampling=sp)
    spec = _replies(path, speculative="mtp", sampling=sp, draft_max=2)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert sum(r.speculation.accepted for r in spec) > 0


def test_prompt_cache_stays_exact_after_rejected_drafts(f32):
    """After speculative turns (rollbacks of rejected drafts), extending the conversation gives
    the logits of a fresh full prefill of the same tokens."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import SamplingParams

    path = f32[NAMES[0]]
    with _load(path, load_mtp=True) as m:
        c = Chat(m, speculative="mtp")
        for q in QUESTIONS[:2]:
            c.send(q, SamplingParams(temperature=0, max_tokens=48))
        assert c.last.speculation.drafted > c.last.speculation.accepted  # drafts were rejected, rolled back
        c.messages.append({"role": "user", "content": "And in one line?"})
        prompt, marks, _, _ = c._prompt(c.messages, 1)
        logits, usage = c.cache.eval(prompt, marks=marks)
        assert usage.reused_tokens > 0
    with _load(path) as fresh:
        want = fresh.logits(prompt)[-1]
    assert np.abs(logits - want).max() <= 1e-4


def test_saved_chat_resumes_with_its_draft_state(f32, tmp_path):
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=48)
    path = f32[NAMES[0]]
    with _load(path, load_mtp=True) as m:
        a = Chat(m, speculative="mtp")
        a.send(QUESTIONS[0], sp)
        a.save(tmp_path / "chat.safetensors")
        third = a.send(QUESTIONS[1], sp)
    with _load(path, load_mtp=True) as m:
        b = Chat(m, speculative="mtp")
        b.load(tmp_path / "chat.safetensors")
        resumed = b.send(QUESTIONS[1], sp)
    assert resumed.tokens == third.tokens
    assert resumed.usage.reused_tokens == third.usage.reused_tokens
    assert resumed.speculation == third.speculation  # the same drafts: the head's cache came back


def test_misuse_is_refused_with_the_fix(f32, tmp_path):
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import ModelError
    from qwen35.converter.convert import convert

    path = f32[NAMES[0]]
    with _load(path) as m:
        with pytest.raises(ModelError, match="load_mtp=True"):
            Chat(m, speculative="mtp")
        with pytest.raises(ValueError, match="'mtp'"):
            Chat(m, speculative="eagle")
    with _load(path, load_mtp=True, n_rs_seq=2) as m, pytest.raises(ModelError, match="n_rs_seq"):
        Chat(m, speculative="mtp", draft_max=3)
    no_mtp = convert(MODELS / NAMES[0], tmp_path / "no-mtp.gguf", file_type="Q8_0", mtp="drop").path
    with pytest.raises(ModelError, match="--mtp keep"):
        _load(no_mtp, load_mtp=True)


def test_chat_command_speculative_json(f32):
    """`qwen35 chat -p --speculative mtp --json`: the plain reply, with the draft statistics."""
    import json
    import subprocess
    import sys

    qwen35 = str(Path(sys.executable).parent / "qwen35")
    base = [
        qwen35,
        "chat",
        str(f32[NAMES[0]]),
        "-p",
        QUESTIONS[0],
        "-n",
        "40",
        "--seed",
        "7",
        "--json",
        "--threads",
        str(usable_cpus()),
    ]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(
        base + ["--speculative", "mtp", "--draft-max", "2"], capture_output=True, text=True, timeout=300
    )
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    a, b = json.loads(plain.stdout), json.loads(spec.stdout)
    assert (b["content"], b["reasoning"]) == (a["content"], a["reasoning"])
    assert a["speculation"] is None and b["speculation"]["drafted"] > 0
    bad = subprocess.run(base + ["--speculative", "eagle"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--speculative mtp" in bad.stderr
    bad = subprocess.run(
        base + ["--speculative", "mtp", "--draft-max", "0"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--draft-max" in bad.stderr


def test_interleaved_sessions_draft_independently(f32):
    """Two speculative chats on separate sequences of one model, turns interleaved: each equals
    its own plain run (the head's cache is per sequence)."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=40)
    path = f32[NAMES[1]]
    plain = {q: _replies(path, speculative=None, sampling=sp)[i].tokens for i, q in enumerate(QUESTIONS[:2])}
    with _load(path, load_mtp=True, n_seq_max=2) as m:
        a, b = Chat(m, seq_id=0, speculative="mtp"), Chat(m, seq_id=1, speculative="mtp")
        a1 = a.send(QUESTIONS[0], sp)
        b1 = b.send(QUESTIONS[0], sp)
        a2 = a.send(QUESTIONS[1], sp)
    assert a1.tokens == b1.tokens == plain[QUESTIONS[0]]
    assert a2.tokens == plain[QUESTIONS[1]]


def test_speculative_decoding_keeps_constrained_seeded_replies(f32):
    """Drafts are verified by the same sampler, penalties and grammar included: a seeded reply
    constrained to a JSON schema or to a tool call is the same tokens with and without MTP."""
    from qwen35.bindings.chat import Chat
    from qwen35.bindings.model import SamplingParams

    schema = {
        "type": "object",
        "required": ["module", "stdlib"],
        "additionalProperties": False,
        "properties": {"module": {"type": "string", "maxLength": 12}, "stdlib": {"type": "boolean"}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "required": ["module"],
                    "properties": {"module": {"enum": ["json", "os", "re"]}},
                },
            },
        }
    ]
    with _load(f32[NAMES[0]], load_mtp=True) as m:
        for seed in range(3):
            p = SamplingParams(seed=seed, presence_penalty=0.5, max_tokens=48)
            for kw in (dict(response_format=fmt), dict(tool_choice="required")):
                plain = Chat(m, tools=tools, enable_thinking=False).send(QUESTIONS[0], p, **kw)
                spec = Chat(m, tools=tools, enable_thinking=False, speculative="mtp", draft_max=2).send(
                    QUESTIONS[0], p, **kw
                )
                assert spec.tokens == plain.tokens and spec.speculation.drafted > 0, kw
