"""The attention methods of DESIGN.md section 4 as pure functions over arrays.

Each takes q [B,T,N,H], k/v [B,T,K,H] (projections before RoPE), RoPE positions [B,T]
(negative = left padding), inverse frequencies [H/2], its resolved spec and the layer index,
and returns the attention output [B,T,N,H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.banded import StartRotation, sink_and_band
from lminf_jax.attention.dense import causal_attention
from lminf_jax.attention.infllm import infllm_attention
from lminf_jax.attention.sequence_parallel import sequence_parallel_band
from lminf_jax.attention.specs import Dense, InfLLM, Lambda, Streaming
from lminf_jax.errors import UserError
from lminf_jax.sharding import mesh_axis_size, warn_dense_all_gather


def band_rotation(spec) -> StartRotation:
  """How a method rotates queries and starting keys against each other (DESIGN.md section 4)."""
  if isinstance(spec, Streaming):  # positions inside the cache: query at min(i, n_sink + n_recent - 1)
    cap = spec.n_sink + spec.n_recent - 1
    return (lambda pos, idx, ref: jnp.minimum(idx, cap), lambda pos, idx, ref: idx)
  if isinstance(spec, Lambda) and not spec.distance_limit:  # ablation: starting tokens at true distance
    return (lambda pos, idx, ref: pos - ref, lambda pos, idx, ref: pos - ref)
  limit = spec.limit if isinstance(spec, Lambda) else 0  # (dense has no starting keys)
  return (lambda pos, idx, ref: jnp.full_like(pos, limit), lambda pos, idx, ref: jnp.zeros_like(pos))


def band_shape(spec) -> tuple[int, int]:
  """(starting tokens, window) of a banded method's resolved spec."""
  if isinstance(spec, Streaming):
    return spec.n_sink, spec.n_recent
  return spec.n_global, spec.n_local


def _band(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec):
  """(out, lse): on one device, or split over the mesh's `sequence` axis (then lse is None)."""
  n_start, window = band_shape(spec)
  rotation = band_rotation(spec)
  if mesh_axis_size("sequence") > 1:
    return sequence_parallel_band(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec.chunk, spec.key_block,
                                  n_start, window, rotation), None
  return sink_and_band(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec.chunk, spec.key_block, n_start, window,
                       rotation)


def dense_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec: Dense, layer) -> jnp.ndarray:
  if mesh_axis_size("sequence") > 1:
    warn_dense_all_gather()
  return causal_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec.chunk, spec.key_block)[0]


def lambda_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec: Lambda, layer) -> jnp.ndarray:
  if not spec.mask:  # ablation: distance limit without the mask, O(T^2)
    far = (spec.n_local, spec.limit) if spec.distance_limit else None
    return causal_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec.chunk, spec.key_block, far)[0]
  o_btnh, lse_btn = _band(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec)
  if spec.top_k:
    if lse_btn is None:
      raise UserError("Lambda.top_k needs every key of the last query: not supported with sequence parallelism")
    o_last = _add_top_k_middle(o_btnh[:, -1], lse_btn[:, -1], q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h,
                               spec)
    o_btnh = o_btnh.at[:, -1].set(jnp.where(layer >= spec.top_k_from_layer, o_last, o_btnh[:, -1]))
  return o_btnh


def _add_top_k_middle(o_bnh, lse_bn, q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec: Lambda):
  """Adds to the last query's softmax, per head, the top_k middle keys n_global <= j <= i-n_local
  by (R_insert q_i).(R_0 k_j), at distance top_k_insert_at. O(T) memory."""
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  idx_bt = bw.sequence_index(positions_bt)
  q_bkgh = bw.query_tile(q_btnh[:, -1:], jnp.full((b, 1), spec.top_k_insert_at), inv_freq_h, kv)
  s_bkgt = bw.scores(q_bkgh, jnp.swapaxes(k_btkh, 1, 2))
  middle_bt = (idx_bt >= spec.n_global) & (idx_bt <= idx_bt[:, -1:] - spec.n_local)
  s_bkgt = jnp.where(middle_bt[:, None, None], s_bkgt, -jnp.inf)
  top_s_bkgk, top_j_bkgk = jax.lax.top_k(s_bkgt, min(spec.top_k, t))
  v_bkth = jnp.swapaxes(v_btkh, 1, 2)
  v_bkgkh = jax.vmap(jax.vmap(lambda v_th, j_gk: v_th[j_gk]))(v_bkth, top_j_bkgk)
  # Merge with this query's softmax over its other keys (log-sum-exp lse): a shift m keeps exp finite.
  lse_bkg = lse_bn.reshape(b, kv, n // kv)
  m_bkg = jax.lax.stop_gradient(jnp.maximum(lse_bkg, top_s_bkgk.max(-1)))
  w_old = jnp.exp(lse_bkg - m_bkg)
  w_sel = jnp.exp(top_s_bkgk - m_bkg[..., None])  # 0 for non-middle keys (score -inf)
  acc_bkgh = o_bnh.reshape(b, kv, n // kv, h).astype(jnp.float32) * w_old[..., None]
  acc_bkgh += jnp.einsum("bkgs,bkgsh->bkgh", w_sel, v_bkgkh.astype(jnp.float32))
  o_bkgh = acc_bkgh / (w_old + w_sel.sum(-1))[..., None]
  return o_bkgh.reshape(b, n, h).astype(o_bnh.dtype)


def streaming_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec: Streaming, layer) -> jnp.ndarray:
  return _band(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec)[0]


def infllm_method(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec: InfLLM, layer) -> jnp.ndarray:
  if mesh_axis_size("sequence") > 1:
    raise UserError("infllm does not support sequence parallelism (its block memory needs every earlier key)")
  return infllm_attention(q_btnh, k_btkh, v_btkh, positions_bt, inv_freq_h, spec, layer)


METHOD_FUNCTIONS = {Dense: dense_attention, Lambda: lambda_attention, Streaming: streaming_attention,
                    InfLLM: infllm_method}
