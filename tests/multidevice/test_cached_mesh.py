"""On 8 virtual CPU devices: every path through a cache (init_cache, prefill and decode in generate,
cached_token_nll, stream_nll, and the commands on them) runs data- and tensor-parallel with the results
of one device; a mesh axis that does not divide the kv heads replicates them; a sequence axis is refused."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, tiny_hf_model

from lminf_jax.attention import DCA, Dense, InfLLM, Lambda, SelfExtend, Streaming
from lminf_jax.cache import init_cache
from lminf_jax.errors import UserError
from lminf_jax.inference.forward import cached_token_nll
from lminf_jax.inference.generation import generate
from lminf_jax.inference.stream import stream_nll
from lminf_jax.loading import load
from lminf_jax.sharding import make_mesh, parse_mesh

SPECS = {"lambda": Lambda(n_global=4, n_local=16, chunk=8, key_block=8),
         "infllm": InfLLM(n_init=4, n_local=16, block_size=4, repr_tokens=2, top_k=2, chunk=8),
         "streaming": Streaming(n_sink=4, n_recent=12, chunk=8, key_block=8), "dense": Dense(chunk=8, key_block=8),
         "infllm_offload": InfLLM(n_init=4, n_local=16, block_size=4, repr_tokens=2, top_k=2, chunk=8, offload=True,
                                  device_blocks=2),
         "selfextend": SelfExtend(group_size=3, window_size=10, chunk=8, key_block=8),
         "dca": DCA(chunk_size=12, local_window=2, chunk=8, key_block=8)}
MESHES = ["tensor=2", "data=2,tensor=2", "tensor=4", "data=2,fsdp=2,tensor=2"]  # tensor=4: 2 kv heads, replicated
PROMPTS = [np.random.default_rng(0).integers(0, 97, 30).tolist(), np.random.default_rng(1).integers(0, 97, 23).tolist()]
TOKENS = np.random.default_rng(2).integers(0, 97, size=(2, 60)).astype(np.int32)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  root = tmp_path_factory.mktemp("cached_mesh")
  tiny_hf_model("llama_gqa").save_pretrained(root / "hf")  # 8 heads, 2 kv heads
  return root / "hf"


def _mesh(text: str):
  sizes = parse_mesh(text)
  return make_mesh(sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])


# lambda and infllm on every mesh (in CI: lambda on data and tensor parallel, and on kv heads the tensor axis
# does not divide; infllm on the first); dense (the same shared cache code) and infllm with offload on one in CI;
# streaming, selfextend, dca and offload on every mesh: slow
CI_CASES = (("data=2,tensor=2", "lambda"), ("tensor=4", "lambda"), ("data=2,tensor=2", "infllm"))
CASES = ([pytest.param(m, n, marks=() if (m, n) in CI_CASES else pytest.mark.slow) for m in MESHES
          for n in ("lambda", "infllm")] + [("data=2,tensor=2", n) for n in ("dense", "infllm_offload")]
         + [pytest.param("data=2,tensor=2", "streaming", marks=pytest.mark.slow)]
         + [pytest.param(m, "infllm_offload", marks=pytest.mark.slow) for m in MESHES if m != "data=2,tensor=2"]
         + [pytest.param("data=2,tensor=2", n, marks=pytest.mark.slow) for n in ("selfextend", "dca")])


@pytest.mark.parametrize("mesh_text, name", CASES)
def test_cached_paths_on_a_mesh_equal_one_device(hf, mesh_text, name):
  spec = SPECS[name]
  config, params, _ = load(hf)
  greedy = generate(params, config, PROMPTS, 10, spec, eos_ids=())
  nll = np.asarray(cached_token_nll(params, config, jnp.asarray(TOKENS), attention=spec))
  mesh = _mesh(mesh_text)
  _, sharded, _ = load(hf, mesh=mesh)
  with jax.set_mesh(mesh):
    assert generate(sharded, config, PROMPTS, 10, spec, eos_ids=()) == greedy
    np.testing.assert_allclose(np.asarray(cached_token_nll(sharded, config, jnp.asarray(TOKENS), attention=spec)), nll,
                               atol=1e-5)
    if name not in ("dense", "selfextend", "dca"):  # (a dense cache holds the whole stream: stream_nll is for the bounded ones)
      cache = init_cache(config, spec, 1, max_len=60)
      chunks = np.split(TOKENS[0], range(8, 60, 8))  # (the method's chunk: infllm retrieves once per chunk)
      got = stream_nll(sharded, config, cache, iter(chunks), 60, spec, segment=60)
      np.testing.assert_allclose(got, nll[0], atol=1e-5)


@pytest.mark.parametrize("name", ["lambda", *(pytest.param(n, marks=pytest.mark.slow) for n in ("infllm", "infllm_offload"))])
def test_a_cache_per_layer_kind_on_a_mesh_equals_one_device(tmp_path, name):
  """Gemma 2 (windows of 8 on layers 0 and 2, 2 kv heads): the windowed layers' own ring is split as
  the global layers' cache is, and generation and cached NLL on data=2,tensor=2 equal one device's."""
  tiny_hf_model("gemma2").save_pretrained(tmp_path / "hf")
  spec = SPECS[name]
  config, params, _ = load(tmp_path / "hf")
  greedy = generate(params, config, PROMPTS, 10, spec, eos_ids=())
  nll = np.asarray(cached_token_nll(params, config, jnp.asarray(TOKENS), attention=spec))
  mesh = _mesh("data=2,tensor=2")
  _, sharded, _ = load(tmp_path / "hf", mesh=mesh)
  with jax.set_mesh(mesh):
    ring = init_cache(config, spec, 2, max_len=64).windowed.kv.ring_k
    assert ring.shape[3] == 8 and ring.addressable_shards[0].data.nbytes * 4 == ring.nbytes  # (over batch and heads)
    assert generate(sharded, config, PROMPTS, 10, spec, eos_ids=()) == greedy
    np.testing.assert_allclose(np.asarray(cached_token_nll(sharded, config, jnp.asarray(TOKENS), attention=spec)), nll,
                               atol=1e-5)


@pytest.mark.parametrize("mesh_text, heads_split", [("data=2,tensor=2", True), ("tensor=4", False)])
def test_the_cache_is_split_over_batch_and_kv_heads(hf, mesh_text, heads_split):
  """Keys and values [L, B, K, S, H]: B over data and fsdp, K over tensor where it divides the kv heads
  (else replicated), S never; the memory check counts one device's shard."""
  config, _, _ = load(hf)
  with jax.set_mesh(_mesh(mesh_text)):
    cache = init_cache(config, SPECS["lambda"], 2, max_len=64)
  ring = cache.kv.ring_k
  spec = tuple(ring.sharding.spec) + (None,) * (ring.ndim - len(ring.sharding.spec))
  assert spec[2] == ("tensor" if heads_split else None) and spec[3] is None
  assert ring.addressable_shards[0].data.nbytes * (2 if "data" in mesh_text else 1) * (2 if heads_split else 1) \
      == ring.nbytes


