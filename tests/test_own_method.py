"""A fifth attention method defined here, outside lminf_jax, through every path of the library.

`Dilated` (every stride-th key of the last `window`) is checked against its own numpy reference
one-shot, then cached in chunks, token by token, in `stream_nll`, through `generate`, in a
fine-tuning step and from the CLI (`--attention test_own_method:Dilated --attn-opt ...`). The
docs/writing-a-method.md's example, run as written from its own file, gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import feed_cached, run_cli
from naive_attention import default_inv_freq, rope

from lminf_jax.attention import AttentionMethod, CacheLayout, Keys, option
from lminf_jax.attention import blockwise as bw
from lminf_jax.cache import init_cache
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import cached_token_nll, forward, token_nll
from lminf_jax.inference.generation import Sampling, decode, generate, left_pad, prefill
from lminf_jax.positional import Rotary
from lminf_jax.inference.stream import stream_nll

METHOD_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-method.md"


@dataclasses.dataclass(frozen=True)
class Dilated(AttentionMethod):
  """Query i sees keys j with 0 <= i - j < window and (i - j) % stride == 0."""

  stride: int = option(2, "distance between the keys a query sees", minimum=1)
  window: int = option(64, "how far back a query sees", minimum=1)

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    idx_bt = bw.sequence_index(positions_bt)
    keys = Keys(jnp.swapaxes(k_btkh, 1, 2), jnp.swapaxes(v_btkh, 1, 2), positions_bt, idx_bt)
    return self.over(q_btnh, positions_bt, idx_bt, keys, pe)

  def cache_layout(self, max_len):
    return CacheLayout(slots=0, ring=self.window)

  def capacity(self, ring_len, extra):
    return None

  def attend_chunk(self, q_bcnh, new, cached, pe, layer):
    return self.over(q_bcnh, new.pos_bl, new.idx_bl, cached.ordered_ring().concat(new), pe), None

  def over(self, q_btnh, pos_bt, idx_bt, keys, pe):
    ref_b1 = pos_bt[:, -1:]
    q_tile = bw.query_tile(q_btnh, pos_bt - ref_b1, pe, keys.k_bklh.shape[1])
    k_tile = bw.key_tile(keys.k_bklh, keys.pos_bl - ref_b1, pe)
    dist_bts = idx_bt[:, :, None] - keys.idx_bl[:, None, :]
    mask_bts = bw.visible(idx_bt, keys.idx_bl, self.window) & (dist_bts % self.stride == 0)
    state = bw.update(bw.init_state(q_tile.x), bw.scores(q_tile, k_tile, pe), keys.v_bklh, mask_bts)
    return bw.finish(state, q_btnh.shape[1], q_btnh.dtype)[0]


@dataclasses.dataclass(frozen=True)
class OneShotOnly(AttentionMethod):
  """Dilated's one-shot attention alone: no cached attention."""

  stride: int = option(2, "distance between the keys a query sees", minimum=1)

  def attend(self, q_btnh, k_btkh, v_btkh, positions_bt, pe, layer):
    return Dilated(self.stride, 10**6).attend(q_btnh, k_btkh, v_btkh, positions_bt, pe, layer)


