"""The flash-kernel path (lminf_jax.attention.kernels) against the XLA path and the naive reference
(every band method's: tests/methods/test_contract.py).

Splash runs in interpret mode on the CPU; the cudnn path's masks and merge run through the same
`jax.nn.dot_product_attention` call with implementation="xla" (cuDNN itself needs a GPU)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli
from naive_attention import default_inv_freq, naive_attention
from naive_infllm import naive_infllm

from lminf_jax.attention import DCA, Dense, InfLLM, Lambda, Rotary, SelfExtend, Streaming, attend, resolve
from lminf_jax.attention.infllm import infllm_attention
from lminf_jax.attention.kernels import DotProductAttention, Segments, Splash, flash_band
from lminf_jax.errors import UserError
from lminf_jax.cache import init_cache
from lminf_jax.inference.forward import token_nll
from lminf_jax.inference.generation import _feed, generate, left_pad, prefill

KERNELS = {"splash": Splash(interpret=True), "dpa_xla": DotProductAttention("xla")}
def _rows(seed: int, t: int, n: int, kv: int, h: int, pads: list[int], offset: int):
  """A batch of left-padded rows: q [B,T,N,H], k/v [B,T,K,H], positions [B,T] (padding -1)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((len(pads), t, n, h)).astype(np.float32)
  k, v = (rng.standard_normal((len(pads), t, kv, h)).astype(np.float32) for _ in range(2))
  positions = np.stack([np.where(np.arange(t) >= p, np.arange(t) - p + offset, -1) for p in pads])
  return q, k, v, positions


def _naive_rows(q, k, v, positions, inv_freq, method, params):
  """The naive reference per row on its real tokens; 0 for padding."""
  out = np.zeros(q.shape)
  for row, pos in enumerate(positions):
    real = pos >= 0
    out[row, real] = naive_attention(q[row, real], k[row, real], v[row, real], pos[real], inv_freq, method,
                                     **params)[0]
  return out


@pytest.mark.parametrize("n_local", [40, 300])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_infllm_local_branch_through_the_kernel(kernel, n_local):
  """InfLLM with its local band from the kernel, merged with the far branch (init keys, selected
  blocks, pending keys): equal to its XLA path (left padding, offset 10^8) and, on an unpadded
  row at offset 0, to the naive reference; n_local below and above T."""
  spec = resolve(InfLLM(n_init=8, n_local=n_local, block_size=16, repr_tokens=2, top_k=3, chunk=32), 1)
  inv_freq = default_inv_freq(16)
  for pads, offset in (([0, 37], 10**8), ([0], 0)):
    q, k, v, positions = _rows(11, 200, 4, 2, 16, pads=pads, offset=offset)
    args = [jnp.asarray(a) for a in (q, k, v, positions)] + [Rotary(jnp.asarray(inv_freq, jnp.float32))]
    ours = np.asarray(infllm_attention(*args, spec, KERNELS[kernel]))
    np.testing.assert_allclose(ours, np.asarray(infllm_attention(*args, spec)), atol=1e-5)
  expected, _ = naive_infllm(q[0], k[0], v[0], inv_freq, 8, n_local, 16, 2, 3, 32)
  np.testing.assert_allclose(ours[0], expected, atol=1e-5)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_segments_cover_a_long_row(kernel):
  """A row longer than one call's span: overlapping calls, each rotated from its own reference."""
  window, t = 100, 700
  plan = Segments.plan(t, window, span=512)
  assert len(plan.begin) == 2 and plan.length - plan.step >= window - 1
  q, k, v, positions = _rows(3, t, 3, 1, 16, pads=[0, 130], offset=10**8)
  inv_freq = default_inv_freq(16)
  o, _ = flash_band(*(jnp.asarray(a) for a in (q, k, v, positions)), Rotary(jnp.asarray(inv_freq, jnp.float32)), window,
                    KERNELS[kernel], span=512)
  expected = _naive_rows(q, k, v, positions, inv_freq, "lambda", dict(n_global=0, n_local=window))
  np.testing.assert_allclose(np.asarray(o), expected, atol=1e-5)


