"""Prompt reuse on hybrid memory: after any reuse, rollback or checkpoint restore, the logits equal
those of a fresh full prefill of the same tokens (F32 KV cache: max |delta| <= 1e-4)."""

import numpy as np
import pytest

from qwen35.cpus import usable_cpus

TOL = 1e-4


@pytest.fixture(scope="module")
def gguf_f32(tiny_f32_gguf):
    return tiny_f32_gguf


def _load(path, **kw):
    from qwen35.bindings.model import Model

    return Model.load(path, n_ctx=256, n_threads=usable_cpus(), kv_type="f32", flash_attn=False, **kw)


@pytest.fixture(scope="module")
def fresh(gguf_f32):
    """The oracle: logits of the last token after a full prefill from an empty context."""
    m = _load(gguf_f32)
    yield lambda tokens: m.logits(tokens)[-1]
    m.close()


def _tokens(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(1000, 200_000, size=n)]


A, B, C = _tokens(1, 40), _tokens(2, 12), _tokens(3, 9)


def _close(a, b):
    assert np.abs(a - b).max() <= TOL, np.abs(a - b).max()


def test_extension_evaluates_only_the_new_tokens(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=0)
        _, u = c.eval(A)
        assert (u.reused_tokens, u.evaluated_tokens) == (0, len(A))
        logits, u = c.eval(A + B)
        assert (u.reused_tokens, u.evaluated_tokens, u.restored_from) == (len(A), len(B), None)
        _close(logits, fresh(A + B))
        logits, u = c.eval(A + B)  # the same prompt again: nothing to evaluate
        assert u.evaluated_tokens == 0
        _close(logits, fresh(A + B))


def test_divergence_restores_the_checkpoint_at_the_turn_start(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=0)
        c.eval(A + B, marks=[len(A)])
        assert list(c.checkpoints) == [len(A)]
        logits, u = c.eval(A + C)  # an earlier answer re-rendered differently
        assert (u.restored_from, u.reused_tokens, u.evaluated_tokens) == (len(A), len(A), len(C))
        _close(logits, fresh(A + C))
        # and back again: A's checkpoint is still there
        logits, u = c.eval(A + B)
        assert (u.restored_from, u.evaluated_tokens) == (len(A), len(B))
        _close(logits, fresh(A + B))


def test_edited_history_restores_the_newest_periodic_checkpoint_before_the_edit(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    x = A + B + C
    edited = list(x)
    edited[45] = 12345
    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=16)
        c.eval(x)
        assert list(c.checkpoints) == [16, 32, 48]
        logits, u = c.eval(edited)
        assert (u.restored_from, u.evaluated_tokens) == (32, len(x) - 32)
        assert list(c.checkpoints) == [16, 32, 48]  # 48 was dropped with the old tokens, then retaken
        _close(logits, fresh(edited))
        # a prompt that is a prefix of what is cached: its last token must be re-evaluated
        logits, u = c.eval(edited[:20])
        assert (u.restored_from, u.evaluated_tokens) == (16, 4)
        _close(logits, fresh(edited[:20]))


def test_short_divergence_uses_llama_cpp_rollback(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32, n_rs_seq=4) as m:
        c = PromptCache(m, checkpoint_every=0)
        c.eval(A + B[:3])
        logits, u = c.eval(A + C)
        assert (u.rolled_back, u.restored_from, u.evaluated_tokens) == (3, None, len(C))
        _close(logits, fresh(A + C))


def test_without_a_checkpoint_it_starts_over_and_is_still_right(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=0)
        c.eval(A + B)
        logits, u = c.eval(C + B)
        assert (u.reused_tokens, u.evaluated_tokens) == (0, len(C + B))
        _close(logits, fresh(C + B))


def test_checkpoints_stay_within_the_budget(gguf_f32):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=8)
        c.eval(A)
        one = len(next(iter(c.checkpoints.values())))
        c = PromptCache(m, checkpoint_every=8, budget_bytes=2 * one)
        c.reset()
        c.eval(A + B)
        assert list(c.checkpoints) == [40, 48] and c.checkpoint_bytes <= 2 * one


def test_llama_cpp_refuses_a_plain_cut_which_is_why_checkpoints_exist(gguf_f32):
    """The DeltaNet state cannot be truncated: removing the tail of the sequence fails (what makes
    llama-cpp-python's Llama re-evaluate whole prompts), while restoring a checkpoint first works."""
    import llama_cpp

    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32) as m:
        c = PromptCache(m, checkpoint_every=0)
        c.eval(A + B, marks=[len(A)])
        mem = llama_cpp.llama_get_memory(m._ctx)
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, len(A), -1)
        assert c._restore(len(A)) and c.tokens == A


def test_sessions_on_separate_sequences_do_not_cross_talk(gguf_f32, fresh):
    from qwen35.bindings.session import PromptCache

    with _load(gguf_f32, n_seq_max=2) as m:
        s0, s1 = PromptCache(m, 0, checkpoint_every=0), PromptCache(m, 1, checkpoint_every=0)
        s0.eval(A, marks=[20])
        s1.eval(C + B, marks=[len(C)])
        logits0, u0 = s0.eval(A + B)
        logits1, u1 = s1.eval(C + A)
        assert u0.reused_tokens == len(A) and (u1.reused_tokens, u1.restored_from) == (len(C), len(C))
        _close(logits0, fresh(A + B))
        _close(logits1, fresh(C + A))
        logits0, u0 = s0.eval(A[:20] + C)  # restore on sequence 0 leaves sequence 1 alone
        assert u0.restored_from == 20
        _close(logits0, fresh(A[:20] + C))
        _close(s1.append(B[0]), fresh(C + A + B[:1]))
