"""LM-Infinite (Han et al., 2024), the `Lambda` method: n_global starting tokens seen at distance
`limit` plus an n_local window, and the ablations of the paper's diagnosis (docs/semantics.md#lambda)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lminf_jax.attention import blockwise as bw
from lminf_jax.attention.band_method import BandMethod
from lminf_jax.attention.banded import AtDistance, Band, TrueDistance
from lminf_jax.attention.dense import causal_attention
from lminf_jax.attention.method import N_LOCAL_HELP, CacheLayout, option
from lminf_jax.errors import UserError

@dataclasses.dataclass(frozen=True)
class Lambda(BandMethod):
  """LM-Infinite: n_global starting tokens seen at distance `limit` + an n_local window.

  Ablations of the paper's diagnosis: `mask=False` attends every far key (i-j >= n_local) at
  distance `limit` (O(T^2)); `distance_limit=False` keeps the mask but sees the starting
  tokens at their true distance. `top_k` adds, for layers >= top_k_from_layer and the last
  query of a forward, the top_k middle keys at distance top_k_insert_at. `kernel` runs the band
  through a flash kernel; the no-mask ablation always runs through XLA.
  """

  n_global: int = option(10, "starting tokens every query sees", minimum=0)
  n_local: int | None = option(None, N_LOCAL_HELP, minimum=1, model_default=True)
  limit: int | None = option(None, "distance the starting tokens are seen at (default: n_local)", minimum=1,
                             model_default=True)
  top_k: int | None = option(None, "middle tokens added for the last query of a forward (off by default)",
                             minimum=1, per_method=True)
  top_k_from_layer: int = option(4, "first layer that adds the top_k middle tokens", minimum=0)
  top_k_insert_at: int = option(2048, "distance the top_k middle tokens are seen at", minimum=0)
  mask: bool = option(True, "ablation: without the mask every far key is seen at distance `limit`")
  distance_limit: bool = option(True, "ablation: without the limit the starting tokens are at their true distance")

  def __post_init__(self):
    super().__post_init__()
    if self.top_k is not None and not self.mask:
      raise UserError("Lambda.top_k needs mask=True (without the mask every far key is attended already)")

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> Lambda:
    n_local = self.n_local or max_position_embeddings
    return dataclasses.replace(self, n_local=n_local, limit=self.limit or n_local)

  def band(self) -> Band:
    return Band(self.n_global, self.n_local, AtDistance(self.limit) if self.distance_limit else TrueDistance())

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    if not self.mask:  # ablation: distance limit without the mask, O(T^2)
      far = (self.n_local, self.limit) if self.distance_limit else None
      return causal_attention(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.chunk, self.key_block, far)[0]
    o_btnh, lse_btn = self.band_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)
    if self.top_k:
      if lse_btn is None:
        raise UserError("Lambda.top_k needs every key of the last query: not supported with sequence parallelism")
      o_last = _add_top_k_middle(o_btnh[:, -1], lse_btn[:, -1], q_btnh, k_btkh, v_btkh, positions_bt, pe,
                                 self)
      o_btnh = o_btnh.at[:, -1].set(jnp.where(layer >= self.top_k_from_layer, o_last, o_btnh[:, -1]))
    return o_btnh

  def cache_layout(self, max_len: int | None) -> CacheLayout:
    if self.top_k or not self.mask:
      raise UserError("cached lambda supports neither top_k nor the no-mask ablation (both need every key)")
    return super().cache_layout(max_len)


def _add_top_k_middle(o_bnh, lse_bn, q_btnh, k_btkh, v_btkh, positions_bt, pe, spec: Lambda):
  """Adds to the last query's softmax, per head, the top_k middle keys n_global <= j <= i-n_local
  by (R_insert q_i).(R_0 k_j), at distance top_k_insert_at. O(T) memory. (X: the top_k keys.)"""
  b, t, n, h = q_btnh.shape
  kv = k_btkh.shape[2]
  idx_bt = bw.sequence_index(positions_bt)
  q_bkgh = bw.query_tile(q_btnh[:, -1:], jnp.full((b, 1), spec.top_k_insert_at), pe, kv)
  s_bkgt = bw.scores(q_bkgh, bw.Tile(jnp.swapaxes(k_btkh, 1, 2), jnp.zeros((b, t), jnp.int32)), pe)
  middle_bt = bw.visible(idx_bt[:, -1:], idx_bt, min_dist=spec.n_local)[:, 0] & (idx_bt >= spec.n_global)
  s_bkgt = jnp.where(middle_bt[:, None, None], s_bkgt, -jnp.inf)
  top_s_bkgx, top_j_bkgx = jax.lax.top_k(s_bkgt, min(spec.top_k, t))
  v_bkth = jnp.swapaxes(v_btkh, 1, 2)
  v_bkgxh = jax.vmap(jax.vmap(lambda v_th, j_gx: v_th[j_gx]))(v_bkth, top_j_bkgx)
  # Merge with this query's softmax over its other keys (log-sum-exp lse): a shift m keeps exp finite.
  lse_bkg = lse_bn.reshape(b, kv, n // kv)
  m_bkg = jax.lax.stop_gradient(jnp.maximum(lse_bkg, top_s_bkgx.max(-1)))
  w_old = jnp.exp(lse_bkg - m_bkg)
  w_sel = jnp.exp(top_s_bkgx - m_bkg[..., None])  # 0 for non-middle keys (score -inf)
  acc_bkgh = o_bnh.reshape(b, kv, n // kv, h).astype(jnp.float32) * w_old[..., None]
  acc_bkgh += jnp.einsum("bkgx,bkgxh->bkgh", w_sel, v_bkgxh.astype(jnp.float32))
  o_bkgh = acc_bkgh / (w_old + w_sel.sum(-1))[..., None]
  return o_bkgh.reshape(b, n, h).astype(o_bnh.dtype)
