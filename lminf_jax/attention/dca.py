"""Dual Chunk Attention (An et al., 2024), the `DCA` method: keys at their position within a chunk,
queries placed by the chunk of the key, one softmax (docs/semantics.md#dca).

c = chunk_size - local_window. Key j sits at j mod c. Query i in chunk a = i // c, key in chunk
b = j // c (RoPE positions): b = a (intra-chunk) at i mod c; b = a - 1 (successive chunk) at
min(i mod c + c, chunk_size); b < a - 1 (inter-chunk) at min(2c - 1, chunk_size), as ChunkLlama's
chunkllama_attn_replace.py builds its q, qc and k tables (lines 44-52) and picks them (lines 163-185).

`mscale` is off by default, as in the paper's results: ChunkLlama multiplies its RoPE tables by
0.05 ln(T / L) + 1 past the training length L (lines 16-19, 41-42, 62-75), with T the length of
the call that (re)built them, so its one-shot and token-by-token results differ. With `mscale`
on, a query or key at position p is multiplied by that factor for T = p + 1, which is what
ChunkLlama's token-by-token path computes, and the same in every path here.

One-shot attention runs through XLA (RemappedMethod's scan) or Pallas splash (dca_splash.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from lminf_jax.attention.dca_splash import dca_splash
from lminf_jax.attention.kernels import Splash, flash_kernel, flash_or_xla
from lminf_jax.attention.method import option
from lminf_jax.attention.remapped import RemappedMethod
from lminf_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Intra:
  """Keys of the query's own chunk: both at their position within it (causal)."""

  chunk: int

  def selects(self, pos_bc, idx_bc, pos_bs, idx_bs):
    return pos_bc[:, :, None] // self.chunk == pos_bs[:, None, :] // self.chunk

  def query_offsets(self, pos_bc, ref_b1):
    return pos_bc % self.chunk

  def key_offsets(self, pos_bs, ref_b1):
    return pos_bs % self.chunk


@dataclasses.dataclass(frozen=True)
class Successive(Intra):
  """Keys of the chunk before the query's: the query at min(i mod c + c, chunk_size)."""

  chunk_size: int

  def selects(self, pos_bc, idx_bc, pos_bs, idx_bs):
    return pos_bc[:, :, None] // self.chunk - 1 == pos_bs[:, None, :] // self.chunk

  def query_offsets(self, pos_bc, ref_b1):
    return jnp.minimum(pos_bc % self.chunk + self.chunk, self.chunk_size)


@dataclasses.dataclass(frozen=True)
class Inter(Intra):
  """Keys of any earlier chunk: the query at min(2c - 1, chunk_size)."""

  chunk_size: int

  def selects(self, pos_bc, idx_bc, pos_bs, idx_bs):
    return pos_bc[:, :, None] // self.chunk - 1 > pos_bs[:, None, :] // self.chunk

  def query_offsets(self, pos_bc, ref_b1):
    return jnp.full_like(pos_bc, min(2 * self.chunk - 1, self.chunk_size))


def chunkllama_mscale(pos_bl: jnp.ndarray, trained: int) -> jnp.ndarray:
  """0.05 ln((p + 1) / L) + 1 past the training length L, else 1 (ChunkLlama's get_mscale)."""
  ratio = (pos_bl.astype(jnp.float32) + 1) / trained
  return jnp.where(ratio > 1, 0.05 * jnp.log(jnp.maximum(ratio, 1.0)) + 1, 1.0)


@dataclasses.dataclass(frozen=True)
class DCA(RemappedMethod):
  """Dual Chunk Attention: keys at j mod (chunk_size - local_window), queries by the key's chunk
  (intra, successive, inter), one softmax. Its cache keeps every key."""

  chunk_size: int | None = option(None, "DCA's chunk: query positions never exceed it (default: 3/4 of the "
                                  "training length)", minimum=1, model_default=True)
  local_window: int | None = option(None, "keys sit at j mod (chunk_size - local_window) (default: 1/8 of the "
                                    "training length)", minimum=0, model_default=True)
  mscale: bool = option(False, "ChunkLlama's 0.05 ln(T/L) + 1 scaling of queries and keys past the training length")
  trained_length: int | None = option(None, "the length L mscale is relative to (default: the model's training "
                                      "length)", minimum=1, model_default=True)

  def __post_init__(self):
    super().__post_init__()
    if self.chunk_size is not None and self.local_window is not None and self.local_window >= self.chunk_size:
      raise UserError(f"DCA.local_window ({self.local_window}) must be less than chunk_size ({self.chunk_size})")
    if self.kernel == "cudnn":
      raise UserError("dca has no cudnn path (its placements are no band): use --kernel auto, xla or splash")

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> DCA:
    chunk_size = self.chunk_size or max(2, max_position_embeddings * 3 // 4)
    if self.local_window is not None:
      local_window = self.local_window
    else:  # (1/8 of the training length, or 1/6 of a chunk_size given alone: the same ratio)
      local_window = max_position_embeddings // 8 if self.chunk_size is None else chunk_size // 6
    return dataclasses.replace(self, chunk_size=chunk_size, local_window=local_window,
                               trained_length=self.trained_length or max_position_embeddings)

  def placements(self):
    c = self.chunk_size - self.local_window
    return Intra(c), Successive(c, self.chunk_size), Inter(c, self.chunk_size)

  def scale(self):
    return functools.partial(chunkllama_mscale, trained=self.trained_length) if self.mscale else None

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    return flash_or_xla(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, kinds=(Splash,))[0]

  def prefill_one_shot(self, dtype) -> bool:
    return isinstance(flash_kernel(self.kernel, dtype), Splash)

  def xla_attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]) through XLA: the kernel path's reference and gradient."""
    return self.one_shot(q_btnh, k_btkh, v_btkh, positions_bt, pe)

  def kernel_attend(self, kernel: Splash, q_btnh, k_btkh, v_btkh, positions_bt, pe) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [B,T,N,H], lse [B,T,N]): each placement through splash (dca_splash.py)."""
    xla_inter = functools.partial(self.one_shot, pe=pe, placements=self.placements()[2:])
    return dca_splash(kernel, self.placements(), q_btnh, k_btkh, v_btkh, positions_bt, pe, self.scale(), xla_inter)


__all__ = ["DCA", "Inter", "Intra", "Successive", "chunkllama_mscale"]
