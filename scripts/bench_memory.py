"""Memory at scale, each figure a ratio from one run (docs/memory.md explains the model):

- host memory of the weights: peak RSS of `lminf convert`, `lminf nll` on the checkpoint and `lminf nll`
  straight from the HF dir, on a synthetic Llama (random tensors, written as transformers writes a
  model: one safetensors file up to 5 GB), against the goal 0.5 GiB + 1.3x the param bytes; bfloat16
  and float32;
- per-device bytes from XLA's compiled memory analysis (nothing is allocated or run), on 8 virtual CPU
  devices, against one device:
  - sequence parallelism: a SmolLM2 lambda NLL at T=65536 (G=10, L=2048) on `sequence=8`;
  - tensor parallelism through a cache: one decode step of a Llama-3-8B-shaped model (bf16 weights and
    cache) after a 32K prompt, on `tensor=8`: weights + cache + temporaries.
- from shapes alone (`jax.eval_shape`), the bytes of a Gemma-3-4B-shaped cache for 32K tokens (34 layers,
  5 windowed : 1 global, a window of 1024; bf16), a cache per layer kind against every layer at the global
  layers' layout (as one shared cache was: num_layers x one global layer).

    python scripts/bench_memory.py [--seq-length 65536] [--prompt 32768] [--host-dir DIR] [--skip-host]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lminf_jax.attention import Dense, InfLLM, Lambda  # noqa: E402
from lminf_jax.cache import init_cache  # noqa: E402
from lminf_jax.inference.forward import _forward_cached, token_nll  # noqa: E402
from lminf_jax.models.config import LlamaConfig  # noqa: E402
from lminf_jax.models.params import abstract_params, param_shardings  # noqa: E402
from lminf_jax.sharding import data_sharding, make_mesh  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_sharding import compiled_memory  # noqa: E402

LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                        param_dtype="bfloat16", dtype="bfloat16")


# 792M params, 1.47 GiB in bfloat16 (a 1B-class Llama with GQA).
SYNTHETIC = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=14, num_heads=16,
                        num_kv_heads=8, head_dim=128, max_position_embeddings=4096)


def write_synthetic_hf(out: Path, config: LlamaConfig) -> None:
  """An HF model dir of random tensors in `config.param_dtype`, one tensor in memory at a time."""
  import ml_dtypes
  import numpy as np

  from lminf_jax.convert.hf import hf_tensor_names

  dtype = np.dtype(ml_dtypes.bfloat16 if config.param_dtype == "bfloat16" else np.float32)
  kind = {"bfloat16": "BF16", "float32": "F32"}[config.param_dtype]
  tensors = hf_tensor_names(config)
  header, offset = {}, 0
  for t in tensors:
    size = math.prod(t.shape) * dtype.itemsize
    header[t.name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
    offset += size
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  out.mkdir(parents=True)
  rng = np.random.default_rng(0)
  with open(out / "model.safetensors", "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for t in tensors:
      f.write((rng.standard_normal(t.shape, np.float32) * 0.02).astype(dtype).tobytes())
  (out / "config.json").write_text(json.dumps(config.to_hf()))


def peak_rss_gib(command: list[str]) -> float:
  """Peak RSS (GiB) of `command`, run in a process of its own on one device (no XLA_FLAGS)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  probe = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
  done = subprocess.run([sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
  return int(done.stdout.split()[-1]) / 2**20


def host_memory(root: Path, dtype: str) -> None:
  """Peak RSS of convert, nll on the checkpoint and nll from the HF dir, against the goal."""
  import numpy as np

  config = SYNTHETIC.replace(param_dtype=dtype)
  param_gib = config.num_params() * (2 if dtype == "bfloat16" else 4) / 2**30
  hf, ckpt, ids = root / f"hf-{dtype}", root / f"ckpt-{dtype}", root / "ids.npy"
  if not hf.exists():
    write_synthetic_hf(hf, config)
  np.save(ids, np.random.default_rng(1).integers(0, config.vocab_size, 512))
  lminf = [sys.executable, "-m", "lminf_jax.cli"]
  nll = ["nll", "--tokens-file", str(ids), "--out", str(root / "nll.npy")]
  figures = {"convert": peak_rss_gib(lminf + ["convert", str(hf), str(ckpt)]),
             "nll on the checkpoint": peak_rss_gib(lminf + nll + [str(ckpt)]),
             "nll from the HF dir": peak_rss_gib(lminf + nll + [str(hf)])}
  goal = 0.5 + 1.3 * param_gib
  # XLA's own temporaries of that NLL (on CPU they are host memory): where bfloat16 weights are up-cast
  # as a whole (XLA:CPU's float normalization, docs/memory.md), they are the float32 copy.
  tokens = jax.ShapeDtypeStruct((1, 512), jnp.int32)
  xla_gib = token_nll.lower(abstract_params(config), config, tokens).compile().memory_analysis().temp_size_in_bytes
  xla_gib /= 2**30
  print(f"host memory, synthetic Llama {config.num_params() / 1e6:.0f}M params in {dtype} ({param_gib:.2f} GiB), "
        f"512 tokens; goal 0.5 GiB + 1.3x params = {goal:.2f} GiB; the NLL's XLA temporaries {xla_gib:.2f} GiB:")
  for name, gib in figures.items():
    less = f", {(gib - xla_gib) / param_gib:.2f}x less XLA's temporaries" if name.startswith("nll") else ""
    print(f"  {name}: peak RSS {gib:.2f} GiB = {gib / param_gib:.2f}x the params{less} "
          f"({'within' if gib <= goal else 'over'} the goal)", flush=True)
  import shutil
  shutil.rmtree(ckpt)


# Gemma 3 4B's config.json (text), as its family reads it.
GEMMA3_4B = LlamaConfig.from_hf(dict(
    model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024, sliding_window_pattern=6,
    query_pre_attn_scalar=256, rope_theta=1000000.0, rope_local_base_freq=10000.0, max_position_embeddings=131072,
    rope_scaling=dict(rope_type="linear", factor=8.0), rms_norm_eps=1e-6)).replace(param_dtype="bfloat16",
                                                                                   dtype="bfloat16")


def per_kind_cache_bytes(config: LlamaConfig, spec, max_len: int) -> tuple[int, int]:
  """(bytes of a cache of every layer at the global layers' layout, bytes of a cache per layer kind)
  for `max_len` tokens, batch 1 (shapes only)."""
  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
  cache = jax.eval_shape(lambda: init_cache(config, spec, 1, max_len=max_len))
  n_global = cache.kv.slot_k.shape[0]
  shared_cache = config.num_layers * nbytes(cache.kv) // n_global + nbytes(cache._replace(kv=None, windowed=None))
  return shared_cache, nbytes(cache)


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def decode_step_bytes(config: LlamaConfig, spec, prompt: int, mesh) -> dict[str, float]:
  """Per-device GiB of one cached decode step (batch 1) after `prompt` tokens: params, cache, temporaries."""
  with jax.set_mesh(mesh):
    make = jax.jit(lambda: init_cache(config, spec, 1, max_len=prompt + 1))
    compiled_cache = make.lower().compile()
    cache = _abstract(jax.eval_shape(make), compiled_cache.output_shardings)
    params = _abstract(abstract_params(config), param_shardings(config, mesh))
    token = jax.ShapeDtypeStruct((1, 1), jnp.int32, sharding=data_sharding(mesh, (1, 1)))
    step = _forward_cached.lower(params, config, cache, token, token, config.resolve_attention(spec)).compile()
  m = step.memory_analysis()
  gib = lambda n: n / 2**30  # noqa: E731
  params_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(params))
  cache_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(cache))
  return dict(params=gib(params_bytes), cache=gib(cache_bytes), temp=gib(m.temp_size_in_bytes),
              total=gib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes))


