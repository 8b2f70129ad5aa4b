"""On 8 virtual CPU devices: sharded forward equals one device; params really sharded; sequence-
parallel lambda attention moves keys with collective-permutes, never an all-gather of K/V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model

from lminf_jax.attention import Dense, Lambda, Streaming, attend, resolve
from lminf_jax.forward import token_nll
from lminf_jax.loading import convert, load
from lminf_jax.sharding import data_sharding, make_mesh, parse_mesh

MESHES = ["sequence=8", "data=2,sequence=4", "fsdp=2,tensor=2,sequence=2", "fsdp=8"]
T = 128  # 16 tokens per shard at sequence=8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("sharded")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")
  return convert(root / "hf", root / "ckpt")


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


def test_params_are_really_sharded(ckpt):
  mesh = make_mesh({"fsdp": 2, "tensor": 2, "sequence": 2})
  config, params, _ = load(ckpt, mesh=mesh)
  wq = params["layers"]["attn"]["wq_dnh"]  # [L, D, N, H] = [2, 64, 8, 8]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert wq.addressable_shards[0].data.nbytes == wq.nbytes // 4
  w_down = params["layers"]["mlp"]["w_down_fd"]  # [L, F, D]: mlp over tensor, embed over fsdp
  assert w_down.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert w_down.addressable_shards[0].data.nbytes == w_down.nbytes // 4
  embed = params["embed_vd"]  # vocab 97 is not divisible by tensor=2: replicated over it
  assert embed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def _attention_hlo(spec, mesh) -> str:
  """Compiled HLO of attention over inputs split along the sequence, as the model feeds it."""
  t, n, kv, h = 1024, 4, 2, 16
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sequence"))
  q = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32, sharding=split)
  k = jax.ShapeDtypeStruct((1, t, kv, h), jnp.float32, sharding=split)
  pos = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=split)
  inv_freq = jnp.ones((h // 2,), jnp.float32)
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
