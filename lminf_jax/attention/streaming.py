"""StreamingLLM (Xiao et al., 2024), the `Streaming` method: n_sink attention sinks + the n_recent
latest keys, with positions inside the cache."""

from __future__ import annotations

import dataclasses

from lminf_jax.attention.band_method import BandMethod
from lminf_jax.attention.banded import Band, InCache
from lminf_jax.attention.method import option


@dataclasses.dataclass(frozen=True)
class Streaming(BandMethod):
  """StreamingLLM: n_sink attention sinks + the n_recent latest keys, positions inside the cache
  (a query at min(i, n_sink + n_recent - 1), a sink at its index)."""

  n_sink: int = option(4, "attention sinks: the first tokens, kept", minimum=0)
  n_recent: int | None = option(None, "recent window (default: the training length - n_sink)", minimum=1,
                                model_default=True)

  def resolve(self, max_position_embeddings: int, sliding_window: int | None = None) -> Streaming:
    return dataclasses.replace(self, n_recent=self.n_recent or max(1, max_position_embeddings - self.n_sink))

  def band(self) -> Band:
    return Band(self.n_sink, self.n_recent, InCache(self.n_sink + self.n_recent - 1))
