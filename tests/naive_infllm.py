"""Naive numpy (float64) reference for the InfLLM attention method of docs/semantics.md#infllm.

Deliberately slow and literal: queries are processed chunk by chunk, blocks are an explicit Python
list of ``Block`` records (token indices + representative key per query head), and every query gets
its own explicit (local keys, far keys) sets from ``infllm_key_sets``.  Independent of ``lminf_jax``.

Spec (docs/semantics.md#infllm):
  Queries are processed in chunks of `chunk` tokens (each decoded token is a chunk of one).
  Chunk c covers queries [s, e) and sees the memory state left after tokens [0, s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Block", "rope_vec", "memory_state", "infllm_key_sets", "naive_infllm"]


@dataclass
class Block:
  """One memory block: its index b, its tokens, and its representative key rk [N, H] (per query head)."""
  index: int
  tokens: list[int]
  rk: np.ndarray


def rope_vec(x: np.ndarray, p: int, inv_freq: np.ndarray) -> np.ndarray:
  """R_p x for one vector x [H] ("rotate_half" layout), float64. R_0 is the identity."""
  x = np.asarray(x, dtype=np.float64)
  h = x.shape[-1]
  x1, x2 = x[: h // 2], x[h // 2:]
  a = float(p) * np.asarray(inv_freq, dtype=np.float64)
  cos, sin = np.cos(a), np.sin(a)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])


def memory_state(e: int, n_init: int, n_local: int, block_size: int) -> tuple[list[int], list[list[int]]]:
  """Memory state after tokens [0, e): (init tokens, list of blocks as token lists, block b at list index b)."""
  # - init tokens `[0, min(n_init, max(0, e - n_local)))`;
  init = list(range(min(n_init, max(0, e - n_local))))
  blocks: list[list[int]] = []
  # - once init is complete (e - n_local >= n_init), blocks b = 0, 1, ... covering
  #   `[n_init + b*block_size, n_init + (b+1)*block_size)` for every b with
  #   `n_init + (b+1)*block_size <= e - n_local`.
  if e - n_local >= n_init:
    b = 0
    while n_init + (b + 1) * block_size <= e - n_local:
      blocks.append(list(range(n_init + b * block_size, n_init + (b + 1) * block_size)))
      b += 1
  return init, blocks


def infllm_key_sets(t: int, selected: list[list[int]], n_init: int, n_local: int, block_size: int,
                    chunk: int, start: int = 0, released_prefill: bool = False) -> list[tuple[set[int], set[int]]]:
  """(local keys, far keys) of every query i, given the selected blocks of each chunk.

  Returns one entry per query i in [start, t) (all queries with the default start=0). selected[c] are the
  block indices chosen by chunk c = [c*chunk, (c+1)*chunk). `released_prefill`: the released code's rule
  (docs/semantics.md, "The released code's chunked prefill"), for chunk <= n_local only.
  """
  assert not released_prefill or chunk <= n_local  # (the released code asserts exc_block_size <= n_local)
  out: list[tuple[set[int], set[int]]] = []
  for i in range(start, t):
    c = i // chunk
    s = c * chunk
    e = min(s + chunk, t)
    # "blocks formed before chunk c" = the blocks of the memory state after tokens [0, s).
    _, blocks = memory_state(s, n_init, n_local, block_size)
    sel = set(selected[c])
    unselected_tokens: set[int] = set()
    for b, toks in enumerate(blocks):
      if b not in sel:
        unselected_tokens.update(toks)
    # - Local branch of query i: keys with `0 <= i-j < n_local`.
    local = {j for j in range(0, i + 1) if 0 <= i - j < n_local}
    # - Far branch of query i: keys with `i-j >= n_local`, except the tokens of blocks (formed
    #   before chunk c) that chunk c did not select.
    far = {j for j in range(0, i + 1) if i - j >= n_local and j not in unselected_tokens}
    if released_prefill:
      # Released code: every query of chunk [s, e) sees the init tokens, the selected blocks, and the
      # remainder (pending and new-block) tokens up to e-1-n_local, whatever its own distance to them.
      init, _ = memory_state(e, n_init, n_local, block_size)
      pending = set(range(n_init + len(blocks) * block_size, e - n_local))
      far = {j for j in range(0, e - n_local)
             if j < n_init or j in pending or any(j in blocks[b] for b in sel)}
      assert set(init) <= far and far <= set(range(i))  # (chunk <= n_local: no key in a query's future)
    else:
      # So each key is in exactly one of local/far for each query.
      assert not (local & far)
    out.append((local, far))
  return out


def naive_infllm(q: np.ndarray, k: np.ndarray, v: np.ndarray, inv_freq: np.ndarray, n_init: int, n_local: int,
                 block_size: int, repr_tokens: int, top_k: int, chunk: int,
                 released_prefill: bool = False, decode_ring: int | None = None) -> tuple[np.ndarray, list[list[int]]]:
  """q [T, N, H], k and v [T, K, H] (projections before RoPE, one sequence, positions 0..T-1),
  inv_freq [H/2], or [ceil(T / chunk), H/2]: each query chunk's own (RoPE frequencies that
  change with the call, as dynamic NTK's: the chunk rotates its queries and every key it reads
  with its own). Returns (out [T, N, H] float64, selected block indices per query chunk).
  `released_prefill`: far keys by the released code's rule (`infllm_key_sets`). `decode_ring` (W):
  a chunk of one token reads each earlier local key j from a ring of W keys rotated when written,
  by j mod W with its writer's frequencies and by the rest, j - j mod W, with its own
  (docs/caches.md#rope-scaling-through-a-cache)."""
  q = np.asarray(q, dtype=np.float64)
  k = np.asarray(k, dtype=np.float64)
  v = np.asarray(v, dtype=np.float64)
  t, n, h = q.shape
  kh = k.shape[1]
  n_chunks = -(-t // chunk)
  inv_freq = np.broadcast_to(np.asarray(inv_freq, dtype=np.float64), (n_chunks, h // 2))
  assert n % kh == 0 and k.shape == (t, kh, h) and v.shape == (t, kh, h)
  group = n // kh

  def kv(hq: int) -> int:
    """GQA: query head hq uses kv head hq // (N // K)."""
    return hq // group

  scale = 1.0 / np.sqrt(h)  # every logit is divided by sqrt(H)

  out = np.zeros((t, n, h), dtype=np.float64)
  # s_{j,h} = sum over queries i with 0 <= i-j < n_local of P_h(i, j), accumulated as queries are processed.
  col_score = np.zeros((t, n), dtype=np.float64)
  blocks: list[Block] = []  # blocks formed so far, in index order
  selected: list[list[int]] = []

  for s in range(0, t, chunk):
    e = min(s + chunk, t)
    # Rotated with chunk c's frequencies: local query R_i q_i, local key R_j k_j, far/selection query
    # R_{n_local-1} q_i (rows [0, s) of the queries unused).
    freq = inv_freq[s // chunk]
    q_loc = np.stack([np.stack([rope_vec(q[i, hq], i, freq) for hq in range(n)]) if i >= s else np.zeros((n, h))
                      for i in range(e)])
    k_loc = np.stack([np.stack([rope_vec(k[j, g], j, freq) for g in range(kh)]) for j in range(e)])
    if decode_ring and e - s == 1:
      for j in range(s):
        angle = inv_freq[j // chunk] * (j % decode_ring) + freq * (j - j % decode_ring)
        k_loc[j] = [rope_vec(k[j, g], 1, angle) for g in range(kh)]
    q_far = np.stack([np.stack([rope_vec(q[i, hq], n_local - 1, freq) for hq in range(n)]) if i >= s
                      else np.zeros((n, h)) for i in range(e)])
    # Chunk c covers queries [s, e) and sees the memory state left after tokens [0, s).
    _, formed = memory_state(s, n_init, n_local, block_size)
    for b in range(len(blocks), len(formed)):
      toks = formed[b]
      # Every query that sees a block's tokens locally comes before the block is formed, so the score is final.
      assert all(j + n_local <= s for j in toks)
      rk = np.zeros((n, h), dtype=np.float64)
      for hq in range(n):
        # Representative key rk_{b,h}: the mean of the raw keys of the `repr_tokens` tokens j of block b
        # with the largest score s_{j,h} (ties: lower token index first, via a stable sort on -score).
        scores = np.array([col_score[j, hq] for j in toks])
        order = np.argsort(-scores, kind="stable")[:repr_tokens]
        rk[hq] = np.mean([k[toks[o], kv(hq)] for o in order], axis=0)
      blocks.append(Block(index=b, tokens=list(toks), rk=rk))
    assert len(blocks) == len(formed)

    # Selection for chunk c: all blocks if there are at most top_k, else the top_k blocks by
    # `sum_h (mean_{i in chunk} R_{n_local-1} q_{i,h}) . rk_{b,h}` over query heads h.
    if len(blocks) <= top_k:
      sel = [blk.index for blk in blocks]
    else:
      q_mean = np.mean(q_far[s:e], axis=0)  # [N, H], mean over the chunk's actual queries
      bscores = np.array([sum(float(np.dot(q_mean[hq], blk.rk[hq])) for hq in range(n)) for blk in blocks])
      # Ties: prefer the lower block index (stable sort on the negated score).
      sel = sorted(int(blocks[o].index) for o in np.argsort(-bscores, kind="stable")[:top_k])
    selected.append(sel)

    key_sets = infllm_key_sets(e, selected, n_init, n_local, block_size, chunk, start=s,
                               released_prefill=released_prefill)
    for i in range(s, e):
      local, far = key_sets[i - s]
      local_l, far_l = sorted(local), sorted(far)
      assert i in local  # a query with no allowed key cannot happen (key j = i is always local)
      for hq in range(n):
        g = kv(hq)
        # Local branch: true relative distance, logit (R_i q_i).(R_j k_j)/sqrt(H).
        lg_loc = [float(np.dot(q_loc[i, hq], k_loc[j, g])) * scale for j in local_l]
        # Far branch: keys unrotated, query rotated at n_local-1: logit (R_{n_local-1} q_i).(R_0 k_j)/sqrt(H).
        lg_far = [float(np.dot(q_far[i, hq], k[j, g])) * scale for j in far_l]
        # One softmax over local and far.
        logits = np.array(lg_loc + lg_far, dtype=np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        keys = local_l + far_l
        out[i, hq] = sum(p[m] * v[j, g] for m, j in enumerate(keys))
        # Accumulate s_{j,h}: LOCAL probabilities only, from this same full (local + far) softmax.
        for m, j in enumerate(local_l):
          col_score[j, hq] += p[m]
  return out, selected
