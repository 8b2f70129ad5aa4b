"""On 8 virtual CPU devices: sharded forward equals one device; params really sharded; sequence-
parallel lambda attention moves keys with collective-permutes, never an all-gather of K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model

from lminf_jax.attention import Dense, Lambda, Rotary, Streaming, attend, resolve
from lminf_jax.inference.forward import token_nll
from lminf_jax.loading import convert_checkpoint, load
from lminf_jax.sharding import data_sharding, make_mesh, parse_mesh

MESHES = ["sequence=8", "fsdp=2,tensor=2,sequence=2",  # (in CI; the others with LMINF_SLOW=1)
          pytest.param("data=2,sequence=4", marks=pytest.mark.slow), pytest.param("fsdp=8", marks=pytest.mark.slow)]
T = 128  # 16 tokens per shard at sequence=8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")
  return convert_checkpoint(root / "hf", root / "ckpt")


@pytest.fixture(scope="module")
def batch():
  """Two rows; row 0 left-padded by 20 tokens (more than one shard at sequence=8)."""
  tokens = np.random.default_rng(0).integers(0, 97, size=(2, T))
  positions = np.broadcast_to(np.arange(T), (2, T)).copy()
  positions[0] = np.arange(T) - 20
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)


SPECS = {
    "lambda_window_past_shard": Lambda(n_global=4, n_local=40, chunk=8, key_block=8),
    "lambda_window_in_shard": Lambda(n_global=4, n_local=10, chunk=8, key_block=8),
    "streaming": Streaming(n_sink=4, n_recent=24, chunk=8, key_block=8),
    "dense": Dense(chunk=16, key_block=16),
}


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("mesh_text", MESHES)
def test_sharded_nll_equals_single_device(ckpt, batch, mesh_text, spec_name):
  tokens, positions = batch
  spec = SPECS[spec_name]
  config, params, _ = load(ckpt)
  expected = np.asarray(token_nll(params, config, tokens, positions, attention=spec))
  mesh = make_mesh(parse_mesh(mesh_text))
  _, sharded_params, _ = load(ckpt, mesh=mesh)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, data_sharding(mesh, x.shape)) for x in (tokens, positions)]
    got = np.asarray(token_nll(sharded_params, config, *placed, attention=spec))
  valid = np.asarray(positions)[:, 1:] > 0
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5)


@pytest.mark.parametrize("kind", ["mpt", "gemma3_text"])
@pytest.mark.parametrize("mesh_text", ["sequence=8", "data=2,sequence=4"])
def test_alibi_and_per_layer_models_sharded_equal_single_device(tmp_path_factory, batch, mesh_text, kind):
  """ALiBi (MPT) and per-layer windows with their own RoPE (Gemma 3) under sequence parallelism."""
  root = tmp_path_factory.mktemp(kind)
  tiny_hf_model(kind).save_pretrained(root / "hf")
  spec = SPECS["lambda_window_past_shard"]
  tokens, positions = batch
  config, params, _ = load(root / "hf")
  expected = np.asarray(token_nll(params, config, tokens, positions, attention=spec))
  mesh = make_mesh(parse_mesh(mesh_text))
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, data_sharding(mesh, x.shape)) for x in (tokens, positions)]
    got = np.asarray(token_nll(params, config, *placed, attention=spec))
  valid = np.asarray(positions)[:, 1:] > 0
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5)


def test_longrope_switch_ignores_sequence_padding(tmp_path_factory):
  """28 tokens of a longrope model trained to 30 positions, on sequence=8: padded to 32 tokens
  across the shards, it still uses its short factors, as on one device (and as transformers)."""
  root = tmp_path_factory.mktemp("longrope")
  tiny_hf_model("phi3_longrope", original_max_position_embeddings=30).save_pretrained(root / "hf")
  config, params, _ = load(root / "hf")
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, size=(1, 28)), jnp.int32)
  expected = np.asarray(token_nll(params, config, tokens, attention=Dense(chunk=8, key_block=8)))
  mesh = make_mesh(parse_mesh("sequence=8"))
  with jax.set_mesh(mesh):
    got = np.asarray(token_nll(params, config, jax.device_put(tokens, data_sharding(mesh, tokens.shape)),
                               attention=Dense(chunk=8, key_block=8)))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_params_are_really_sharded(ckpt):
  """Weights are split over every axis that divides them, the sequence axis included (embed over
  fsdp and sequence, heads / mlp over tensor, vocab over tensor and sequence)."""
  fsdp_seq = ("fsdp", "sequence")
  mesh = make_mesh({"fsdp": 2, "tensor": 2, "sequence": 2})
  config, params, _ = load(ckpt, mesh=mesh)
  wq = params["layers"]["attn"]["wq_dnh"]  # [L, D, N, H] = [2, 64, 8, 8]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, fsdp_seq, "tensor", None)
  assert wq.addressable_shards[0].data.nbytes == wq.nbytes // 8
  w_down = params["layers"]["mlp"]["w_down_fd"]  # [L, F, D]: mlp over tensor, embed over fsdp and sequence
  assert w_down.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", fsdp_seq)
  assert w_down.addressable_shards[0].data.nbytes == w_down.nbytes // 8
  embed = params["embed_vd"]  # vocab 97 is divisible by neither tensor nor sequence: replicated over them
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, fsdp_seq)
  _, params, _ = load(ckpt, mesh=make_mesh({"sequence": 8}))  # sequence parallelism divides the weights too
  leaves = jax.tree.leaves(params)
  assert sum(x.addressable_shards[0].data.nbytes for x in leaves) * 8 == sum(x.nbytes for x in leaves)


def _attention_hlo(spec, mesh) -> str:
  """Compiled HLO of attention over inputs split along the sequence, as the model feeds it."""
  t, n, kv, h = 1024, 4, 2, 16
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
  q = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32, sharding=split)
  k = jax.ShapeDtypeStruct((1, t, kv, h), jnp.float32, sharding=split)
  pos = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=split)
  inv_freq = Rotary(jnp.ones((h // 2,), jnp.float32))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, pos: attend(q, k, v, pos, inv_freq, resolve(spec, 1)))
    return fn.lower(q, k, k, pos).compile().as_text()


def test_sequence_parallel_lambda_hlo_has_permutes_and_no_all_gather():
  mesh = make_mesh({"sequence": 8})
  hlo = _attention_hlo(Lambda(n_global=4, n_local=200, chunk=64, key_block=64), mesh)
  assert "collective-permute" in hlo
  assert "all-gather" not in hlo
  with pytest.warns(UserWarning, match="all-gathers"):
    dense_hlo = _attention_hlo(Dense(chunk=64), mesh)
  assert "all-gather" in dense_hlo  # the baseline's fallback, for contrast


def test_cli_nll_with_mesh_equals_one_device(ckpt, tmp_path, capsys):
  from helpers import run_cli

  np.save(tmp_path / "tokens.npy", np.random.default_rng(1).integers(0, 97, size=100))
  common = ("nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "lambda", "--n-local", "24",
            "--n-global", "4", "--chunk", "8", "--key-block", "8")
  assert run_cli(capsys, *common, "--out", tmp_path / "one.npy")[0] == 0
  code, _, err = run_cli(capsys, *common, "--out", tmp_path / "mesh.npy", "--mesh", "data=2,sequence=-1")
  assert code == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)
  code, _, err = run_cli(capsys, *common, "--out", tmp_path / "bad.npy", "--mesh", "data=3")
  assert code == 1 and "needs 3 devices" in err


@pytest.mark.parametrize("mesh_text", [pytest.param("data=8", marks=pytest.mark.slow), "data=2,fsdp=2,tensor=2",
                                       pytest.param("data=4,sequence=2", marks=pytest.mark.slow)])  # (CI: one)
def test_data_parallel_train_step_equals_single_device(ckpt, mesh_text):
  from flax import traverse_util

  from lminf_jax.train import TrainSettings, make_train_step, optimizer, trainable_paths
  from lminf_jax.train.step import init_state

  settings = TrainSettings(seq_len=32, steps=4, lr=1e-2, batch=8, accum=2, train="attn/|mlp/")
  spec = Lambda(n_global=2, n_local=12, chunk=8, key_block=8)
  tokens = np.random.default_rng(1).integers(0, 97, size=(2, 8, 32)).astype(np.int32)

  def run(params, mesh=None):
    trainable = trainable_paths(params, settings.train)
    tx = optimizer(settings, params, trainable)
    step = make_train_step(config, settings, tx, trainable, spec)
    state = init_state(params, tx, 0)
    placed = tokens if mesh is None else jax.device_put(
        tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"), "sequence")))
    state, metrics = step(state, placed)
    state, metrics = step(state, placed)
    return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}, state

  config, params, _ = load(ckpt)
  flat_start = traverse_util.flatten_dict(jax.device_get(params))
  expected_params, expected, _ = run(params)  # (donates params)
  mesh = make_mesh(parse_mesh(mesh_text))
  _, sharded_params, _ = load(ckpt, mesh=mesh)
  with jax.set_mesh(mesh):
    got_params, got, state = run(sharded_params, mesh)
  for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(sharded_params)):  # params stay sharded
    assert new.sharding.is_equivalent_to(old.sharding, new.ndim)
  np.testing.assert_allclose([got["loss"], got["grad_norm"]], [expected["loss"], expected["grad_norm"]], rtol=1e-5)
  flat_got, flat_expected = traverse_util.flatten_dict(got_params), traverse_util.flatten_dict(expected_params)
  for path, x in flat_expected.items():  # Adam's step: relative error of the update (tiny gradients' signs may flip)
    expected_update, got_update = x - flat_start[path], flat_got[path] - flat_start[path]
    if not expected_update.any():
      assert not got_update.any(), "/".join(path)
      continue
    error = np.linalg.norm(got_update - expected_update) / np.linalg.norm(expected_update)
    assert error < 1e-3, f"{'/'.join(path)}: relative error {error:.1e}"


def test_finetune_on_a_mesh_resumes_bit_exact_and_matches_one_device(ckpt, tmp_path, capsys):
  """`lminf finetune --mesh` against one device; an interrupted mesh run resumed against an uninterrupted one."""
  import json

  from helpers import run_cli

  from lminf_jax.train import TrainSettings, finetune

  tokens = tmp_path / "tokens.npy"
  np.save(tokens, np.tile(np.random.default_rng(2).integers(0, 97, size=19), 40).astype(np.int32))
  args = ["finetune", ckpt, "--tokens-file", tokens, "--seq-len", 32, "--steps", 4, "--lr", 1e-2, "--batch", 4,
          "--train", "attn/", "--attention", "lambda", "--n-global", 2, "--n-local", 8, "--chunk", 8, "--key-block", 8]
  losses = {}
  for name, mesh in (("one", []), ("mesh", ["--mesh", "data=2,fsdp=2,tensor=2"])):
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / name, *mesh)
    assert code == 0, err
    losses[name] = [r["loss"] for r in json.loads((tmp_path / name / "log.json").read_text())["history"]]
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=1e-5)

  mesh = make_mesh(parse_mesh("data=4,fsdp=2"))
  settings = TrainSettings(seq_len=32, steps=4, lr=1e-2, batch=4, train="attn/")
  ids = np.load(tokens)

  def stop_after_step_3(record):
    if record["step"] == 3:
      raise KeyboardInterrupt

  config, params, _ = load(ckpt, mesh=mesh)
  straight = finetune(config, params, ids, settings, tmp_path / "straight", mesh=mesh)
  with pytest.raises(KeyboardInterrupt):
    finetune(config, load(ckpt, mesh=mesh)[1], ids, settings, tmp_path / "resumed", mesh=mesh, save_every=2,
             on_step=stop_after_step_3)
  resumed = finetune(config, load(ckpt, mesh=mesh)[1], ids, settings, tmp_path / "resumed", mesh=mesh, save_every=2,
                     resume=True)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_own_method_under_a_mesh(ckpt, tmp_path, capsys):
  """A method of the user's (tests/test_own_method.py) runs sharded over data where it says
  nothing of sequence parallelism, and is refused in one line under a `sequence` axis."""
  from helpers import run_cli

  np.save(tmp_path / "tokens.npy", np.random.default_rng(2).integers(0, 97, size=64))
  common = ("nll", ckpt, "--tokens-file", tmp_path / "tokens.npy", "--attention", "test_own_method:Dilated",
            "--attn-opt", "stride=3", "--attn-opt", "window=11")
  assert run_cli(capsys, *common, "--out", tmp_path / "one.npy")[0] == 0
  code, _, err = run_cli(capsys, *common, "--out", tmp_path / "mesh.npy", "--mesh", "fsdp=2,tensor=4")
  assert code == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "mesh.npy"), np.load(tmp_path / "one.npy"), atol=1e-5)
  code, _, err = run_cli(capsys, *common, "--out", tmp_path / "seq.npy", "--mesh", "data=2,sequence=4")
  assert code == 1 and err.count("\n") == 1 and "Dilated does not support sequence parallelism" in err, err
  assert not (tmp_path / "seq.npy").exists()


@pytest.mark.parametrize("mesh_text", ["data=4,tensor=2", "fsdp=2,tensor=4"])
def test_splash_kernel_on_a_mesh_equals_xla_on_one_device(ckpt, batch, mesh_text):
  """The kernel path runs per shard of rows and heads (shard_map), equal to XLA on one device."""
  import dataclasses

  tokens, positions = batch
  spec = SPECS["lambda_window_past_shard"]
  config, params, _ = load(ckpt)
  expected = np.asarray(token_nll(params, config, tokens, positions, attention=dataclasses.replace(spec, kernel="xla")))
  mesh = make_mesh(parse_mesh(mesh_text))
  _, sharded_params, _ = load(ckpt, mesh=mesh)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(x, data_sharding(mesh, x.shape)) for x in (tokens, positions)]
    got = np.asarray(token_nll(sharded_params, config, *placed, attention=dataclasses.replace(spec, kernel="splash")))
  valid = np.asarray(positions)[:, 1:] > 0
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4)
