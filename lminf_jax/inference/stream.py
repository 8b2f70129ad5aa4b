"""Streaming ("infinite") perplexity: a token stream fed chunk by chunk through the fixed-size
cache, NLL of every token given everything before it (docs/evaluation.md#streaming-perplexity)."""

from __future__ import annotations

import functools
import resource
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.cache import Cache, check_room
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.llama import Llama


def document_stream(ids: np.ndarray, total: int, bos_id: int | None, chunk: int) -> Iterator[np.ndarray]:
  """Chunks of `total` tokens: the text, then again and again as new documents (BOS first)."""
  period = np.concatenate([[bos_id], ids]) if bos_id is not None else ids
  for start in range(0, total, chunk):
    index = np.arange(start, min(start + chunk, total))
    yield np.where(index < len(ids), ids[np.minimum(index, len(ids) - 1)], period[(index - len(ids)) % len(period)])


@functools.partial(jax.jit, static_argnames=("config", "attention"), donate_argnames=("cache",))
def stream_step(params: dict, config: LlamaConfig, cache: Cache, prev_logits_bv: jnp.ndarray, tokens_bc: jnp.ndarray,
                positions_bc: jnp.ndarray, attention) -> tuple[jnp.ndarray, jnp.ndarray, Cache]:
  """One chunk: NLL [B, C] of each token (the first scored with the previous chunk's last
  logits), the chunk's last logits [B, V] and the updated cache."""
  logits_bcv, cache = Llama(config).apply({"params": params}, tokens_bc, positions_bc, attention, cache)
  predicting_bcv = jnp.concatenate([prev_logits_bv[:, None], logits_bcv[:, :-1]], axis=1)
  picked_bc = jnp.take_along_axis(predicting_bcv, tokens_bc[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(predicting_bcv, axis=-1) - picked_bc, logits_bcv[:, -1], cache


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream_nll(params, config, cache: Cache, chunks: Iterator[np.ndarray], total: int, attention, segment: int,
               on_segment=None, progress=None) -> np.ndarray:
  """NLL of streamed tokens 1..total-1 (float32). After every `segment` tokens (and at the end),
  `on_segment(index, mean NLL of the segment, tokens/s, peak RSS MiB)`."""
  attention = config.resolve_attention(attention)
  check_room(cache, attention, total)
  prev = jnp.zeros((1, config.vocab_size), jnp.float32)
  nll: list[np.ndarray] = []
  seen, reported, last_time, last_seen = 0, 0, time.perf_counter(), 0
  for tokens in chunks:
    positions = np.arange(seen, seen + len(tokens), dtype=np.int32)
    chunk_nll, prev, cache = stream_step(params, config, cache, prev, jnp.asarray(tokens, jnp.int32)[None],
                                         jnp.asarray(positions)[None], attention)
    nll.append(np.asarray(chunk_nll)[0, 1 if seen == 0 else 0:])
    seen += len(tokens)
    if progress is not None:
      progress.update(len(tokens))
    while on_segment is not None and reported * segment < seen and ((reported + 1) * segment <= seen or seen == total):
      done = np.concatenate(nll)  # done[i] scores stream token i + 1
      now = time.perf_counter()
      segment_nll = done[max(0, reported * segment - 1):min(seen, (reported + 1) * segment) - 1]
      on_segment(reported, float(segment_nll.mean()), (seen - last_seen) / (now - last_time), peak_rss_mib())
      reported, last_time, last_seen = reported + 1, now, seen
  return np.concatenate(nll)
