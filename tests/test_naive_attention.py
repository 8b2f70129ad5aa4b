"""Sanity checks of the naive numpy reference (tests/naive_attention.py) itself.

The reference is checked against torch / Hugging Face transformers code written from the
docs/semantics.md formulas with *absolute* RoPE rotations (small positions only), so that the two
share no code path: transformers' own rotate_half/apply_rotary_pos_emb/repeat_kv and torch's
scaled_dot_product_attention.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

try:  # tests/ is not a package (pytest "prepend" import mode puts tests/ on sys.path)
    from naive_attention import default_inv_freq, naive_attention, rope
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from .naive_attention import default_inv_freq, naive_attention, rope

T, N, K, H = 37, 6, 2, 16
G = N // K
ATOL = 1e-10


def _qkv(seed, t=T, n=N, kv=K, h=H):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, n, h))
    k = rng.standard_normal((t, kv, h))
    v = rng.standard_normal((t, kv, h))
    return q, k, v


def _cos_sin(pos, inv_freq):
    """HF-style cos/sin [1, T, H] (float64) for positions pos [T]."""
    freqs = torch.as_tensor(np.asarray(pos, np.float64))[:, None] * torch.as_tensor(inv_freq)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None], emb.sin()[None]


def _to_bnth(x):
    """[T, n, H] numpy -> [1, n, T, H] torch float64."""
    return torch.as_tensor(np.asarray(x, np.float64)).permute(1, 0, 2)[None]


def _hf_rotate(x, pos, inv_freq):
    """Rotate x [T, n, H] at positions pos [T] with transformers' apply_rotary_pos_emb."""
    cos, sin = _cos_sin(pos, inv_freq)
    xt = _to_bnth(x)
    out, _ = apply_rotary_pos_emb(xt, xt, cos, sin, unsqueeze_dim=1)
    return out  # [1, n, T, H]


def _out_np(o):
    """[1, N, T, H] torch -> [T, N, H] numpy."""
    return o[0].permute(1, 0, 2).numpy()


def _torch_dense(q, k, v, pos, inv_freq):
    qt = _hf_rotate(q, pos, inv_freq)
    kt = repeat_kv(_hf_rotate(k, pos, inv_freq), G)
    vt = repeat_kv(_to_bnth(v), G)
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return _out_np(o)


def _torch_masked(scores, mask, v, g):
    """scores [1, N, T, T], mask [N, T, T] bool -> out [T, N, H]."""
    m = torch.as_tensor(mask)[None]
    s = scores.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return _out_np(p @ repeat_kv(_to_bnth(v), g))


def _lambda_sets(t, n_global, n_local):
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    local = (j <= i) & (i - j < n_local)
    glob = (j < n_global) & (i - j >= n_local)
    return local, glob


def _torch_lambda(q, k, v, pos, inv_freq, n_global, n_local, limit=None, mask=True,
                  use_limit=True, top_k=None, insert_at=2048, g=G):
    """docs/semantics.md#lambda formulas with absolute rotations in torch (small positions only)."""
    t, n, h = q.shape
    limit = n_local if limit is None else limit
    local, glob = _lambda_sets(t, n_global, n_local)
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    far = i - j >= n_local
    scale = 1.0 / np.sqrt(h)
    k_true = repeat_kv(_hf_rotate(k, pos, inv_freq), g)
    q_true = _hf_rotate(q, pos, inv_freq)
    s_true = q_true @ k_true.transpose(-1, -2) * scale  # (R_{p_i} q).(R_{p_j} k)
    k0 = repeat_kv(_to_bnth(k), g)  # R_0 k
    q_lim = _hf_rotate(q, np.full(t, limit), inv_freq)
    s_lim = q_lim @ k0.transpose(-1, -2) * scale  # (R_limit q).(R_0 k)
    far_set = glob if mask else far
    far_scores = s_lim if use_limit else s_true
    sel = torch.as_tensor(far_set)[None, None]
    scores = torch.where(sel, far_scores, s_true)
    allowed = np.broadcast_to(local | far_set, (n, t, t)).copy()
    if top_k:
        last = t - 1
        middle = np.arange(n_global, last - n_local + 1)
        if middle.size:
            q_ins = _hf_rotate(q, np.full(t, insert_at), inv_freq)
            s_ins = q_ins @ k0.transpose(-1, -2)  # [1, N, T, T], unscaled ranking score
            mid_scores = s_ins[0, :, last, middle]  # [N, M]
            kk = min(top_k, middle.size)
            idx = torch.topk(mid_scores, kk, dim=-1).indices.numpy()
            for hh in range(n):
                allowed[hh, last, middle[idx[hh]]] = True
            scores[0, :, last, middle] = s_ins[0, :, last, middle] * scale
    return _torch_masked(scores, allowed, v, g), allowed


