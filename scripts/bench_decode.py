"""Decode tokens/s of SmolLM2 after prompts of 2K ... 64K tokens (jargon.txt): lambda (G=10,
L=8192) and dense through lminf's cache, and transformers' PyTorch model with its KV cache, each
row in its own process (so its peak RSS is its own), plus this machine's memory bandwidth and
lambda's fraction of the bandwidth roofline (bytes a decode step must read: weights + the
window's keys and values). `--methods infllm,...` adds InfLLM (n_local=8192, the paper's other defaults).

    python scripts/bench_decode.py [--lengths 2048,8192,32768,65536] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

JARGON = Path(__file__).resolve().parents[2] / "shared" / "data" / "jargon.txt"


def prompt_ids(length: int) -> np.ndarray:
  from transformers import AutoTokenizer

  from lminf_jax.util.fetch import fetch_smollm2

  tokenizer = AutoTokenizer.from_pretrained(str(fetch_smollm2()))
  ids = tokenizer(JARGON.read_text()[:length * 8], add_special_tokens=False)["input_ids"]
  return np.asarray(ids[:length], np.int32)


def run_lminf(method: str, length: int, new_tokens: int) -> dict:
  import jax
  import jax.numpy as jnp

  from lminf_jax.attention import Dense, InfLLM, Lambda
  from lminf_jax.cache import init_cache
  from lminf_jax.util.fetch import fetch_smollm2
  from lminf_jax.inference.generation import Sampling, decode, left_pad, prefill
  from lminf_jax.loading import load

  config, params, _ = load(fetch_smollm2())
  specs = {"lambda": Lambda(n_global=10, n_local=8192), "dense": Dense(), "infllm": InfLLM(n_local=8192)}
  spec = config.resolve_attention(specs[method])
  ids = prompt_ids(length)
  chunk = spec.feed_chunk(None)
  tokens, positions = (jnp.asarray(x) for x in left_pad([ids.tolist()], chunk))
  cache = init_cache(config, spec, 1, max_len=tokens.shape[1] + new_tokens)
  # Compiles (prefill consumes its cache, so this call gets a copy), then times a second run.
  prefill(params, config, jax.tree.map(jnp.copy, cache), tokens, positions, spec, chunk)[0].block_until_ready()
  start = time.perf_counter()
  logits, cache = prefill(params, config, cache, tokens, positions, spec, chunk)
  logits.block_until_ready()
  prefill_s = time.perf_counter() - start
  args = (params, config, cache, logits, jnp.asarray([len(ids)], jnp.int32), jax.random.PRNGKey(0), spec, Sampling(),
          new_tokens, ())
  # Compiles; decode consumes its cache, so this call gets a copy.
  decode(*args[:2], jax.tree.map(jnp.copy, cache), *args[3:]).tokens_bn.block_until_ready()
  start = time.perf_counter()
  decode(*args).tokens_bn.block_until_ready()
  decode_s = time.perf_counter() - start
  window = len(ids) if method == "dense" else min(len(ids), 8192 + 10)  # (infllm: without its far keys)
  kv_bytes = config.num_layers * window * config.num_kv_heads * config.head_dim * 2 * 4
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return dict(prefill_s=prefill_s, decode_tok_s=new_tokens / decode_s, step_bytes=kv_bytes + weight_bytes)


def run_torch(length: int, new_tokens: int) -> dict:
  import torch
  from transformers import AutoModelForCausalLM

  from lminf_jax.util.fetch import smollm2_gguf

  gguf = smollm2_gguf()
  model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
  ids = torch.as_tensor(prompt_ids(length)[None], dtype=torch.long)
  with torch.no_grad():
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
      out = model(token, past_key_values=past, use_cache=True)
      past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - start
  return dict(prefill_s=prefill_s, decode_tok_s=new_tokens / decode_s)


def bandwidth() -> dict[str, float]:
  """Bytes/s (read + write) of copying a 1 GiB array, best of 5: numpy's memcpy and an XLA copy."""
  import jax
  import jax.numpy as jnp

  def best(copy) -> float:
    copy()
    times = []
    for _ in range(5):
      start = time.perf_counter()
      copy()
      times.append(time.perf_counter() - start)
    return 2 * 2**30 / min(times)

  src, dst = np.ones(2**28, np.float32), np.empty(2**28, np.float32)
  x = jnp.ones(2**28, jnp.float32)
  xla_copy = jax.jit(lambda x: x + 1)
  return {"numpy": best(lambda: np.copyto(dst, src)), "xla": best(lambda: xla_copy(x).block_until_ready())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="2048,8192,32768,65536")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--methods", default="lambda,dense,transformers")
  parser.add_argument("--row", nargs=2, help=argparse.SUPPRESS)  # internal: one (method, length) row
  args = parser.parse_args()
  if args.row:
    method, length = args.row[0], int(args.row[1])
    result = run_torch(length, args.new_tokens) if method == "transformers" else run_lminf(method, length,
                                                                                             args.new_tokens)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    status = Path("/proc/self/status").read_text()
    result["peak_rss_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(result))
    return
  bw = bandwidth()
  roof_bw = max(bw.values())
  print(f"memory bandwidth (1 GiB copy, read + write): numpy {bw['numpy'] / 1e9:.1f} GB/s, "
        f"XLA {bw['xla'] / 1e9:.1f} GB/s; roofline uses the larger")
  print(f"{'prompt':>7} {'method':<12} {'prefill s':>9} {'decode tok/s':>12} {'peak RSS MiB':>12} {'roofline':>8}"
        f" {'vs XLA copy':>11}")
  rows = {}
  for length in [int(x) for x in args.lengths.split(",")]:
    for method in args.methods.split(","):
      cmd = [sys.executable, __file__, "--row", method, str(length), "--new-tokens", str(args.new_tokens)]
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode:
        print(f"{length:>7} {method:<12} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        continue
      r = rows[method, length] = json.loads(done.stdout.strip().splitlines()[-1])
      roof = [f"{r['decode_tok_s'] * r['step_bytes'] / x:.0%}" if "step_bytes" in r else ""
              for x in (roof_bw, bw["xla"])]
      print(f"{length:>7} {method:<12} {r['prefill_s']:>9.1f} {r['decode_tok_s']:>12.2f} {r['peak_rss_mib']:>12.0f} "
            f"{roof[0]:>8} {roof[1]:>11}", flush=True)
    if ("lambda", length) in rows and ("transformers", length) in rows:
      ratio = rows["lambda", length]["decode_tok_s"] / rows["transformers", length]["decode_tok_s"]
      print(f"{length:>7} lambda / transformers decode speed: {ratio:.2f}x", flush=True)


if __name__ == "__main__":
  main()
