"""Naive numpy reference for the attention methods of docs/semantics.md.

Independent of ``lminf_jax``: plain numpy, float64 throughout, one dense [N, T, T] logit
matrix and an explicit boolean mask built straight from the formulas.  Meant to be slow and
obviously correct, for small T (a Python loop runs over the queries).

Conventions
-----------
* q [T, N, H], k and v [T, K, H], before RoPE.  N is a multiple of K; query head n uses kv
  head ``n // (N // K)`` (the Hugging Face ``repeat_kv`` layout).
* Token sequence indices are 0..T-1: every mask is written in those indices, i for the query
  and j for the key.  ``positions`` only enters RoPE.
* ``R_p x`` is half-split ("rotate_half") RoPE at position p.  Logits are always computed
  from the *relative* rotation: ``(R_a q).(R_b k) = q.(R_{b-a} k)``, so we build a distance
  matrix ``dist[i, j] = a - b`` and rotate k by ``-dist``.  Huge absolute positions (10^8)
  therefore never appear inside a sin/cos; only their integer difference does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["default_inv_freq", "rope", "naive_attention"]


def default_inv_freq(head_dim, theta=10000.0):
    """Plain (unscaled) RoPE inverse frequencies: ``1 / theta**(arange(0, H, 2) / H)``, [H/2]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    return 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def rope(x, pos, inv_freq):
    """Half-split (Hugging Face rotate_half) RoPE.

    x [..., H], pos broadcastable to x.shape[:-1] (int or float), inv_freq [H/2].
    Angle = pos * inv_freq; x = [x1, x2] halves; returns [x1*cos - x2*sin, x2*cos + x1*sin]
    (float64).
    """
    x = np.asarray(x, dtype=np.float64)
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    h = x.shape[-1]
    if h % 2 or inv_freq.shape != (h // 2,):
        raise ValueError(f"head dim {h} does not match inv_freq of shape {inv_freq.shape}")
    pos = np.asarray(pos, dtype=np.float64)
    ang = pos[..., None] * inv_freq  # [..., H/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


_DEFAULTS = {
    "dense": {},
    "lambda": {
        "n_global": 10,
        "n_local": None,  # required
        "limit": None,  # None -> n_local
        "use_limit": True,
        "mask": True,
        "top_k": None,
        "insert_at": 2048,
        "layer": 0,
        "top_k_from_layer": 4,
    },
    "streaming": {"n_sink": 4, "n_recent": None},  # n_recent required
    "selfextend": {"group_size": None, "window_size": None, "scale_base": None},  # G, W required
    "dca": {"chunk_size": None, "local_window": None, "mscale_length": None},  # mscale_length: L, or None (off)
}


def _params(method, params):
    if method not in _DEFAULTS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(_DEFAULTS)}")
    unknown = set(params) - set(_DEFAULTS[method])
    if unknown:
        raise TypeError(f"unknown parameter(s) for method {method!r}: {sorted(unknown)}")
    p = dict(_DEFAULTS[method])
    p.update(params)
    return p


def _positions(positions, t):
    if positions is None:
        return np.arange(t, dtype=np.int64)
    pos = np.asarray(positions)
    if pos.shape != (t,):
        raise ValueError(f"positions must have shape ({t},), got {pos.shape}")
    if np.issubdtype(pos.dtype, np.integer):
        return pos.astype(np.int64)
    return pos.astype(np.float64)


