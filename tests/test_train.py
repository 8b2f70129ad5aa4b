"""Fine-tuning: gradients against PyTorch autograd and against a naive dense-masked JAX model,
optimizer masking, rematerialisation, exact resume, and the `lminf finetune` command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers import run_cli, tiny_hf_model
from methods.cases import BY_NAME, Sizes
from naive_attention import _mask_and_distance, _params

from lminf_jax.attention import Dense, Lambda, Streaming, resolve
from lminf_jax.convert.hf import assemble_params
from lminf_jax.loading import load
from lminf_jax.models.llama import Llama
from lminf_jax.train import TrainSettings, finetune, make_train_step, optimizer, trainable_paths
from lminf_jax.train.data import TokenWindows
from lminf_jax.train.step import init_state, sequence_loss


def _tokens(b: int, t: int, seed: int = 0) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, 97, size=(b, t)), jnp.int32)


def _loss_grads(config, params, tokens, spec, remat=False):
  model = Llama(config, remat=remat)
  spec = resolve(spec, config.max_position_embeddings)
  return jax.jit(jax.value_and_grad(lambda p: sequence_loss(model, p, tokens, spec, logits_chunk=8)))(params)


def _assert_grads_close(got: dict, expected: dict, rtol: float) -> None:
  flat_got, flat_expected = traverse_util.flatten_dict(got), traverse_util.flatten_dict(expected)
  assert flat_got.keys() == flat_expected.keys()
  for path, g in flat_got.items():
    e = np.asarray(flat_expected[path], np.float64)
    error = np.linalg.norm(np.asarray(g, np.float64) - e) / np.linalg.norm(e)
    assert error < rtol, f"{'/'.join(path)}: relative error {error:.2e}"


# --- gradient parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2_bias", "llama_headdim_untied"])
def test_dense_gradients_match_pytorch_autograd(tmp_path, kind):
  import torch

  model = tiny_hf_model(kind)
  model.save_pretrained(tmp_path / "hf")
  config, params, _ = load(tmp_path / "hf")
  tokens = _tokens(2, 40)
  labels = torch.as_tensor(np.array(tokens), dtype=torch.long)
  torch_loss = model(labels, labels=labels).loss  # mean cross-entropy of tokens 1.. given the prefix
  torch_loss.backward()
  torch_grads = assemble_params(config, ((name, p.grad.double().numpy()) for name, p in model.named_parameters()))
  loss, grads = _loss_grads(config, params, tokens, Dense(chunk=16, key_block=16))
  np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=1e-5)
  _assert_grads_close(grads, torch_grads, rtol=1e-4)


def _rope(x, offset, inv_freq):
  """Half-split RoPE of x [..., H] by offset [...]: the reference's own, not the library's."""
  angle = offset[..., None] * inv_freq
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * jnp.cos(angle) - x2 * jnp.sin(angle), x2 * jnp.cos(angle) + x1 * jnp.sin(angle)], -1)


def _reference_loss(params, config, tokens_bt, allowed_tt, dist_tt):
  """Mean next-token NLL of a Llama whose every layer attends with a dense [T, T] boolean mask,
  key j seen by query i at RoPE distance dist[i, j]. Tied embeddings, no biases."""
  h, g = config.head_dim, config.num_heads // config.num_kv_heads
  inv_freq = 1.0 / config.rope_theta ** (jnp.arange(0, h, 2) / h)

  def norm(x, scale):
    return scale * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + config.rms_norm_eps)

  x = params["embed_vd"][tokens_bt]
  for layer in range(config.num_layers):
    p = jax.tree.map(lambda w: w[layer], params["layers"])
    y = norm(x, p["attn_norm"]["scale_d"])
    q = jnp.einsum("btd,dnh->btnh", y, p["attn"]["wq_dnh"])
    k = jnp.repeat(jnp.einsum("btd,dkh->btkh", y, p["attn"]["wk_dkh"]), g, axis=2)
    v = jnp.repeat(jnp.einsum("btd,dkh->btkh", y, p["attn"]["wv_dkh"]), g, axis=2)
    k_rot = _rope(k[:, None], -dist_tt[None, :, :, None], inv_freq)  # [B, Tq, Tk, N, H]: key j for query i
    logits = jnp.einsum("binh,bijnh->bnij", q, k_rot) / jnp.sqrt(h)
    probs = jax.nn.softmax(jnp.where(allowed_tt, logits, -jnp.inf), axis=-1)
    x = x + jnp.einsum("bnij,bjnh,nhd->bid", probs, v, p["attn"]["wo_nhd"])
    y = norm(x, p["mlp_norm"]["scale_d"])
    x = x + (jax.nn.silu(y @ p["mlp"]["w_gate_df"]) * (y @ p["mlp"]["w_up_df"])) @ p["mlp"]["w_down_fd"]
  logits = norm(x, params["final_norm"]["scale_d"]) @ params["embed_vd"].T
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1).mean()


# (the rows of tests/methods/cases.py whose reference is a mask and distances, at sizes of their own)
BANDED = [("lambda_limit", Sizes(3, 7, 8, 4)), ("lambda_no_limit", Sizes(2, 5, 4, 8)), ("streaming", Sizes(2, 9, 8, 4))]


@pytest.mark.parametrize("name, sizes", BANDED, ids=[name for name, _ in BANDED])
def test_banded_gradients_match_a_dense_masked_reference(tiny_model, name, sizes):
  config, params, _ = tiny_model
  spec, (method, naive) = BY_NAME[name].make(sizes), BY_NAME[name].naive(sizes)
  tokens = _tokens(2, 30, seed=1)
  t = tokens.shape[1]
  dummy = np.zeros((t, config.num_heads, config.head_dim))
  allowed, dist = _mask_and_distance(dummy, dummy[:, : config.num_kv_heads], None, np.arange(t), method,
                                     _params(method, naive))
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(_reference_loss), static_argnums=1)(
      params, config, tokens, jnp.asarray(allowed[0]), jnp.asarray(dist))
  loss, grads = _loss_grads(config, params, tokens, spec)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _assert_grads_close(grads, ref_grads, rtol=1e-4)


def test_reference_model_equals_the_library_forward_under_dense(tiny_model):
  """The dense-masked reference is the model: with the causal mask it gives the library's dense loss."""
  config, params, _ = tiny_model
  tokens = _tokens(1, 20, seed=2)
  t = tokens.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  ref = _reference_loss(params, config, tokens, jnp.asarray(j <= i), jnp.asarray(i - j, jnp.float32))
  loss, _ = _loss_grads(config, params, tokens, Dense())
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)