# --------------------------------------------------------------------------- RoPE / dense


def test_default_inv_freq():
    f = default_inv_freq(16, 10000.0)
    assert f.shape == (8,)
    np.testing.assert_allclose(f, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), rtol=0, atol=0)


def test_rope_matches_hf():
    q, _, _ = _qkv(0)
    pos = np.arange(T) * 3 + 11
    inv = default_inv_freq(H, 500000.0)
    ours = rope(q, pos[:, None], inv)
    theirs = _out_np(_hf_rotate(q, pos, inv))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    # rotation composes additively and is orthogonal
    np.testing.assert_allclose(rope(rope(q, 5, inv), -5, inv), q, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(q, axis=-1), atol=1e-12)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_dense_matches_torch_sdpa(theta):
    q, k, v = _qkv(1)
    rng = np.random.default_rng(2)
    pos = 7 + np.cumsum(rng.integers(1, 4, size=T))  # non-contiguous positions
    inv = default_inv_freq(H, theta)
    out, allowed = naive_attention(q, k, v, pos, inv, "dense")
    ref = _torch_dense(q, k, v, pos, inv)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert allowed.shape == (N, T, T) and allowed.dtype == bool
    assert (allowed == np.tril(np.ones((T, T), bool))[None]).all()


# --------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("n_global", [0, 3, 10])
@pytest.mark.parametrize("n_local", [T, T + 5])
def test_lambda_large_window_equals_dense(n_global, n_local):
    q, k, v = _qkv(3)
    pos = np.arange(T) + 4
    inv = default_inv_freq(H)
    dense, a_dense = naive_attention(q, k, v, pos, inv, "dense")
    lam, a_lam = naive_attention(q, k, v, pos, inv, "lambda", n_global=n_global, n_local=n_local)
    np.testing.assert_allclose(lam, dense, rtol=0, atol=ATOL)
    assert (a_lam == a_dense).all()


@pytest.mark.parametrize("n_local", [1, 5, 16])
def test_lambda_no_global_is_sliding_window(n_local):
    q, k, v = _qkv(4)
    pos = np.arange(T) * 2 + 1
    inv = default_inv_freq(H)
    out, allowed = naive_attention(q, k, v, pos, inv, "lambda", n_global=0, n_local=n_local)
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    band = (j <= i) & (i - j < n_local)
    qt = _hf_rotate(q, pos, inv)
    kt = repeat_kv(_hf_rotate(k, pos, inv), G)
    vt = repeat_kv(_to_bnth(v), G)
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.as_tensor(band))
    np.testing.assert_allclose(out, _out_np(o), rtol=0, atol=ATOL)
    assert (allowed == band[None]).all()


@pytest.mark.parametrize("n_sink,n_recent", [(4, T - 4), (0, T), (2, T), (10, 30)])
def test_streaming_full_cache_equals_dense(n_sink, n_recent):
    q, k, v = _qkv(5)
    inv = default_inv_freq(H)
    dense, a_dense = naive_attention(q, k, v, np.arange(T), inv, "dense")
    st_, a_st = naive_attention(q, k, v, None, inv, "streaming", n_sink=n_sink, n_recent=n_recent)
    np.testing.assert_allclose(st_, dense, rtol=0, atol=ATOL)
    assert (a_st == a_dense).all()


