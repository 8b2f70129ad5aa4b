"""Every attention method the tests know, as one table: a new method is covered by adding a row.

A `MethodCase` names a spec made from `Sizes` (each test picks the sizes: drawn by hypothesis,
or fixed), its reference (the method and kwargs of the numpy reference: `naive_attention`'s
dense / lambda / streaming, `naive_infllm`, or test_own_method's `naive_dilated`) and the paths it
runs (`Path`); tests/methods/test_contract.py runs every row through the paths it supports.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np
from naive_attention import naive_attention
from naive_infllm import naive_infllm
from test_own_method import Dilated, naive_dilated

from lminf_jax.attention import DCA, AttentionMethod, Dense, InfLLM, Lambda, SelfExtend, SlidingWindow, Streaming


class Sizes(NamedTuple):
  """A case's lengths: starting tokens, window, query chunk, key block."""

  n_start: int
  window: int
  chunk: int
  key_block: int


class Path:
  """What a case runs beyond the one-shot forward against its reference."""

  MASKED = "masked"  # its reference is naive_attention's mask and distances: gradients, ALiBi, soft-cap
  CACHED = "cached"  # through a cache in chunks of any length (its result does not depend on them)
  DECODE = "decode"  # one token at a time through a cache equals the one-shot forward
  KERNELS = "kernels"  # its band through the flash kernels (kernel_attend; xla_attend its XLA path)
  SPLASH = "splash"  # through splash only (kernel_attend; xla_attend its XLA path): no cuDNN path
  OWN_CHUNKS = "own_chunks"  # through a cache only in its own query chunks (retrieval per chunk)


INFLLM_BLOCKS = dict(block_size=4, repr_tokens=2, top_k=2)  # (InfLLM's lengths besides Sizes)


@dataclasses.dataclass(frozen=True)
class MethodCase:
  name: str
  make: Callable[[Sizes], AttentionMethod]
  naive: Callable[[Sizes], tuple[str, dict]]  # (reference method, its kwargs)
  paths: frozenset[str]

  def spec(self, n_start: int, window: int, chunk: int = 512, key_block: int = 512) -> AttentionMethod:
    return self.make(Sizes(n_start, window, chunk, key_block))

  def supports(self, path: str) -> bool:
    return path in self.paths

  def __repr__(self) -> str:  # (pytest ids)
    return self.name


def reference(method: str, params: dict, q_tnh: np.ndarray, k_tkh: np.ndarray, v_tkh: np.ndarray,
              positions_t: np.ndarray, inv_freq_h: np.ndarray, **extra) -> np.ndarray:
  """The reference output [T, N, H] (float64) of one row: `naive_attention`, or infllm's and
  dilated's own (infllm's at positions 0..T-1; RoPE sees only distances, so any unpadded row)."""
  if method == "infllm":
    return naive_infllm(q_tnh, k_tkh, v_tkh, inv_freq_h, **params)[0]
  if method == "dilated":
    return naive_dilated(q_tnh, k_tkh, v_tkh, positions_t, inv_freq_h, **params)
  return naive_attention(q_tnh, k_tkh, v_tkh, positions_t, inv_freq_h, method, **extra, **params)[0]


def _dca_sizes(z: Sizes) -> dict:
  """DCA's chunk_size and local_window from a case's window and starting tokens."""
  chunk_size = max(z.window, 2)
  return dict(chunk_size=chunk_size, local_window=min(z.n_start, chunk_size - 1))