def test_a_cache_on_a_sequence_axis_is_refused(hf):
  config, _, _ = load(hf)
  with jax.set_mesh(_mesh("sequence=2")), pytest.raises(UserError, match="not sequence-parallel"):
    init_cache(config, SPECS["lambda"], 1, max_len=64)


def _nll_cached_on_a_mesh(capsys, nll: tuple, out, mesh_text: str) -> tuple[np.ndarray, np.ndarray]:
  """The NLLs `lminf *nll` writes on one device and on `mesh_text`; on a sequence axis it must refuse in
  one line and write nothing."""
  assert run_cli(capsys, *nll, "--out", out / "one.npy")[0] == 0
  code, _, err = run_cli(capsys, *nll, "--out", out / "mesh.npy", "--mesh", mesh_text)
  assert code == 0, err
  code, _, err = run_cli(capsys, *nll, "--out", out / "seq.npy", "--mesh", "sequence=8")
  assert code == 1 and err.count("\n") == 1 and "not sequence-parallel" in err and not (out / "seq.npy").exists()
  return np.load(out / "one.npy"), np.load(out / "mesh.npy")


def test_nll_cached_takes_a_mesh(hf, tmp_path, capsys):
  """`nll --cached --mesh` writes what one device writes; a sequence axis is one line (the commands on
  SmolLM2: `test_cached_commands_take_a_mesh`)."""
  np.save(tmp_path / "t.npy", TOKENS[0])
  nll = ("nll", hf, "--tokens-file", tmp_path / "t.npy", "--cached", "--attention", "infllm", "--n-init", "4",
         "--n-local", "16", "--block-size", "4", "--infllm-top-k", "2", "--chunk", "8")
  one, meshed = _nll_cached_on_a_mesh(capsys, nll, tmp_path, "data=2,tensor=-1")
  np.testing.assert_allclose(meshed, one, atol=1e-5)


@pytest.mark.slow
def test_cached_commands_take_a_mesh(smollm2_ckpt, tmp_path, capsys):
  """generate, passkey and nll --cached with --mesh print and write what one device does; a sequence
  axis is one line."""
  common = ("generate", smollm2_ckpt, "--prompt", "The capital of France is", "--max-new-tokens", "8",
            "--attention", "lambda")
  code, one, err = run_cli(capsys, *common)
  assert code == 0, err
  code, meshed, err = run_cli(capsys, *common, "--mesh", "data=2,tensor=-1")  # (3 kv heads over 4: replicated)
  assert code == 0, err
  notes = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("lminf:")]
  assert notes == ["lminf: note: tensor=4 does not divide the model's 9 heads and 3 kv heads: they are replicated "
                   "over it"], err
  assert meshed.split("\n[")[0] == one.split("\n[")[0]
  passkey = ("passkey", smollm2_ckpt, "--lengths", "300", "--samples", "2", "--batch", "2", "--attention", "lambda")
  for name, mesh in (("one", ()), ("mesh", ("--mesh", "data=2,fsdp=-1"))):
    code, _, err = run_cli(capsys, *passkey, *mesh, "--json", tmp_path / f"{name}.json")
    assert code == 0, err
  results = [json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in ("one", "mesh")]
  assert results[0] == results[1]
  np.save(tmp_path / "t.npy", np.arange(200, dtype=np.int32) * 11 % 49152)
  nll = ("nll", smollm2_ckpt, "--tokens-file", tmp_path / "t.npy", "--cached", "--attention", "lambda",
         "--n-local", "64", "--prefill-chunk", "32")
  one, meshed = _nll_cached_on_a_mesh(capsys, nll, tmp_path, "data=2,tensor=-1")
  # (SmolLM2's NLLs reach 22 and its MLP is split over tensor: float32 sums in another order, 1e-5 relative)
  np.testing.assert_allclose(meshed, one, rtol=1e-5)
