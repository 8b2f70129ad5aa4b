"""Sequence parallelism on 8 virtual CPU devices: per-device memory of a SmolLM2-shaped lambda
forward at T=64K (XLA's compiled memory analysis, nothing is run), and wall time of a real
SmolLM2 NLL on 8 devices against 1.

    python scripts/bench_sharding.py [--memory-length 65536] [--time-length 8192]

On 2 real cores, 8 virtual devices share the same cores: the timing is about correctness and
overheads, not speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lminf_jax.attention import Lambda  # noqa: E402
from lminf_jax.convert.checkpoint import read_config  # noqa: E402
from lminf_jax.util.fetch import fetch_smollm2  # noqa: E402
from lminf_jax.inference.forward import token_nll  # noqa: E402
from lminf_jax.loading import load  # noqa: E402
from lminf_jax.models.params import abstract_params, param_shardings  # noqa: E402
from lminf_jax.sharding import data_sharding, make_mesh  # noqa: E402


def compiled_memory(config, t: int, spec, mesh) -> int:
  """Per-device bytes (arguments + outputs + temporaries) of the compiled NLL forward."""
  shardings = param_shardings(config, mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params(config),
                        shardings)
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=data_sharding(mesh, (1, t)))
  with jax.set_mesh(mesh):
    mem = token_nll.lower(params, config, tokens, attention=spec).compile().memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


def timed_nll(ckpt, ids: np.ndarray, spec, mesh) -> tuple[float, np.ndarray]:
  config, params, _ = load(ckpt, mesh=mesh)
  tokens = jnp.asarray(ids)[None]
  with jax.set_mesh(mesh):
    tokens = jax.device_put(tokens, data_sharding(mesh, tokens.shape))
    compiled = token_nll.lower(params, config, tokens, attention=spec).compile()
    start = time.perf_counter()
    nll = np.asarray(compiled(params, tokens))
  return time.perf_counter() - start, nll


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--memory-length", type=int, default=65536)
  parser.add_argument("--time-length", type=int, default=8192)
  args = parser.parse_args()
  ckpt = fetch_smollm2()
  config = read_config(ckpt)
  spec = Lambda(n_global=10, n_local=2048)
  one = make_mesh({}, devices=jax.devices()[:1])
  eight = make_mesh({"sequence": 8})
  print(f"{jax.device_count()} devices; SmolLM2 shapes, lambda G=10 L=2048")
  for name, mesh in (("sequence=1", one), ("sequence=8", eight)):
    mib = compiled_memory(config, args.memory_length, spec, mesh) / 2**20
    print(f"T={args.memory_length} {name}: {mib:.0f} MiB per device (XLA memory analysis)", flush=True)
  ids = np.random.default_rng(0).integers(0, config.vocab_size, args.time_length).astype(np.int32)
  s1, nll1 = timed_nll(ckpt, ids, spec, one)
  s8, nll8 = timed_nll(ckpt, ids, spec, eight)
  print(f"T={args.time_length} NLL wall time: 1 device {s1:.1f} s, 8 virtual devices {s8:.1f} s "
        f"(ratio {s8 / s1:.2f}); max |NLL difference| {np.abs(nll1 - nll8).max():.2e}")


if __name__ == "__main__":
  main()