# --------------------------------------------------------------------------- lambda vs torch


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_global=3, n_local=8),
        dict(n_global=3, n_local=8, limit=5),
        dict(n_global=3, n_local=8, limit=100),
        dict(n_global=10, n_local=6),
        dict(n_global=3, n_local=8, mask=False),
        dict(n_global=3, n_local=8, mask=False, limit=20),
        dict(n_global=3, n_local=8, use_limit=False),
        dict(n_global=3, n_local=8, mask=False, use_limit=False),
    ],
)
def test_lambda_matches_torch_formula(kw):
    q, k, v = _qkv(6)
    pos = np.arange(T) + 3
    inv = default_inv_freq(H)
    out, allowed = naive_attention(q, k, v, pos, inv, "lambda", **kw)
    ref, a_ref = _torch_lambda(q, k, v, pos, inv, **kw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert (allowed == a_ref).all()


def test_lambda_ablation_both_off_is_dense():
    q, k, v = _qkv(7)
    pos = np.arange(T)
    inv = default_inv_freq(H)
    dense, _ = naive_attention(q, k, v, pos, inv, "dense")
    out, _ = naive_attention(q, k, v, pos, inv, "lambda", n_global=2, n_local=5, mask=False, use_limit=False)
    np.testing.assert_allclose(out, dense, rtol=0, atol=ATOL)


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 24),
    kv=st.integers(1, 2),
    g=st.integers(1, 3),
    n_global=st.integers(0, 6),
    n_local=st.integers(1, 12),
    limit=st.one_of(st.none(), st.integers(0, 40)),
    mask=st.booleans(),
    use_limit=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_lambda_matches_torch_formula_property(t, kv, g, n_global, n_local, limit, mask, use_limit, seed):
    n, h = kv * g, 8
    q, k, v = _qkv(seed, t=t, n=n, kv=kv, h=h)
    pos = np.arange(t) + (seed % 50)
    inv = default_inv_freq(h)
    kw = dict(n_global=n_global, n_local=n_local, limit=limit, mask=mask, use_limit=use_limit)
    out, allowed = naive_attention(q, k, v, pos, inv, "lambda", **kw)
    ref, a_ref = _torch_lambda(q, k, v, pos, inv, g=g, **kw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert (allowed == a_ref).all()


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("top_k,insert_at", [(5, 2048), (2, 30), (100, 50)])
def test_lambda_top_k_matches_torch(top_k, insert_at):
    q, k, v = _qkv(8)
    pos = np.arange(T)
    inv = default_inv_freq(H)
    kw = dict(n_global=3, n_local=8, top_k=top_k, insert_at=insert_at)
    out, allowed = naive_attention(q, k, v, pos, inv, "lambda", layer=4, **kw)
    ref, a_ref = _torch_lambda(q, k, v, pos, inv, **kw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=ATOL)
    assert (allowed == a_ref).all()
    base, a_base = naive_attention(q, k, v, pos, inv, "lambda", n_global=3, n_local=8)
    # only the last query changes, and it gains min(top_k, #middle) keys per head
    np.testing.assert_allclose(out[:-1], base[:-1], rtol=0, atol=0)
    assert (allowed[:, :-1] == a_base[:, :-1]).all()
    n_middle = (T - 1 - 8) - 3 + 1
    extra = allowed[:, -1].sum(-1) - a_base[:, -1].sum(-1)
    assert (extra == min(top_k, n_middle)).all()
    assert not np.allclose(out[-1], base[-1])


def test_lambda_top_k_only_from_layer():
    q, k, v = _qkv(9)
    inv = default_inv_freq(H)
    base, a_base = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=3, n_local=8)
    for layer in (0, 3):
        out, a = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=3, n_local=8, top_k=5, layer=layer)
        np.testing.assert_array_equal(out, base)
        assert (a == a_base).all()
    out, _ = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=3, n_local=8, top_k=5, layer=2,
                             top_k_from_layer=2)
    assert not np.allclose(out[-1], base[-1])
    # no middle keys -> nothing to add
    out, _ = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=3, n_local=T - 3, top_k=5, layer=9)
    base2, _ = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=3, n_local=T - 3)
    np.testing.assert_array_equal(out, base2)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("n_sink,n_recent", [(4, 8), (0, 5), (3, 1), (6, 6)])
def test_streaming_matches_reindexed_cache(n_sink, n_recent):
    """Query i == the last query of a dense pass over its cache, positions 0..len-1."""
    q, k, v = _qkv(10)
    inv = default_inv_freq(H)
    out, allowed = naive_attention(q, k, v, np.arange(T) + 1000, inv, "streaming", n_sink=n_sink, n_recent=n_recent)
    for i in range(T):
        cache = sorted(set(range(min(n_sink, i + 1))) | set(range(max(0, i - n_recent + 1), i + 1)))
        assert cache[-1] == i
        assert allowed[:, i].sum(-1).tolist() == [len(cache)] * N
        assert allowed[:, i, cache].all()
        cpos = np.arange(len(cache))
        ref = _torch_dense(q[cache], k[cache], v[cache], cpos, inv)[-1]
        np.testing.assert_allclose(out[i], ref, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- huge positions


def test_dense_invariant_to_huge_offset():
    q, k, v = _qkv(11)
    inv = default_inv_freq(H)
    pos = np.arange(T)
    a, _ = naive_attention(q, k, v, pos, inv, "dense")
    b, _ = naive_attention(q, k, v, pos + 10**8, inv, "dense")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(n_global=3, n_local=8), dict(n_global=4, n_local=5, limit=3),
                                dict(n_global=3, n_local=8, top_k=3, layer=5, insert_at=64)])