def naive_dilated(q_tnh, k_tkh, v_tkh, positions_t, inv_freq_h, stride, window):
  """float64: query i over keys j with 0 <= i-j < window, (i-j) % stride == 0 (tokens with a
  negative position are left padding: they see nothing and output 0)."""
  t, n, h = q_tnh.shape
  group = n // k_tkh.shape[1]
  real = np.flatnonzero(positions_t >= 0)
  out = np.zeros((t, n, h))
  for a, i in enumerate(real):
    js = np.asarray([j for b, j in enumerate(real[:a + 1]) if a - b < window and (a - b) % stride == 0])
    for head in range(n):
      q = rope(q_tnh[i, head], positions_t[i], inv_freq_h)
      k = rope(k_tkh[js, head // group], positions_t[js], inv_freq_h)
      logits = k @ q / np.sqrt(h)
      p = np.exp(logits - logits.max())
      out[i, head] = (p / p.sum()) @ v_tkh[js, head // group]
  return out


@pytest.mark.parametrize("stride, window, pad", [(2, 7, 0), (3, 100, 4), (1, 5, 2), (4, 13, 0)])
def test_one_shot_equals_the_naive_reference(stride, window, pad):
  rng = np.random.default_rng(stride * 100 + window)
  t, n, kv, h = 23, 4, 2, 16
  q, k, v = rng.normal(size=(t, n, h)), rng.normal(size=(t, kv, h)), rng.normal(size=(t, kv, h))
  positions = np.concatenate([np.full(pad, -1), 1000 + np.arange(t - pad)])
  inv_freq = default_inv_freq(h)
  expected = naive_dilated(q, k, v, positions, inv_freq, stride, window)
  ours = Dilated(stride, window).attend(*(jnp.asarray(x[None], jnp.float32) for x in (q, k, v)),
                                        jnp.asarray(positions[None], jnp.int32), Rotary(jnp.asarray(inv_freq, jnp.float32)),
                                        0)
  np.testing.assert_allclose(np.asarray(ours[0]), expected, atol=2e-5)


TOKENS = jax.random.randint(jax.random.PRNGKey(3), (2, 40), 0, 97)
SPEC = Dilated(stride=3, window=11)


def test_cached_in_chunks_and_token_by_token_equal_one_shot(tiny_model):
  config, params, _ = tiny_model
  positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
  expected = np.asarray(forward(params, config, TOKENS, positions, attention=SPEC))
  for chunks in ([40], [5] * 8, [7, 1, 1, 13, 1, 17], [1] * 40):
    np.testing.assert_allclose(feed_cached(params, config, SPEC, TOKENS, positions, chunks), expected, atol=1e-4)
  one_shot = np.asarray(token_nll(params, config, TOKENS, attention=SPEC))
  np.testing.assert_allclose(np.asarray(cached_token_nll(params, config, TOKENS, attention=SPEC, chunk=6)), one_shot,
                             atol=1e-4)
  streamed = stream_nll(params, config, init_cache(config, SPEC, 1), iter(np.split(np.asarray(TOKENS[0]), [9, 10, 30])), 40,
                        SPEC, 40)
  np.testing.assert_allclose(streamed, one_shot[0], atol=1e-4)


def test_generate_equals_greedy_one_shot_and_decode_continues(tiny_model):
  config, params, _ = tiny_model
  prompts = [[5, 17, 33, 8, 64, 12, 9, 40, 2, 71, 19, 3], [40, 2, 71, 19]]
  generated = generate(params, config, prompts, 12, attention=SPEC, eos_ids=(), chunk=5)
  for prompt, row in zip(prompts, generated):
    tokens = list(prompt)
    for _ in range(12):  # greedy, each token from a one-shot forward of everything before it
      tokens.append(int(np.argmax(np.asarray(forward(params, config, jnp.asarray([tokens]), attention=SPEC))[0, -1])))
    assert row == tokens[len(prompt):]
  # decode returns its cache: 5 tokens, then 7 more, give the 12 of one call.
  tokens, positions = (jnp.asarray(x) for x in left_pad(prompts, 4))
  logits, cache = prefill(params, config, init_cache(config, SPEC, 2), tokens, positions, SPEC, 4)
  first = decode(params, config, cache, logits, jnp.asarray([12, 4]), jax.random.PRNGKey(0), SPEC, Sampling(), 5, ())
  rest = decode(params, config, first.cache, first.logits_bv, first.next_pos_b, jax.random.PRNGKey(0), SPEC,
                Sampling(), 7, ())
  assert np.concatenate([first.tokens_bn, rest.tokens_bn], axis=1).tolist() == generated


def test_a_finetuning_step_descends_the_methods_loss(tiny_model):
  """The gradient through the method's attention is the gradient of its loss: one small SGD
  step along it lowers the loss by about lr * |grad|^2."""
  config, params, _ = tiny_model

  def loss(p):
    return token_nll(p, config, TOKENS, attention=SPEC).mean()

  value, grad = jax.value_and_grad(loss)(params)
  norm2 = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grad))
  lr = 1e-3 / norm2 ** 0.5
  stepped = jax.tree.map(lambda p, g: p - lr * g, params, grad)
  assert float(value - loss(stepped)) == pytest.approx(lr * norm2, rel=0.05)


def test_one_shot_only_method_runs_one_shot_and_refuses_caches(tiny_model):
  config, params, _ = tiny_model
  np.testing.assert_allclose(np.asarray(token_nll(params, config, TOKENS, attention=OneShotOnly(3))),
                             np.asarray(token_nll(params, config, TOKENS, attention=Dilated(3, 10**6))), atol=1e-6)
  with pytest.raises(UserError, match="OneShotOnly has no cached attention .*cache_layout and attend_chunk"):
    generate(params, config, [[1, 2, 3]], 2, attention=OneShotOnly())
  layout = {"cache_layout": lambda self, max_len: CacheLayout(slots=0, ring=8)}
  half = dataclasses.dataclass(frozen=True)(type("HalfCached", (OneShotOnly,), layout))
  with pytest.raises(UserError, match="HalfCached defines cache_layout but not attend_chunk"):
    generate(params, config, [[1, 2, 3]], 2, attention=half())
  with pytest.raises(TypeError, match="abstract"):  # attend is required
    dataclasses.dataclass(frozen=True)(type("NoAttend", (AttentionMethod,), {}))()


def _write_tokens(tmp_path):
  path = tmp_path / "t.npy"
  np.save(path, np.asarray(TOKENS[0]))
  return path


def test_cli_runs_the_method_from_its_module(tiny_model, tmp_path, capsys):
  config, params, ckpt = tiny_model
  tokens = _write_tokens(tmp_path)
  expected = np.asarray(token_nll(params, config, TOKENS[:1], attention=SPEC))[0]
  for cached in ((), ("--cached", "--prefill-chunk", "7")):
    out = tmp_path / f"nll{len(cached)}.npy"
    code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", tokens, "--out", out, "--attention",
                           "test_own_method:Dilated", "--attn-opt", "stride=3", "--attn-opt", "window=11", *cached)
    assert code == 0, err
    np.testing.assert_allclose(np.load(out), expected, atol=1e-4)
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", tokens, "--out", tmp_path / "x.npy", "--attention",
                         "test_own_method:OneShotOnly", "--cached")
  assert code == 1 and err.count("\n") == 1 and "OneShotOnly has no cached attention" in err