def test_remat_gives_the_same_gradients_with_less_memory(tiny_model):
  config, params, _ = tiny_model
  spec = Lambda(n_global=4, n_local=64, chunk=64, key_block=64)
  tokens = _tokens(2, 512, seed=3)
  plain, remat = (_loss_grads(config, params, tokens, spec, remat=r) for r in (False, True))
  _assert_grads_close(remat[1], plain[1], rtol=1e-6)
  temp = {}
  for r in (False, True):
    model = Llama(config, remat=r)
    fn = jax.jit(jax.grad(lambda p: sequence_loss(model, p, tokens, resolve(spec, 256), logits_chunk=64)))
    temp[r] = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp[True] < 0.7 * temp[False], temp


# --- the training step ----------------------------------------------------------------------------


def _step(config, params, settings, spec=Dense(chunk=16, key_block=16)):
  trainable = trainable_paths(params, settings.train)
  tx = optimizer(settings, params, trainable)
  return make_train_step(config, settings, tx, trainable, spec), init_state(params, tx, settings.seed)


def _copy(params):
  return jax.tree.map(jnp.array, params)


def test_accumulation_equals_one_big_batch(tiny_model):
  """The averaged microbatch gradient (Adam's first moment after one step) equals the big batch's.
  The first AdamW update itself is about lr * sign(g): its near-zero gradients flip sign with the
  summation order, which differs between CPUs (1.45e-4 on an AMD EPYC), hence its looser check."""
  from optax import tree_utils

  config, params, _ = tiny_model
  tokens = _tokens(4, 24, seed=4)
  results = []
  for batch, accum in ((4, 1), (2, 2), (1, 4)):
    settings = TrainSettings(seq_len=24, steps=5, lr=1e-2, batch=batch, accum=accum)
    step, state = _step(config, _copy(params), settings)
    state, metrics = step(state, tokens.reshape(accum, batch, 24))
    update = jax.tree.map(jnp.subtract, state.params, params)
    moment = tree_utils.tree_get(state.opt_state, "mu")
    results.append((moment, update, float(metrics["loss"]), float(metrics["grad_norm"])))
  for moment, update, loss, norm in results[1:]:
    np.testing.assert_allclose([loss, norm], results[0][2:], rtol=1e-6)
    _assert_grads_close(moment, results[0][0], rtol=1e-5)
    _assert_grads_close(update, results[0][1], rtol=1e-3)


def test_clipping_bounds_the_first_update(tiny_model):
  """Adam's first update is lr * sign-like g/|g|; clipping must not change it but the norm metric
  must be the unclipped global norm of the gradient."""
  config, params, _ = tiny_model
  tokens = _tokens(1, 24, seed=5)
  settings = TrainSettings(seq_len=24, steps=5, lr=1e-2, warmup_steps=0, clip_norm=1e-3)
  step, state = _step(config, _copy(params), settings)
  _, metrics = step(state, tokens[None])
  _, grads = _loss_grads(config, params, tokens, Dense(chunk=16, key_block=16))
  expected = np.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-5)