def test_lambda_invariant_to_huge_offset(kw):
    q, k, v = _qkv(12)
    inv = default_inv_freq(H)
    pos = np.arange(T)
    n_global, n_local = kw["n_global"], kw["n_local"]
    a, aa = naive_attention(q, k, v, pos, inv, "lambda", **kw)
    # uniform shift: every query is invariant
    b, ab = naive_attention(q, k, v, pos + 10**8, inv, "lambda", **kw)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert (aa == ab).all()
    # stream view: starting tokens stay at 0..n_global-1, the rest is at offset 10^8
    pos2 = pos.copy()
    pos2[n_global:] += 10**8
    c, _ = naive_attention(q, k, v, pos2, inv, "lambda", **kw)
    first = n_local + n_global
    np.testing.assert_allclose(a[first:], c[first:], rtol=0, atol=1e-6)
    # ...whereas a query that still sees a starting token locally does move
    assert not np.allclose(a[n_local - 1], c[n_local - 1])


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n_global,n_local", [(0, 1), (3, 8), (10, 6), (5, 30), (40, 4)])
def test_lambda_mask_structure(n_global, n_local):
    q, k, v = _qkv(13)
    inv = default_inv_freq(H)
    _, allowed = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=n_global, n_local=n_local)
    local, glob = _lambda_sets(T, n_global, n_local)
    assert not (local & glob).any()  # disjoint: no key is counted twice
    assert (allowed == (local | glob)[None]).all()
    counts = allowed.sum(-1)
    assert counts.max() <= n_global + n_local
    assert (counts == local.sum(-1) + glob.sum(-1)).all()
    assert (counts >= 1).all()
    # a query far enough out sees exactly n_global + n_local keys
    if T - 1 >= n_local + n_global - 1 and n_global <= T:
        assert (counts[:, -1] == min(n_global, T) + n_local).all()
    # ablation mask=False: causal
    _, a_nomask = naive_attention(q, k, v, np.arange(T), inv, "lambda", n_global=n_global, n_local=n_local,
                                  mask=False)
    assert (a_nomask == np.tril(np.ones((T, T), bool))[None]).all()


@pytest.mark.parametrize("n_sink,n_recent", [(4, 8), (0, 3), (4, 1)])
def test_streaming_mask_structure(n_sink, n_recent):
    q, k, v = _qkv(14)
    inv = default_inv_freq(H)
    _, allowed = naive_attention(q, k, v, None, inv, "streaming", n_sink=n_sink, n_recent=n_recent)
    counts = allowed.sum(-1)
    assert counts.max() <= n_sink + n_recent
    assert (counts[:, -1] == n_sink + n_recent).all()
    assert not np.triu(allowed, 1).any()


def test_bad_arguments():
    q, k, v = _qkv(15)
    inv = default_inv_freq(H)
    with pytest.raises(TypeError):
        naive_attention(q, k, v, np.arange(T), inv, "lambda", n_local=4, n_globl=2)
    with pytest.raises(ValueError):
        naive_attention(q, k, v, np.arange(T), inv, "nope")
    with pytest.raises(ValueError):
        naive_attention(q[:, :5], k, v, np.arange(T), inv, "dense")
    with pytest.raises(ValueError):
        naive_attention(q, k, v, np.arange(T), inv, "lambda", n_local=4, mask=False, top_k=2, layer=4)


# --------------------------------------------------------------------------- ALiBi and soft-capping
# (the references for MPT and Gemma 2, checked against transformers' own attention layers)


def _alibi_slopes(n_heads: int, bias_max: float = 8.0) -> np.ndarray:
    """ALiBi's head slopes (Press et al.) as MPT defines them: 2^(-bias_max * i / n) for
    i = 1..n with n the next power of two, odd-indexed ones first when n exceeds the heads."""
    n = 2 ** int(np.ceil(np.log2(n_heads)))
    slopes = 2.0 ** (-bias_max * np.arange(1, n + 1) / n)
    return (slopes if n == n_heads else np.concatenate([slopes[1::2], slopes[::2]]))[:n_heads]