def test_cli_finetunes_under_the_method(tiny_model, tmp_path, capsys):
  """The first step's logged loss is the method's mean NLL of the one training sequence."""
  config, params, ckpt = tiny_model
  code, _, err = run_cli(capsys, "finetune", ckpt, "--tokens-file", _write_tokens(tmp_path), "--seq-len", "40",
                         "--steps", "2", "--lr", "1e-3", "--out", tmp_path / "run", "--attention",
                         "test_own_method:Dilated", "--attn-opt", "stride=3", "--attn-opt", "window=11")
  assert code == 0, err
  history = json.loads((tmp_path / "run" / "log.json").read_text())["history"]
  expected = float(np.asarray(token_nll(params, config, TOKENS[:1], attention=SPEC)).mean())
  assert history[0]["loss"] == pytest.approx(expected, abs=1e-5) and history[1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("argv, message", [
    (("--attn-opt", "strid=3"), "Dilated has no option 'strid' (options: stride, window)"),
    (("--attn-opt", "stride=three"), "Dilated.stride takes int, got 'three'"),
    (("--attn-opt", "stride=0"), "Dilated.stride must be in [1, 2147483647], got 0"),
    (("--attn-opt", "stride"), "give NAME=VALUE"),
], ids=["unknown name", "not an int", "below the minimum", "no value"])
def test_cli_bad_method_option_is_one_line(tiny_model, tmp_path, capsys, argv, message):
  _, _, ckpt = tiny_model
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", _write_tokens(tmp_path), "--out", tmp_path / "x.npy",
                         "--attention", "test_own_method:Dilated", *argv)
  assert code == 1 and err.count("\n") == 1 and err.startswith("lminf: error:") and message in err, err
  assert not list(tmp_path.glob("x.npy*"))


@pytest.mark.parametrize("name, message", [
    ("no_such_module:Dilated", "cannot import attention method module 'no_such_module'"),
    ("test_own_method:naive_dilated", "test_own_method:naive_dilated is not an attention method"),
    ("sparse", "unknown attention method 'sparse'"),
])
def test_cli_bad_method_name_is_one_line(tiny_model, tmp_path, capsys, name, message):
  _, _, ckpt = tiny_model
  code, _, err = run_cli(capsys, "nll", ckpt, "--tokens-file", _write_tokens(tmp_path), "--out", tmp_path / "x.npy",
                         "--attention", name)
  assert code == 1 and err.count("\n") == 1 and message in err, err


def test_readme_example_runs_as_written(tiny_model, tmp_path):
  """The guide's method (docs/writing-a-method.md), saved as the file it names, run by the guide's
  command from that directory in a fresh process, gives this file's (reference-checked) numbers."""
  config, params, ckpt = tiny_model
  section = METHOD_GUIDE.read_text().split("\n## A complete example", 1)[1].split("\n## ", 1)[0]
  (filename, code), = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", section, re.S)
  command, = re.findall(r"^lminf nll .*$", section, re.M)
  lines = code.splitlines()
  assert 40 <= len(lines) <= 60, len(lines)
  (tmp_path / filename).write_text(code)
  tokens = _write_tokens(tmp_path)
  argv = command.replace("CKPT", str(ckpt)).replace("--text-file notes.txt", f"--tokens-file {tokens}").split()
  lminf = Path(sys.executable).parent / "lminf"  # (the console script: no current directory on sys.path)
  result = subprocess.run([str(lminf), *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  options = dict(re.findall(r"--attn-opt (\w+)=(\d+)", command))
  spec = Dilated(**{k: int(v) for k, v in options.items()})
  expected = np.asarray(token_nll(params, config, TOKENS[:1], attention=spec))[0]
  out = tmp_path / re.search(r"--out (\S+)", command).group(1)
  np.testing.assert_allclose(np.load(out), expected, atol=1e-4)