def test_segment_plan():
  """Calls of at most `span` tokens that together give every token's output once, each with its band's context."""
  for t, window, span in [(700, 100, 512), (5000, 129, 1024), (100_000, 8192, 2**16), (300, 2**30, 2**16)]:
    plan = Segments.plan(t, window, span)
    assert plan.length % 128 == 0 and (plan.length <= span or len(plan.begin) == 1)
    slots = plan.output_slots()
    token = plan.gather_columns().reshape(-1)[slots.reshape(-1)]
    np.testing.assert_array_equal(token[:t], np.arange(t))
    offsets = slots % plan.length
    assert len(plan.begin) == 1 or np.all(offsets[1:] >= window - 1)  # (the first call starts at token 0)


@pytest.mark.parametrize("spec", [Lambda(n_global=4, n_local=40), InfLLM(n_init=4, n_local=40, block_size=8, chunk=32),
                                  DCA(chunk_size=40, local_window=8)], ids=["lambda", "infllm", "dca"])
def test_gradient_is_the_xla_paths(spec):
  spec = resolve(dataclasses.replace(spec, kernel="splash"), max_position_embeddings=1)
  q, k, v, positions = _rows(5, 130, 4, 2, 16, pads=[0, 9], offset=0)
  inv_freq = Rotary(jnp.asarray(default_inv_freq(16), jnp.float32))
  weights = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)

  def grads(spec):
    f = lambda q, k, v: jnp.sum(attend(q, k, v, jnp.asarray(positions), inv_freq, spec) * weights)  # noqa: E731
    return jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(a) for a in (q, k, v)))

  for ours, xla in zip(grads(spec), grads(dataclasses.replace(spec, kernel="xla"))):
    assert np.abs(np.asarray(xla)).max() > 0
    np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)


def test_model_token_nll_with_splash_equals_xla(tiny_model):
  config, params, _ = tiny_model
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 150))
  for spec in (Lambda(n_global=4, n_local=32, chunk=64), Streaming(n_sink=2, n_recent=40), Dense(),
               InfLLM(n_init=4, n_local=32, block_size=8, top_k=2, chunk=32)):
    xla = token_nll(params, config, tokens, attention=dataclasses.replace(spec, kernel="xla"))
    splash = token_nll(params, config, tokens, attention=dataclasses.replace(spec, kernel="splash"))
    np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), atol=1e-4)


@pytest.mark.parametrize("spec", [Lambda(n_global=4, n_local=32), Streaming(n_sink=2, n_recent=40), Dense(),
                                  SelfExtend(group_size=3, window_size=20), DCA(chunk_size=40, local_window=8)],
                         ids=["lambda", "streaming", "dense", "selfextend", "dca"])
def test_prefill_through_the_kernel_equals_chunked_xla(tiny_model, spec):
  """With a kernel, a prompt enters an empty cache one-shot: the logits and the cache equal
  XLA's chunked prefill, and generation goes on the same."""
  config, params, _ = tiny_model
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, config.vocab_size, 150).tolist(), rng.integers(0, config.vocab_size, 97).tolist()]
  tokens, positions = (jnp.asarray(x) for x in left_pad(prompts, 32))
  results = {}
  for kernel in ("xla", "splash"):
    method = dataclasses.replace(spec, kernel=kernel)
    cache = init_cache(config, method, 2, max_len=tokens.shape[1] + 8)
    assert _feed(cache, resolve(method, 256), config, 32, tokens.shape[1]) == ((tokens.shape[1], True)
                                                                                if kernel == "splash" else (32, False))
    results[kernel] = prefill(params, config, cache, tokens, positions, method, 32)
  (logits_xla, cache_xla), (logits_splash, cache_splash) = results["xla"], results["splash"]
  np.testing.assert_allclose(np.asarray(logits_splash), np.asarray(logits_xla), atol=1e-4)
  for got, want in zip(jax.tree.leaves(cache_splash), jax.tree.leaves(cache_xla)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert (generate(params, config, prompts, 6, dataclasses.replace(spec, kernel="splash"))
          == generate(params, config, prompts, 6, dataclasses.replace(spec, kernel="xla"), chunk=32))


def test_cli_kernel_flag(tiny_model, capsys, tmp_path):
  """`lminf nll --kernel splash` writes the per-token NLL of --kernel xla."""
  config, _, ckpt = tiny_model
  np.save(tmp_path / "tokens.npy", np.random.default_rng(2).integers(0, config.vocab_size, 140))
  for kernel in ("xla", "splash"):
    code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "lambda",
                           "--n-local", "32", "--n-global", "4", "--kernel", kernel, "--out", tmp_path / f"{kernel}.npy")
    assert code == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "splash.npy"), np.load(tmp_path / "xla.npy"), atol=1e-4)