def _mask_and_distance(q, k, inv_freq, pos, method, p, alibi=False):
    """Returns allowed [N, T, T] bool and dist [T, T] float64 (query pos minus key pos)."""
    t, n_heads, h = q.shape
    g = n_heads // k.shape[1]
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    causal = j <= i
    # true relative distance p_i - p_j, exact integer subtraction before the cast
    true_dist = (pos[:, None] - pos[None, :]).astype(np.float64)

    if method == "dense":
        allowed = causal
        dist = true_dist
        return np.broadcast_to(allowed, (n_heads, t, t)).copy(), dist

    if method == "selfextend":
        # Jin et al. 2024: neighbours (i-j < W) at i-j; the rest at (p_i//G - p_j//G) + W - W//G
        g_size, w_size = p["group_size"], p["window_size"]
        pi, pj = pos[:, None], pos[None, :]
        grouped = (pi // g_size - pj // g_size) + w_size - w_size // g_size
        dist = np.where(i - j < w_size, true_dist, grouped.astype(np.float64))
        return np.broadcast_to(causal, (n_heads, t, t)).copy(), dist

    if method == "dca":
        # An et al. 2024: key at p_j mod c; the query at p_i mod c (same chunk), at
        # min(p_i mod c + c, chunk_size) (the chunk before), at min(2c - 1, chunk_size) (earlier)
        c = p["chunk_size"] - p["local_window"]
        pi, pj = pos[:, None], pos[None, :]
        a, b = pi // c, pj // c
        q_at = np.where(a == b, pi % c, np.where(a - 1 == b, np.minimum(pi % c + c, p["chunk_size"]),
                                                 min(2 * c - 1, p["chunk_size"])))
        dist = (q_at - pj % c).astype(np.float64)
        return np.broadcast_to(causal, (n_heads, t, t)).copy(), dist

    if method == "streaming":
        n_sink, n_recent = p["n_sink"], p["n_recent"]
        if n_recent is None or n_recent < 1:
            raise ValueError("streaming needs n_recent >= 1")
        if n_sink < 0:
            raise ValueError("streaming needs n_sink >= 0")
        recent = (j <= i) & (j > i - n_recent)
        sink = (j < n_sink) & causal
        allowed = recent | sink
        p_i = np.minimum(i, n_sink + n_recent - 1)  # [T, 1]
        dist = np.where(recent, i - j, p_i - j).astype(np.float64)
        return np.broadcast_to(allowed, (n_heads, t, t)).copy(), dist

    # lambda
    n_global, n_local = p["n_global"], p["n_local"]
    if n_local is None or n_local < 1:
        raise ValueError("lambda needs n_local >= 1")
    if n_global < 0:
        raise ValueError("lambda needs n_global >= 0")
    limit = n_local if p["limit"] is None else p["limit"]
    local = causal & (i - j < n_local)
    far = i - j >= n_local  # implies causal
    glob = far & (j < n_global)
    allowed = local | glob if p["mask"] else local | far

    dist = true_dist.copy()
    if p["use_limit"]:
        # the global branch (or, with mask=False, every far key) at distance exactly `limit`
        dist[far] = float(limit)

    allowed = np.broadcast_to(allowed, (n_heads, t, t)).copy()
    top_k = p["top_k"]
    if top_k is not None and p["layer"] >= p["top_k_from_layer"] and top_k > 0:
        if not p["mask"]:
            raise ValueError("top_k with mask=False makes no sense: all far keys are already attended")
        last = t - 1
        middle = np.arange(n_global, last - n_local + 1)  # n_global <= j <= i - n_local
        if middle.size:
            insert_at = float(p["insert_at"])
            # (R_insert q_i).(R_0 k_j); under ALiBi q_i.k_j (the bias of distance insert_at is the same for all)
            qr = q[last] if alibi else rope(q[last], insert_at, inv_freq)  # [N, H]
            for n in range(n_heads):
                score = k[middle, n // g, :] @ qr[n]
                # largest first; ties broken towards the smaller j (stable sort)
                order = np.argsort(-score, kind="stable")[:top_k]
                allowed[n, last, middle[order]] = True
            dist[last, middle] = insert_at
    return allowed, dist


def naive_attention(q, k, v, positions, inv_freq, method, alibi_slopes=None, softcap=None, **params):
    """Naive reference attention (numpy, float64).

    q [T, N, H], k and v [T, K, H] (before RoPE), N a multiple of K; query head n uses kv
    head n // (N // K).  positions [T] int: RoPE positions of the tokens (None means
    arange(T); ignored by "streaming", which is index-based).  Token sequence indices are
    0..T-1 and all masks use those indices.

    method / params (defaults):
      "dense":     no params.
      "lambda":    n_global [10], n_local (required), limit [n_local], use_limit [True],
                   mask [True], top_k [None], insert_at [2048], layer [0],
                   top_k_from_layer [4].
      "streaming": n_sink [4], n_recent (required).
      "selfextend": group_size, window_size (required), scale_base [None: no log scaling].
      "dca":       chunk_size, local_window (required), mscale_length [None: no mscale].

    alibi_slopes [N] (docs/semantics.md#alibi-models): no RoPE (inv_freq is ignored); a key at
    the method's distance d (the distance RoPE would use) adds ``-slope_n * d`` to the logit;
    lambda's top_k then picks the middle keys by q.k (their bias, of distance insert_at, is common).
    softcap: logits become ``softcap * tanh(logits / softcap)`` before the mask and the bias-free
    softmax (Gemma 2; applied to the scaled q.k, and after ALiBi's bias if both are given).

    Returns (out [T, N, H] float64, allowed [N, T, T] bool).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    inv_freq = np.asarray(inv_freq, dtype=np.float64)
    if q.ndim != 3 or k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    t, n_heads, h = q.shape
    if k.shape[0] != t or k.shape[2] != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree")
    n_kv = k.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"N={n_heads} is not a multiple of K={n_kv}")
    g = n_heads // n_kv
    p = _params(method, params)
    pos = _positions(positions, t)

    allowed, dist = _mask_and_distance(q, k, inv_freq, pos, method, p, alibi_slopes is not None)

    scale = 1.0 / np.sqrt(h)
    logits = np.full((n_heads, t, t), -np.inf)
    for i in range(t):
        js = np.nonzero(allowed[:, i, :].any(axis=0))[0]
        if alibi_slopes is None:
            # (R_a q_i).(R_b k_j) = q_i.(R_{-(a-b)} k_j), with a-b = dist[i, j]
            kr = rope(k[js], -dist[i, js][:, None], inv_freq)  # [J, K, H]
        else:
            kr = k[js]
        kr = np.repeat(kr, g, axis=1)  # [J, N, H], head n -> kv head n // g
        s = np.einsum("nh,jnh->nj", q[i], kr) * scale
        if method == "dca" and p["mscale_length"] is not None:
            # ChunkLlama's mscale of a token at position p: 0.05 ln((p+1)/L) + 1 past L, on q and on k
            ms = lambda x: np.where(x + 1 > p["mscale_length"], 0.05 * np.log((x + 1) / p["mscale_length"]) + 1, 1.0)  # noqa: E731
            s = s * ms(float(pos[i])) * ms(pos[js].astype(np.float64))[None, :]
        if method == "selfextend" and p["scale_base"] is not None:
            # LongLM's log scaling of a query at position p: max(1, ln(p+1) / ln(scale_base))
            s = s * max(1.0, np.log(float(pos[i]) + 1) / np.log(p["scale_base"]))
        if alibi_slopes is not None:
            s = s - np.asarray(alibi_slopes, np.float64)[:, None] * dist[i, js][None, :]
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        logits[:, i, js] = np.where(allowed[:, i, js], s, -np.inf)

    if not allowed.any(axis=-1).all():
        raise ValueError("some query attends no key")
    m = logits.max(axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(logits - m), 0.0)
    probs = e / e.sum(axis=-1, keepdims=True)
    v_rep = np.repeat(v, g, axis=1)  # [T, N, H]
    out = np.einsum("nij,jnh->inh", probs, v_rep)
    return out, allowed
