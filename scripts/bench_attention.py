"""Time and memory of one attention layer (SmolLM2 shapes: 9 query heads, 3 kv heads, head_dim 64):
blockwise Lambda (G=10, L=8192) against blockwise (flash-style) dense, for T = 4K ... 64K.

    python scripts/bench_attention.py [--lengths 4096,8192,16384,32768,65536] [--chunk 512]

Reports wall time (best of --repeats, compile excluded), useful GFLOP/s (4*H FLOPs per attended
(query, key) pair and head), XLA's compiled memory (arguments + outputs + temporaries), and the
32K/8K time ratios (linear = 4, quadratic = 16). All figures come from one run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention import Dense, Lambda, attend
from lminf_jax.positional import Rotary
from lminf_jax.rope import inv_frequencies
from lminf_jax.models.config import RopeScaling

N, K, H = 9, 3, 64


def attended_pairs(method: str, t: int, n_global: int, n_local: int) -> int:
  i = np.arange(t, dtype=np.int64)
  if method == "dense":
    return int((i + 1).sum())
  local = np.minimum(i + 1, n_local)
  far = np.clip(i - n_local + 1, 0, n_global)
  return int((local + far).sum())


def bench(spec, t: int, repeats: int) -> tuple[float, int]:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, t, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, t, K, H)), jnp.float32) for _ in range(2))
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  pe = Rotary(jnp.asarray(inv_frequencies(H, 100000.0, RopeScaling())))
  fn = jax.jit(lambda q, k, v, pos: attend(q, k, v, pos, pe, spec))
  compiled = fn.lower(q, k, v, pos).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  compiled(q, k, v, pos).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    compiled(q, k, v, pos).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best, peak


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384,32768,65536")
  parser.add_argument("--chunk", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  specs = {"lambda": Lambda(n_global=10, n_local=8192, limit=8192, chunk=args.chunk), "dense": Dense(chunk=args.chunk)}
  print(f"devices: {jax.devices()}  chunk {args.chunk}")
  print(f"{'method':<7} {'T':>6} {'seconds':>9} {'GFLOP/s':>8} {'XLA memory MB':>14}")
  times = {}
  for t in lengths:
    for name, spec in specs.items():
      seconds, peak = bench(spec, t, args.repeats)
      times[name, t] = seconds
      flops = 4 * H * N * attended_pairs(name, t, 10, 8192)
      print(f"{name:<7} {t:>6} {seconds:>9.3f} {flops / seconds / 1e9:>8.1f} {peak / 2**20:>14.1f}", flush=True)
  for name in specs:
    if (name, 32768) in times and (name, 8192) in times:
      pairs = attended_pairs(name, 32768, 10, 8192) / attended_pairs(name, 8192, 10, 8192)
      print(f"{name}: time ratio 32K/8K = {times[name, 32768] / times[name, 8192]:.2f} "
            f"(attended-pair ratio {pairs:.2f})")


if __name__ == "__main__":
  main()