def test_kernel_refusals():
  with pytest.raises(UserError, match="kernel must be one of"):
    Lambda(kernel="flash")
  spec = resolve(Dense(kernel="cudnn"), max_position_embeddings=1)
  q, k, v, positions = _rows(0, 8, 2, 1, 8, pads=[0], offset=0)
  with pytest.raises(UserError, match="cudnn kernel needs a GPU"):
    attend(*(jnp.asarray(a) for a in (q, k, v, positions)), Rotary(jnp.asarray(default_inv_freq(8), jnp.float32)), spec)


def test_cudnn_behind_a_version_check_falls_back_to_xla(monkeypatch):
  """jax's private cuDNN attention is used only on the jax releases it was checked against and
  where it imports: elsewhere kernel=auto takes XLA with a one-line warning, and kernel=cudnn is
  a one-line error."""
  import sys
  import warnings

  from lminf_jax.attention import kernels

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert kernels.private_cudnn_attention() is not None  # (this jax: checked, and it imports)
  assert kernels.flash_kernel("auto", jnp.bfloat16) == DotProductAttention("cudnn")
  assert kernels.flash_kernel("cudnn", jnp.float16) == DotProductAttention("cudnn")
  for patch in (lambda m: m.setattr(jax, "__version_info__", (0, 4, 35)),  # (an unchecked release)
                lambda m: m.setitem(sys.modules, "jax._src.cudnn.fused_attention_stablehlo", None)):  # (no module)
    with monkeypatch.context() as m:
      patch(m)
      assert kernels.private_cudnn_attention() is None
      with pytest.warns(UserWarning, match="cuDNN attention .* kernel auto takes the XLA path") as record:
        assert kernels.flash_kernel("auto", jnp.bfloat16) is None
      assert len(record) == 1 and "\n" not in str(record[0].message)
      with pytest.raises(UserError, match="private cuDNN attention .*use --kernel auto or xla") as error:
        kernels.flash_kernel("cudnn", jnp.bfloat16)
      assert "\n" not in str(error.value)
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.flash_kernel("auto", jnp.float32) is None  # (float32 on a GPU: XLA anyway, no warning)


def test_dca_through_splash_with_skipping_positions_equals_xla():
  """DCA's chunks are of positions: rows whose positions skip (spanning more chunks than their
  tokens could) equal the XLA path too (the inter-chunk call falls back to XLA; the others do not)."""
  rng = np.random.default_rng(3)
  t, n, kv, h = 120, 4, 2, 8
  spec = resolve(DCA(chunk_size=20, local_window=3), max_position_embeddings=1)
  positions = np.stack([np.sort(rng.choice(400, t, replace=False)),
                        np.r_[np.full(30, -1), np.sort(rng.choice(1000, t - 30, replace=False)) + 77]])
  q = rng.standard_normal((2, t, n, h)).astype(np.float32)
  k, v = (rng.standard_normal((2, t, kv, h)).astype(np.float32) for _ in range(2))
  args = [jnp.asarray(a) for a in (q, k, v, positions)] + [Rotary(jnp.asarray(default_inv_freq(h), jnp.float32))]
  (o_kernel, lse_kernel), (o_xla, lse_xla) = spec.kernel_attend(KERNELS["splash"], *args), spec.xla_attend(*args)
  real = positions >= 0
  np.testing.assert_allclose(np.asarray(o_kernel), np.asarray(o_xla), atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse_kernel)[real], np.asarray(lse_xla)[real], atol=1e-5)