def _shard_bytes(x) -> int:
  shape = x.sharding.shard_shape(x.shape)
  n = 1
  for d in shape:
    n *= d
  return n * x.dtype.itemsize


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-length", type=int, default=65536)
  parser.add_argument("--prompt", type=int, default=32768)
  parser.add_argument("--host-dir", type=Path, help="where the synthetic checkpoints go (a temporary dir in it; default: the system's)")
  parser.add_argument("--skip-host", action="store_true", help="skip the host-memory figures (minutes)")
  args = parser.parse_args()
  if not args.skip_host:
    with tempfile.TemporaryDirectory(dir=args.host_dir) as tmp:
      for dtype in ("bfloat16", "float32"):
        host_memory(Path(tmp), dtype)
  one, eight = make_mesh({}, devices=jax.devices()[:1]), make_mesh({"tensor": 8})
  print(f"{jax.device_count()} devices ({jax.devices()[0].platform}); XLA memory analysis, compile only")

  for name, spec in (("dense", Dense()), ("lambda", Lambda()), ("lambda n_local=4096", Lambda(n_local=4096)),
                     ("infllm", InfLLM()), ("infllm n_local=4096", InfLLM(n_local=4096))):
    before, after = per_kind_cache_bytes(GEMMA3_4B, spec, args.prompt)
    print(f"Gemma-3-4B-shaped cache for {args.prompt} tokens, {name}, bf16: every layer at the global layout "
          f"{before / 2**30:.3f} GiB, a cache per layer kind {after / 2**30:.3f} GiB ({after / before:.3f}x)",
          flush=True)

  from lminf_jax.convert.checkpoint import read_config
  from lminf_jax.util.fetch import fetch_smollm2

  smollm2, lam = read_config(fetch_smollm2()), Lambda(n_global=10, n_local=2048)
  seq = [compiled_memory(smollm2, args.seq_length, lam, mesh) / 2**20
         for mesh in (one, make_mesh({"sequence": 8}))]
  print(f"SmolLM2 lambda NLL, T={args.seq_length}: 1 device {seq[0]:.0f} MiB, sequence=8 {seq[1]:.0f} MiB per device "
        f"({seq[0] / seq[1]:.2f}x)", flush=True)

  for name, spec in (("dense", Dense()), ("lambda L=8192", Lambda(n_global=10, n_local=8192))):
    a, b = (decode_step_bytes(LLAMA3_8B, spec, args.prompt, mesh) for mesh in (one, eight))
    print(f"Llama-3-8B-shaped decode step after {args.prompt} tokens, {name}, bf16: 1 device {a['total']:.2f} GiB "
          f"(params {a['params']:.2f}, cache {a['cache']:.2f}, temporaries {a['temp']:.2f}); tensor=8 "
          f"{b['total']:.2f} GiB per device (params {b['params']:.2f}, cache {b['cache']:.2f}, temporaries "
          f"{b['temp']:.2f}): {a['total'] / b['total']:.2f}x", flush=True)


if __name__ == "__main__":
  main()
