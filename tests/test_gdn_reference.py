"""The numpy reference of GGML_OP_GATED_DELTA_NET: its two forms agree in float64, and they
match the pinned llama.cpp CPU op (the token-sequential kernel every backend mirrors)."""

import logging

import gated_delta_net as ref
import numpy as np
import pytest

log = logging.getLogger(__name__)

# float64 per-token loop vs float64 chunked form: only reassociation differs.
TOL_FORMS_F64 = 1e-12
# ggml's float32 CPU kernel vs the float64 reference on float32 inputs: float32 accumulation
# over up to 1000 tokens of state carry.
TOL_CPU_OP_F32 = 2e-5

GRID = [
    # T, H_k, H_v, B, B_qk, K, g_scale
    (1, 2, 2, 1, 1, 1, 1.0),
    (63, 2, 4, 2, 2, 1, 1.0),
    (64, 1, 4, 1, 1, 4, 1.0),
    (65, 2, 8, 3, 1, 1, 1.0),  # q/k shared by every sequence
    (65, 2, 4, 2, 2, 4, 1.0),
    (1000, 2, 4, 1, 1, 1, 1.0),
    (130, 2, 4, 4, 4, 4, 1e-4),  # g near 0: almost no decay
    (130, 2, 4, 2, 2, 1, 20.0),  # g near -20: state wiped at every token
    (3, 2, 4, 2, 2, 4, 1.0),  # fewer tokens than snapshot slots
]


def _ids(case):
    T, H_k, H_v, B, B_qk, K, g = case
    return f"T{T}-Hk{H_k}-Hv{H_v}-B{B}-Bqk{B_qk}-K{K}-g{g}"


@pytest.mark.quick
@pytest.mark.parametrize("case", GRID, ids=_ids)
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_form_equals_recurrent(case, chunk):
    T, H_k, H_v, B, B_qk, K, g_scale = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = ref.random_inputs(rng, B=B, B_qk=B_qk, T=T, H_k=H_k, H_v=H_v, S=16, g_scale=g_scale, dtype=np.float64)
    o1, s1 = ref.recurrent(*x, K=K)
    o2, s2 = ref.chunked(*x, K=K, chunk=chunk)
    written = min(T, K)
    err_o, err_s = ref.rel_rms(o2, o1), ref.rel_rms(s2[:written], s1[:written])
    log.info("forms %s chunk=%d: out %.2e state %.2e", _ids(case), chunk, err_o, err_s)
    assert err_o <= TOL_FORMS_F64 and err_s <= TOL_FORMS_F64


@pytest.mark.parametrize("case", GRID, ids=_ids)
@pytest.mark.parametrize("S", [16, 64])
def test_reference_matches_pinned_cpu_op(case, S, lib_dir):
    from ggml_cpu_op import GgmlCpu

    T, H_k, H_v, B, B_qk, K, g_scale = case
    rng = np.random.default_rng(hash((case, S)) % 2**32)
    x = ref.random_inputs(rng, B=B, B_qk=B_qk, T=T, H_k=H_k, H_v=H_v, S=S, g_scale=g_scale)
    got = GgmlCpu(lib_dir).gated_delta_net(*x, K=K)
    out, snaps = ref.recurrent(*x, K=K)
    n_out, n_slot = out.size, snaps[0].size
    written = min(T, K)
    assert got.size == n_out + K * n_slot
    err_o = ref.rel_rms(got[:n_out], out.ravel())
    err_s = ref.rel_rms(got[n_out : n_out + written * n_slot], snaps[:written].ravel())
    log.info("cpu op %s S=%d: out %.2e state %.2e", _ids(case), S, err_o, err_s)
    assert np.isfinite(got[: n_out + written * n_slot]).all()
    assert err_o <= TOL_CPU_OP_F32 and err_s <= TOL_CPU_OP_F32


def test_reference_detects_untiled_heads(lib_dir):
    """The CPU op reads key head h % H_k for value head h; an interleaved (h // r) reading differs."""
    from ggml_cpu_op import GgmlCpu

    rng = np.random.default_rng(5)
    q, k, v, g, beta, state = ref.random_inputs(rng, T=8, H_k=2, H_v=4, S=16)
    got = GgmlCpu(lib_dir).gated_delta_net(q, k, v, g, beta, state)
    interleaved = (np.repeat(q, 2, axis=2), np.repeat(k, 2, axis=2))  # h -> h // 2
    out_i, _ = ref.recurrent(*interleaved, v, g, beta, state)
    out_t, _ = ref.recurrent(q, k, v, g, beta, state)
    assert ref.rel_rms(got[: out_t.size], out_t.ravel()) <= TOL_CPU_OP_F32
    assert ref.rel_rms(got[: out_i.size], out_i.ravel()) > 1e-2
