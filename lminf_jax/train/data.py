"""Training sequences: a token stream cut into non-overlapping windows, shuffled per epoch.

The order is a pure function of (PRNG key, position), where position counts the sequences
consumed so far, so a run resumed from (key, position) sees exactly the batches it would have.
"""

from __future__ import annotations

import jax
import numpy as np

from lminf_jax.errors import UserError


class TokenWindows:
  """`ids` [N] cut into N // seq_len windows of seq_len tokens (the tail is dropped)."""

  def __init__(self, ids: np.ndarray, seq_len: int):
    self.count = len(ids) // seq_len
    if self.count == 0:
      raise UserError(f"the text has {len(ids)} tokens, fewer than one sequence of seq-len {seq_len}")
    self.windows = np.asarray(ids[: self.count * seq_len], np.int32).reshape(self.count, seq_len)
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, key: jax.Array, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), self.count))}
    return self._orders[epoch]

  def batch(self, key: jax.Array, position: int, shape: tuple[int, int]) -> np.ndarray:
    """Tokens [A, B, seq_len] of the sequences at `position`, `position` + 1, ... (A*B of them)."""
    rows = [self.windows[self._order(key, i // self.count)[i % self.count]]
            for i in range(position, position + shape[0] * shape[1])]
    return np.stack(rows).reshape(shape + (self.windows.shape[1],))
