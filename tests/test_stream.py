"""Streaming perplexity equals the one-shot NLL of the same token stream."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lminf_jax.attention import Dense, Lambda, Streaming, resolve
from lminf_jax.cache import init_cache
from lminf_jax.inference.forward import token_nll
from lminf_jax.inference.stream import document_stream, stream_nll


def test_document_stream_repeats_the_text_with_bos():
  ids = np.array([7, 8, 9])
  stream = np.concatenate(list(document_stream(ids, 11, 1, 4)))
  np.testing.assert_array_equal(stream, [7, 8, 9, 1, 7, 8, 9, 1, 7, 8, 9])
  assert [len(c) for c in document_stream(ids, 11, 1, 4)] == [4, 4, 3]


@pytest.fixture(scope="module")
def model(tiny_model):
  return tiny_model[:2]


@pytest.mark.parametrize("spec", [Lambda(n_global=3, n_local=20, chunk=7, key_block=8),
                                  Streaming(n_sink=2, n_recent=15, chunk=7, key_block=8), Dense(chunk=7)])
def test_stream_nll_equals_one_shot_nll(model, spec):
  config, params = model
  spec = resolve(spec, config.max_position_embeddings)
  ids = np.random.default_rng(0).integers(3, 97, size=40)
  total = 100  # 2.5 documents
  stream = np.concatenate(list(document_stream(ids, total, 1, 100)))
  expected = np.asarray(token_nll(params, config, jnp.asarray(stream)[None], attention=spec))[0]
  segments = []
  got = stream_nll(params, config, init_cache(config, spec, 1, max_len=total), document_stream(ids, total, 1, 7),
                   total, spec, segment=30, on_segment=lambda i, mean, rate, rss: segments.append((i, mean)))
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert [i for i, _ in segments] == [0, 1, 2, 3]
  np.testing.assert_allclose([m for _, m in segments],
                             [expected[0:29].mean(), expected[29:59].mean(), expected[59:89].mean(),
                              expected[89:].mean()], atol=1e-5)
