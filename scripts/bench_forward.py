"""Tokens/s of the full `lminf nll` forward (SmolLM2, jargon.txt) at 16K and 32K tokens: lambda
(G=10, L=8192) against dense, against transformers' PyTorch model on the same tokens, and
lambda's fraction of this machine's matmul roofline, all measured in one run.

    python scripts/bench_forward.py [--lengths 16384,32768] [--skip-torch]

Roofline: counted FLOPs of the forward (2*params per token for the linear layers and lm_head,
4*H per attended (query, key) pair and head) divided by the best of a few large float32
matmuls in JAX.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention import Dense, Lambda
from lminf_jax.util.fetch import fetch_smollm2, smollm2_gguf
from lminf_jax.inference.forward import token_nll
from lminf_jax.loading import load

JARGON = Path(__file__).resolve().parents[2] / "shared" / "data" / "jargon.txt"


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n x n float32 matmul in JAX."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def attended_pairs(method: str, t: int, n_global: int = 10, n_local: int = 8192) -> int:
  i = np.arange(t, dtype=np.int64)
  if method == "dense":
    return int((i + 1).sum())
  return int((np.minimum(i + 1, n_local) + np.clip(i - n_local + 1, 0, n_global)).sum())


def forward_flops(config, t: int, method: str) -> float:
  d, f, n, kv, h = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                    config.head_dim)
  per_layer = d * (n + 2 * kv) * h + n * h * d + 3 * d * f
  linear = 2 * t * (config.num_layers * per_layer + d * config.vocab_size)
  attention = 4 * h * n * config.num_layers * attended_pairs(method, t)
  return linear + attention


def torch_nll_seconds(ids: np.ndarray) -> tuple[float, float]:
  import torch
  from transformers import AutoModelForCausalLM

  gguf = smollm2_gguf()
  model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
  tokens = torch.as_tensor(ids[None], dtype=torch.long)
  with torch.no_grad():
    start = time.perf_counter()
    logits = model(tokens).logits[0, :-1]
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, tokens[0, 1:, None])[:, 0]
    seconds = time.perf_counter() - start
  return seconds, float(nll.mean())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="16384,32768")
  parser.add_argument("--offset", type=int, default=100000)
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()
  config, params, tokenizer = load(fetch_smollm2())
  all_ids = np.asarray(tokenizer(JARGON.read_text(), add_special_tokens=False)["input_ids"], np.int32)
  rate = matmul_rate()
  print(f"matmul roofline: {rate / 1e9:.1f} GFLOP/s (best 4096^3 float32 matmul in JAX)")
  methods = {"lambda": Lambda(n_global=10, n_local=8192), "dense": Dense()}
  print(f"{'T':>6} {'method':<12} {'seconds':>8} {'tokens/s':>9} {'mean NLL':>9} {'roofline':>9}")
  for t in [int(x) for x in args.lengths.split(",")]:
    ids = all_ids[args.offset:args.offset + t]
    tokens = jnp.asarray(ids)[None]
    row = {}
    for name, spec in methods.items():
      compiled = token_nll.lower(params, config, tokens, attention=spec).compile()
      start = time.perf_counter()
      nll = np.asarray(compiled(params, tokens))
      seconds = time.perf_counter() - start
      row[name] = seconds
      frac = forward_flops(config, t, name) / rate / seconds
      print(f"{t:>6} {name:<12} {seconds:>8.1f} {t / seconds:>9.1f} {nll.mean():>9.3f} {frac:>8.0%}", flush=True)
    if not args.skip_torch:
      seconds, mean = torch_nll_seconds(ids)
      print(f"{t:>6} {'transformers':<12} {seconds:>8.1f} {t / seconds:>9.1f} {mean:>9.3f}", flush=True)
      print(f"{t:>6} lambda is {seconds / row['lambda']:.2f}x transformers, dense is {seconds / row['dense']:.2f}x")


if __name__ == "__main__":
  main()
