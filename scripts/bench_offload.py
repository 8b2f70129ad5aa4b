"""InfLLM's block memory in host memory (`offload`) against the in-device pool: bytes and a streamed run.

    python scripts/bench_offload.py                      # the analysis, then 131072 tokens of each
    python scripts/bench_offload.py --analysis-only      # shapes only (seconds)
    python scripts/bench_offload.py --tokens 262144

1. Analysis (traced shapes, nothing allocated): the cache's device and host bytes at 4K, 64K and
   1M tokens, SmolLM2 and a Llama-3-8B in bfloat16, with the in-device pool and with offload (the
   device's bytes with and without the representative keys, which stay on the device).
2. A run: SmolLM2 (`lminf fetch`'s checkpoint) streams the Jargon File (../shared/data/jargon.txt,
   else the built-in text) through an infllm cache (n_local 2048, block 128, top_k 16, chunk 512,
   32 device blocks), as `lminf stream-ppl` does, once with the in-device pool and once offloaded,
   each in a process of its own: tokens/s after the first segment (compile), peak RSS, the cache's
   device and host bytes, blocks copied in per chunk and layer and the bytes they carry, and the
   largest NLL difference between the two runs.
On a CPU both memories are the same RAM: the run's RSS holds the pool either way, and the device's
bytes are the cache's device arrays (what a GPU would hold), not measured device memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "jargon.txt"


def gib(nbytes: float) -> str:
  return f"{nbytes / 2**30:.3f} GiB"


def analysis() -> None:
  import jax.numpy as jnp

  from lminf_jax.attention import InfLLM
  from lminf_jax.cache import cache_bytes
  from lminf_jax.models.config import LlamaConfig

  common = dict(tie_word_embeddings=False, param_dtype="bfloat16", dtype="bfloat16", rms_norm_eps=1e-5)
  models = {"SmolLM2-135M": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                                        max_position_embeddings=8192, **common),
            "Llama-3-8B": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                                      max_position_embeddings=8192, **common)}
  print("1. cache bytes (bf16, batch 1; infllm defaults: n_init 128, n_local 8192, block 128, 32 device blocks)")
  print(f"{'model':<14} {'tokens':>8} {'in-device pool':>15} {'offload: device':>16} {'less rep. keys':>15} "
        f"{'rep. keys':>11} {'host':>12}")
  for name, config in models.items():
    for n in (4096, 65536, 1 << 20):
      on, off = cache_bytes(config, InfLLM(), n), cache_bytes(config, InfLLM(offload=True), n)
      blocks = max(0, (n - 1 - 8192 - 128) // 128)
      rk = config.num_layers * config.num_heads * blocks * config.head_dim * jnp.dtype(config.dtype).itemsize
      print(f"{name:<14} {n:>8} {gib(on.device):>15} {gib(off.device):>16} {gib(off.device - rk):>15} {gib(rk):>11} "
            f"{gib(off.host):>12}")


def run(args) -> None:
  """One streamed run (a child process): prints one JSON line of its figures, saves its NLL."""
  import jax
  import jax.numpy as jnp

  from lminf_jax.attention import InfLLM
  from lminf_jax.cache import cache_bytes, init_cache
  from lminf_jax.eval.texts import builtin_text
  from lminf_jax.inference.stream import document_stream, peak_rss_mib, stream_step
  from lminf_jax.loading import load
  from lminf_jax.util.fetch import fetch_smollm2

  config, params, tokenizer = load(fetch_smollm2())
  text = SHARED_TEXT.read_text(encoding="utf-8") if SHARED_TEXT.is_file() else builtin_text()
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
  spec = config.resolve_attention(InfLLM(n_local=2048, offload=args.offload))
  nbytes = cache_bytes(config, spec, args.tokens)
  cache = init_cache(config, spec, 1, max_len=args.tokens)
  prev, nll, rates = jnp.zeros((1, config.vocab_size), jnp.float32), [], []
  seen, began = 0, time.perf_counter()
  for tokens in document_stream(ids, args.tokens, config.bos_token_id, spec.chunk):  # (as `lminf stream-ppl`)
    positions = jnp.arange(seen, seen + len(tokens), dtype=jnp.int32)[None]
    chunk_nll, prev, cache = stream_step(params, config, cache, prev, jnp.asarray(tokens)[None], positions, spec)
    nll.append(np.asarray(chunk_nll)[0])
    seen += len(tokens)
    if seen % args.segment == 0 or seen == args.tokens:
      now = time.perf_counter()
      rates.append(args.segment / (now - began))
      began = now
  fetched = int(np.asarray(cache.kv.extra.held.fetched_b).sum())
  chunks = args.tokens // spec.chunk
  block = 2 * config.num_kv_heads * spec.block_size * config.head_dim * jnp.dtype(config.dtype).itemsize
  print(json.dumps(dict(rates=rates, rss_mib=peak_rss_mib(), device=nbytes.device, host=nbytes.host,
                        formed=int(np.asarray(cache.shared).sum()), fetched_per_chunk_layer=fetched / chunks /
                        config.num_layers, block_bytes=block, chunks=chunks, layers=config.num_layers,
                        dtype=config.dtype, platform=jax.devices()[0].platform)))
  np.save(args.out, np.concatenate(nll)[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=131072)
  parser.add_argument("--segment", type=int, default=16384, help="tokens per timed segment")
  parser.add_argument("--analysis-only", action="store_true")
  parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # (one child run)
  parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run:
    return run(args)
  analysis()
  if args.analysis_only:
    return
  print(f"\n2. SmolLM2 streaming {args.tokens} tokens through infllm (n_local 2048), one process each")
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for offload in (False, True):
      out = Path(tmp) / f"nll_{offload}.npy"
      began = time.perf_counter()
      child = subprocess.run([sys.executable, __file__, "--run", "--tokens", str(args.tokens), "--segment",
                              str(args.segment), "--out", str(out)] + (["--offload"] if offload else []),
                             capture_output=True, text=True)
      if child.returncode:
        sys.exit(child.stderr[-3000:])
      figures = json.loads(child.stdout.strip().splitlines()[-1])
      figures["seconds"], figures["nll_array"] = time.perf_counter() - began, np.load(out)
      results[offload] = figures
  for offload, f in results.items():
    steady = f["rates"][1:] or f["rates"]
    print(f"{'offload' if offload else 'in-device pool':<15} {np.mean(steady):8.1f} tokens/s (segments 2-; "
          f"{f['seconds']:.0f} s in all), peak RSS {f['rss_mib'] / 1024:.2f} GiB, cache: device {gib(f['device'])}, "
          f"host {gib(f['host'])}; mean NLL {f['nll_array'].mean():.5f} ({f['dtype']} cache, {f['platform']})")
  f = results[True]
  per_chunk = f["fetched_per_chunk_layer"] * f["layers"]
  print(f"offload copies per chunk of 512: {f['fetched_per_chunk_layer']:.2f} blocks per layer in (of top_k 16), "
        f"{per_chunk * f['block_bytes'] / 2**20:.2f} MiB over all layers; out: {f['formed'] / f['chunks']:.2f} "
        f"formed blocks per layer, {f['formed'] * f['layers'] * f['block_bytes'] / f['chunks'] / 2**20:.2f} MiB")
  diff = np.abs(results[True]["nll_array"] - results[False]["nll_array"]).max()
  print(f"largest NLL difference, offload vs in-device: {diff:.2e}")


if __name__ == "__main__":
  main()