M, C, D, K, S, O = Path.MASKED, Path.CACHED, Path.DECODE, Path.KERNELS, Path.SPLASH, Path.OWN_CHUNKS
CASES: tuple[MethodCase, ...] = (
    MethodCase("dense", lambda z: Dense(chunk=z.chunk, key_block=z.key_block), lambda z: ("dense", {}),
               frozenset({M, C, D, K})),
    MethodCase("lambda", lambda z: Lambda(n_global=z.n_start, n_local=z.window, limit=z.window, chunk=z.chunk,
                                          key_block=z.key_block),
               lambda z: ("lambda", dict(n_global=z.n_start, n_local=z.window, limit=z.window)),
               frozenset({M, C, D, K})),
    MethodCase("lambda_limit", lambda z: Lambda(n_global=z.n_start, n_local=z.window, limit=z.window + 7,
                                                chunk=z.chunk, key_block=z.key_block),
               lambda z: ("lambda", dict(n_global=z.n_start, n_local=z.window, limit=z.window + 7)),
               frozenset({M, K})),
    MethodCase("lambda_no_mask", lambda z: Lambda(n_global=z.n_start, n_local=z.window, mask=False, chunk=z.chunk,
                                                  key_block=z.key_block),
               lambda z: ("lambda", dict(n_global=z.n_start, n_local=z.window, mask=False)), frozenset({M})),
    MethodCase("lambda_no_limit", lambda z: Lambda(n_global=z.n_start, n_local=z.window, distance_limit=False,
                                                   chunk=z.chunk, key_block=z.key_block),
               lambda z: ("lambda", dict(n_global=z.n_start, n_local=z.window, use_limit=False)),
               frozenset({M, C, K})),
    MethodCase("streaming", lambda z: Streaming(n_sink=z.n_start, n_recent=z.window, chunk=z.chunk,
                                                key_block=z.key_block),
               lambda z: ("streaming", dict(n_sink=z.n_start, n_recent=z.window)), frozenset({M, C, D, K})),
    MethodCase("sliding_window", lambda z: SlidingWindow(window=z.window, chunk=z.chunk, key_block=z.key_block),
               lambda z: ("lambda", dict(n_global=0, n_local=z.window)), frozenset({M, K})),
    MethodCase("infllm", lambda z: InfLLM(n_init=z.n_start, n_local=z.window, chunk=z.chunk, key_block=z.key_block,
                                          **INFLLM_BLOCKS),
               lambda z: ("infllm", dict(n_init=z.n_start, n_local=z.window, chunk=z.chunk, **INFLLM_BLOCKS)),
               frozenset({O})),
    MethodCase("infllm_offload", lambda z: InfLLM(n_init=z.n_start, n_local=z.window, chunk=z.chunk,
                                                  key_block=z.key_block, offload=True, device_blocks=2,
                                                  **INFLLM_BLOCKS),  # (as many device blocks as top_k)
               lambda z: ("infllm", dict(n_init=z.n_start, n_local=z.window, chunk=z.chunk, **INFLLM_BLOCKS)),
               frozenset({O})),
    # (released_prefill takes chunks of at most n_local; its cached paths: tests/test_infllm.py, as the
    # families' tests feed longer chunks)
    MethodCase("infllm_released",
               lambda z: InfLLM(n_init=z.n_start, n_local=z.window, chunk=min(z.chunk, z.window), key_block=z.key_block,
                                released_prefill=True, **INFLLM_BLOCKS),
               lambda z: ("infllm", dict(n_init=z.n_start, n_local=z.window, chunk=min(z.chunk, z.window),
                                         released_prefill=True, **INFLLM_BLOCKS)),
               frozenset()),
    MethodCase("selfextend", lambda z: SelfExtend(group_size=z.n_start % 5 + 1, window_size=z.window, chunk=z.chunk,
                                                  key_block=z.key_block),
               lambda z: ("selfextend", dict(group_size=z.n_start % 5 + 1, window_size=z.window)),
               frozenset({M, C, D, K})),
    MethodCase("selfextend_logscale", lambda z: SelfExtend(group_size=z.n_start % 5 + 1, window_size=z.window,
                                                           scale_base=z.window // 2 + 2, chunk=z.chunk,
                                                           key_block=z.key_block),
               lambda z: ("selfextend", dict(group_size=z.n_start % 5 + 1, window_size=z.window,
                                             scale_base=z.window // 2 + 2)), frozenset({C, K})),  # (decode: chunks of 1)
    MethodCase("dca", lambda z: DCA(**_dca_sizes(z), chunk=z.chunk, key_block=z.key_block),
               lambda z: ("dca", _dca_sizes(z)), frozenset({M, C, D, S})),
    MethodCase("dca_mscale", lambda z: DCA(**_dca_sizes(z), mscale=True, trained_length=z.window // 2 + 1,
                                           chunk=z.chunk, key_block=z.key_block),
               lambda z: ("dca", dict(_dca_sizes(z), mscale_length=z.window // 2 + 1)), frozenset({C, D, S})),
    MethodCase("dilated", lambda z: Dilated(stride=z.n_start % 3 + 2, window=z.window),  # (the README's own method)
               lambda z: ("dilated", dict(stride=z.n_start % 3 + 2, window=z.window)), frozenset({C, D})),
)
BY_NAME = {case.name: case for case in CASES}


def model_spec(case: MethodCase, chunk: int) -> AttentionMethod:
  """The case on a tiny model, fed `chunk` tokens at a time: windows of 20 and 3 starting tokens,
  far shorter than the tests' 90 tokens."""
  return case.make(Sizes(3, 20, chunk, 8))


def with_path(*paths: str) -> list[MethodCase]:
  """The cases that run every one of `paths`."""
  return [case for case in CASES if all(case.supports(p) for p in paths)]