def test_frozen_params_do_not_change_and_have_no_optimizer_state(tiny_model):
  config, params, _ = tiny_model
  settings = TrainSettings(seq_len=24, steps=3, lr=1e-2, train="attn/")
  step, state = _step(config, _copy(params), settings)
  for s in range(3):
    state, _ = step(state, _tokens(1, 24, seed=s)[None])
  before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(state.params)
  trainable = {p for p in before if "attn" in p}
  assert trainable == {("layers", "attn", n) for n in ("wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd")}
  for path in before:
    same = np.array_equal(np.asarray(before[path]), np.asarray(after[path]))
    assert same != (path in trainable), path
  # Optimizer state: Adam's two moments of the trainable params and scalars, nothing of the rest.
  state_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  moment_paths = [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))[1:] for path, x in state_leaves
                  if x.ndim]  # [1:]: the multi_transform label
  assert sorted(moment_paths) == sorted(list(trainable) * 2)


def test_bf16_compute_keeps_float32_master_params(tiny_model):
  config, params, _ = tiny_model
  tokens = _tokens(1, 24, seed=6)[None]
  losses = {}
  for bf16 in (False, True):
    settings = TrainSettings(seq_len=24, steps=2, lr=1e-3, bf16=bf16)
    step, state = _step(config, _copy(params), settings)
    state, metrics = step(state, tokens)
    losses[bf16] = float(metrics["loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert losses[True] != losses[False]
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-2)


# --- runs, checkpoints, resume --------------------------------------------------------------------


REPEATING = np.tile(np.random.default_rng(7).integers(0, 97, size=23), 40)


def test_loss_falls_on_a_repeating_text(tiny_model, tmp_path):
  config, params, _ = tiny_model
  settings = TrainSettings(seq_len=32, steps=30, lr=3e-3, batch=2)
  history = finetune(config, _copy(params), REPEATING, settings, tmp_path / "run",
                     Lambda(n_global=2, n_local=8, chunk=8, key_block=8))
  losses = [r["loss"] for r in history]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


def test_token_windows_cover_every_window_once_per_epoch():
  ids = np.arange(50 * 8)
  windows = TokenWindows(ids, 8)
  key = jax.random.PRNGKey(3)
  epoch = windows.batch(key, 0, (5, 10)).reshape(50, 8)
  np.testing.assert_array_equal(np.sort(epoch[:, 0]), np.arange(50) * 8)
  assert not np.array_equal(epoch[:, 0], np.arange(50) * 8)  # shuffled
  next_epoch = windows.batch(key, 50, (1, 50))[0]
  assert not np.array_equal(next_epoch, epoch)
  np.testing.assert_array_equal(windows.batch(key, 47, (1, 6))[0], np.concatenate([epoch[47:], next_epoch[:3]]))


class _Interrupt(Exception):
  pass


def _stop_at(step: int):
  def on_step(record):
    if record["step"] == step:
      raise _Interrupt

  return on_step


RESUME = dict(seq_len=16, steps=6, lr=1e-2, batch=2, accum=2, train="attn|mlp/")


def test_resume_is_bit_exact(tiny_model, tmp_path):
  config, params, _ = tiny_model
  settings = TrainSettings(**RESUME)
  spec = Streaming(n_sink=2, n_recent=6, chunk=8, key_block=8)
  straight = finetune(config, _copy(params), REPEATING, settings, tmp_path / "straight", spec)
  with pytest.raises(_Interrupt):  # killed during step 5, after the checkpoint of step 3
    finetune(config, _copy(params), REPEATING, settings, tmp_path / "resumed", spec, save_every=3,
             on_step=_stop_at(5))
  assert not (tmp_path / "resumed" / "final").exists()
  resumed = finetune(config, _copy(params), REPEATING, settings, tmp_path / "resumed", spec, resume=True,
                     save_every=3)
  assert [r["step"] for r in resumed] == list(range(1, 7))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # bit for bit
  for name in ("straight", "resumed"):
    assert json.loads((tmp_path / name / "log.json").read_text())["history"][-1]["step"] == 6
  a, b = (load(tmp_path / name / "final")[1] for name in ("straight", "resumed"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_HANG_IN_SECOND_SAVE = """
import json, sys, time
import numpy as np
from orbax.checkpoint._src.handlers import json_checkpoint_handler

original, calls = json_checkpoint_handler.JsonCheckpointHandler._save_fn, []

def hang_in_second_save(self, *args, **kwargs):  # the meta write of step 6 never finishes
  calls.append(1)
  if len(calls) == 2:
    time.sleep(600)
  return original(self, *args, **kwargs)

json_checkpoint_handler.JsonCheckpointHandler._save_fn = hang_in_second_save
from lminf_jax.loading import load
from lminf_jax.train import TrainSettings, finetune
config, params, _ = load(sys.argv[1])
finetune(config, params, np.load(sys.argv[2]), TrainSettings(**json.loads(sys.argv[3])), sys.argv[4], save_every=3)
"""


def test_a_save_killed_midway_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
  import subprocess
  import sys
  import time

  config, params, ckpt = tiny_model
  settings = TrainSettings(**RESUME)
  straight = finetune(config, _copy(params), REPEATING, settings, tmp_path / "straight")
  np.save(tmp_path / "tokens.npy", REPEATING)
  run = tmp_path / "run" / "checkpoints"
  child = subprocess.Popen([sys.executable, "-c", _HANG_IN_SECOND_SAVE, str(ckpt), str(tmp_path / "tokens.npy"),
                            json.dumps(RESUME), str(tmp_path / "run")])
  try:
    deadline = time.time() + 300
    while not list(run.glob("6.orbax-checkpoint-tmp*")) and child.poll() is None:
      assert time.time() < deadline, "the second save never started"
      time.sleep(0.2)
    time.sleep(2)  # step 6 is being saved, and its meta never will be
  finally:
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
  assert sorted(p.name for p in run.iterdir() if p.name.isdigit()) == ["3"]
  resumed = finetune(config, _copy(params), REPEATING, settings, tmp_path / "run", resume=True, save_every=3)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  assert sorted(p.name for p in run.iterdir()) == ["3", "6"]  # the half-written step is gone


def test_resume_refuses_other_settings(tiny_model, tmp_path):
  from lminf_jax.errors import UserError

  config, params, _ = tiny_model
  finetune(config, _copy(params), REPEATING, TrainSettings(**dict(RESUME, steps=2)), tmp_path / "run")
  with pytest.raises(UserError, match="lr"):
    finetune(config, _copy(params), REPEATING, TrainSettings(**dict(RESUME, steps=2, lr=1.0)), tmp_path / "run",
             resume=True)
  with pytest.raises(UserError, match="already holds training checkpoints"):
    finetune(config, _copy(params), REPEATING, TrainSettings(**dict(RESUME, steps=2)), tmp_path / "run")


# --- command line ---------------------------------------------------------------------------------


@pytest.fixture
def tokens_file(tmp_path):
  path = tmp_path / "tokens.npy"
  np.save(path, REPEATING.astype(np.int32))
  return path


def test_cli_finetune_writes_a_checkpoint_every_command_loads(tiny_model, tokens_file, tmp_path, capsys):
  _, _, ckpt = tiny_model
  out = tmp_path / "ft"
  code, stdout, err = run_cli(capsys, "finetune", ckpt, "--tokens-file", tokens_file, "--seq-len", 32, "--steps", 4,
                              "--lr", 1e-2, "--batch", 2, "--accum", 2, "--train", "attn/", "--attention", "lambda",
                              "--n-global", 2, "--n-local", 8, "--chunk", 8, "--key-block", 8, "--out", out,
                              "--save-every", 2, "--keep", 1)
  assert code == 0, err
  log = json.loads((out / "log.json").read_text())
  assert [r["step"] for r in log["history"]] == [1, 2, 3, 4]
  assert log["settings"]["train"] == "attn/" and "Lambda" in log["settings"]["attention"]
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
  assert "tokens/s" in stdout
  code, stdout, err = run_cli(capsys, "nll", out / "final", "--tokens-file", tokens_file, "--max-tokens", 64,
                              "--out", tmp_path / "nll.npy")
  assert code == 0, err


@pytest.mark.parametrize("args, message", [
    (("--seq-len", 1), "--seq-len: must be >= 2"),
    (("--seq-len", 2000), "fewer than one sequence of seq-len 2000"),
    (("--seq-len", 16, "--train", "nothing_named_so"), "matches no param"),
    (("--seq-len", 16, "--train", "(("), "is not a regex"),
    (("--seq-len", 16, "--resume"), "--resume: no training checkpoint"),
])
def test_cli_finetune_bad_input(tiny_model, tokens_file, tmp_path, capsys, args, message):
  _, _, ckpt = tiny_model
  out = tmp_path / "ft"
  code, _, err = run_cli(capsys, "finetune", ckpt, "--tokens-file", tokens_file, "--steps", 2, "--lr", 1e-3,
                         "--out", out, *args)
  assert code != 0
  lines = err.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], err
  assert not (out / "final").exists() and not (out / "checkpoints").exists()
