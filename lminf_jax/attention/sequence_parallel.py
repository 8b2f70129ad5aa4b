"""Sequence-parallel band attention (lambda, streaming) inside `jax.shard_map`.

The sequence is split over the `sequence` mesh axis. Each shard receives the keys of the
previous shards that its band reaches (`jax.lax.ppermute`, one hop per shard length, so
ceil((window-1)/T_shard) hops) and the starting keys from whichever shard holds them (a psum
of O(n_start) values). Communication per layer is O(window + n_start), not O(T); the results
equal the single-device ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lminf_jax.attention.banded import Band, band_attention
from lminf_jax.attention.blockwise import Keys
from lminf_jax.positional import Positional
from lminf_jax.sharding import head_spec


def sequence_parallel_band(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                           pe: Positional, chunk: int, key_block: int, band: Band) -> jnp.ndarray:
  """Like `sink_and_band` (output only), with T split over the mesh's `sequence` axis."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = dict(mesh.shape)["sequence"]
  t = q_btnh.shape[1]
  if t % shards:
    raise ValueError(f"length {t} is not a multiple of the sequence mesh axis ({shards})")
  qkv_spec = head_spec(k_btkh.shape, mesh, sequence=True)
  pos_spec = PartitionSpec(*qkv_spec[:2])
  n_start, window = band.n_start, band.window
  t_shard = t // shards
  hops = min(shards - 1, -(-(window - 1) // t_shard))

  def local(q_btnh, k_btkh, v_btkh, pos_bt):
    shard = jax.lax.axis_index("sequence")
    first_b = jax.lax.psum(jnp.sum(pos_bt < 0, axis=1, dtype=jnp.int32), "sequence")  # left padding
    idx_bt = shard * t_shard + jnp.arange(t_shard, dtype=jnp.int32)[None] - first_b[:, None]
    k_bkth, v_bkth = jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2)

    # Context: the keys of the `hops` previous shards, oldest first. Shards before the first
    # receive zeros; their idx (computed here, not received) is negative, so they are masked.
    def from_previous(x, r):
      return jax.lax.ppermute(x, "sequence", [(i, i + r) for i in range(shards - r)])

    received = [[from_previous(x, r) for x in (k_bkth, v_bkth, pos_bt)] for r in range(hops, 0, -1)]
    ctx_idx = idx_bt[:, :1] - hops * t_shard + jnp.arange(hops * t_shard, dtype=jnp.int32)[None]
    keys = Keys(jnp.concatenate([r[0] for r in received] + [k_bkth], axis=2),
                jnp.concatenate([r[1] for r in received] + [v_bkth], axis=2),
                jnp.concatenate([r[2] for r in received] + [pos_bt], axis=1),
                jnp.concatenate([ctx_idx, idx_bt], axis=1))

    # Starting keys: global indices first + g; each shard contributes those it holds.
    g = jnp.arange(n_start, dtype=jnp.int32)
    global_bg = first_b[:, None] + g[None]
    local_bg = global_bg - shard * t_shard
    held_bg = (local_bg >= 0) & (local_bg < t_shard)
    at_bg = jnp.clip(local_bg, 0, t_shard - 1)

    def gather(x, axis):
      index = at_bg[:, None, :, None] if axis == 2 else at_bg
      held = held_bg[:, None, :, None] if axis == 2 else held_bg
      return jax.lax.psum(jnp.where(held, jnp.take_along_axis(x, index, axis=axis), 0), "sequence")

    starts = Keys(gather(k_bkth, 2), gather(v_bkth, 2), gather(pos_bt, 1),
                  jnp.where(global_bg < t, jnp.broadcast_to(g, global_bg.shape), -1))
    return band_attention(q_btnh, pos_bt, idx_bt, keys, starts, pe, chunk, key_block, window,
                          band.rotation)[0]

  return jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, pos_spec), out_specs=qkv_spec)(
      q_btnh, k_btkh, v_btkh, positions_bt)