@pytest.mark.parametrize("n_heads", [4, 6])
def test_alibi_dense_matches_transformers_mpt(n_heads):
    """Dense with ALiBi (a key at distance d adds -slope * d) equals MptAttention, whose bias is
    slope * (j - last) for every query (a per-row constant away from -slope * (i - j))."""
    from transformers import MptConfig
    from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

    t, d = 20, 8 * n_heads
    config = MptConfig(d_model=d, n_heads=n_heads, max_seq_len=32, attn_config={"attn_impl": "torch"})
    torch.manual_seed(0)
    layer = MptAttention(config).double().eval()
    x = torch.randn(1, t, d, dtype=torch.float64)
    bias = build_mpt_alibi_tensor(n_heads, config.max_seq_len).double()
    np.testing.assert_allclose(-bias[:, 0, -2].numpy(), _alibi_slopes(n_heads), rtol=1e-6)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        expected = layer(x, bias, attention_mask=mask)[0][0].numpy()
        q, k, v = (a.reshape(t, n_heads, 8).numpy() for a in layer.Wqkv(x)[0].chunk(3, dim=-1))
    out, _ = naive_attention(q, k, v, None, None, "dense", alibi_slopes=_alibi_slopes(n_heads))
    ours = out.reshape(t, d) @ layer.out_proj.weight.detach().numpy().T
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)  # (transformers' slopes are float32)


def test_alibi_lambda_and_streaming_distances():
    """ALiBi's distances are RoPE's (docs/semantics.md#alibi-models): lambda's far starting keys at `limit`,
    streaming's sinks at their cache distance, and only differences matter (offset 10^8)."""
    q, k, v = _qkv(7)
    slopes = _alibi_slopes(N)
    i = T - 1  # the last query

    def attend(js, dist):
        """Query i over keys js at ALiBi distances dist, written out: [N, H]."""
        logits = np.einsum("nh,jnh->nj", q[i], np.repeat(k[js], N // K, axis=1)) / np.sqrt(H) \
            - slopes[:, None] * np.asarray(dist)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return np.einsum("nj,jnh->nh", p / p.sum(1, keepdims=True), np.repeat(v[js], N // K, axis=1))

    lam, allowed = naive_attention(q, k, v, None, None, "lambda", alibi_slopes=slopes, n_global=2, n_local=5, limit=7)
    # the 2 starting keys at distance limit = 7, the band of 5 at its true distances
    np.testing.assert_allclose(lam[i], attend([0, 1, *range(i - 4, i + 1)], [7, 7, 4, 3, 2, 1, 0]), atol=1e-12)
    assert allowed[:, i].sum(1).tolist() == [7] * N
    far_off, _ = naive_attention(q, k, v, np.arange(T) + 10**8, None, "lambda", alibi_slopes=slopes, n_global=2,
                                 n_local=5)
    near, _ = naive_attention(q, k, v, None, None, "lambda", alibi_slopes=slopes, n_global=2, n_local=5)
    np.testing.assert_allclose(far_off, near, atol=1e-12)
    stream, _ = naive_attention(q, k, v, None, None, "streaming", alibi_slopes=slopes, n_sink=2, n_recent=4)
    # the last query sits at cache position n_sink + n_recent - 1 = 5: sink j at distance 5 - j
    np.testing.assert_allclose(stream[i], attend([0, 1, *range(i - 3, i + 1)], [5, 4, 3, 2, 1, 0]), atol=1e-12)


def test_softcap_dense_matches_transformers_gemma2():
    """Soft-capping (cap * tanh(s / cap) on the scaled logits, before the mask) equals Gemma 2's
    eager attention, with query_pre_attn_scalar = head_dim so that its scale is 1/sqrt(H)."""
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding

    t, heads, kv_heads, h = 20, 4, 2, 16
    config = Gemma2Config(hidden_size=48, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=h,
                          query_pre_attn_scalar=h, attn_logit_softcapping=2.0, num_hidden_layers=2,
                          layer_types=["full_attention"] * 2, attn_implementation="eager")
    torch.manual_seed(0)
    layer = Gemma2Attention(config, layer_idx=0).double().eval()
    x = torch.randn(1, t, 48, dtype=torch.float64)
    positions = torch.arange(t)[None] + 3
    cos, sin = (a.double() for a in Gemma2RotaryEmbedding(config)(x.float(), positions))
    mask = torch.full((t, t), -torch.inf, dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        expected = layer(x, (cos, sin), mask)[0][0].numpy()
        q, k, v = (proj(x)[0].reshape(t, -1, h).numpy() for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    inv = default_inv_freq(h, config.rope_parameters["rope_theta"])
    out, _ = naive_attention(q, k, v, positions[0].numpy(), inv, "dense", softcap=2.0)
    ours = out.reshape(t, -1) @ layer.o_proj.weight.detach().numpy().T
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    uncapped, _ = naive_attention(q, k, v, positions[0].numpy(), inv, "dense")
    assert np.abs(uncapped.reshape(t, -1) @ layer.o_proj.weight.detach().numpy().T - expected).max() > 1e-3
