"""One accelerator benchmark, in one call: the flash-kernel path (splash on TPU, cuDNN on GPU)
against the XLA path, infllm with its memory blocks in host memory at 1M tokens, and lambda's
streaming throughput.

    python scripts/bench_device.py            # on a GPU or TPU, in bf16 (an estimated 4-6 minutes on an H200)
    python scripts/bench_device.py --small    # anywhere (CPU: splash in interpret mode), small shapes

1. Correctness first, T=1024 (--small: 256), offset 10^6, one left-padded row: each method's
   kernel path (dense, lambda, streaming, selfextend; dca with splash) against its float32 XLA
   path. On a GPU (bf16 only) the bound is the error of one bf16 cuDNN dense call over the same
   keys (T <= n_local) against its float32 result; the merges must be no further off.
2. InfLLM with offload at 1M tokens (--offload-tokens; --small: 8K), SmolLM2's shapes with random
   bf16 weights: a passkey-shaped input fed through the cache in chunks of 512 (n_local 8192, block
   128, top_k 16, 32 blocks on the device): tokens/s, the cache's device and host bytes, the
   device's peak memory (run early, so that the peak is this section's), blocks copied in per chunk
   and layer, bytes copied per chunk. With --smollm2 CKPT (a converted checkpoint), the real
   passkey at that length: found or not. The long section (an estimated 1-3 minutes on an H200).
3. One attention layer, bf16, SmolLM2 (9/3 heads, H=64) and a Llama-3-8B layer (32/8, H=128), at
   T = 32K and 128K: lambda (L=8192 and 4096) through XLA and through the kernel, dense through
   the kernel; at 32K also selfextend (G=8, W=2048) through both and dca (XLA, and splash on a TPU);
   attended (query, key) pairs per second (per query head); lambda-kernel pairs/s over
   dense-kernel pairs/s (goal: >= 0.8).
4. SmolLM2's shapes with random bf16 weights (no checkpoint needed; speed does not depend on
   the weights): token_nll tokens/s at 128K, kernel vs XLA path (lambda L=8192), the prefill of a
   32K prompt and decode tokens/s after it.
5. Lambda's streaming throughput through the cache (`stream_nll`, as `lminf stream-ppl`), SmolLM2's
   shapes, random bf16 weights, over 64K tokens (--small: 2K) after as many of warm-up, and the
   hours it projects for LM-Infinite's 200M-token stream.
Times: compile excluded, best of --repeats (sections 2 and 5: one run, their first call excluded).
Imports nothing of gguf or torch (the accelerator's machine has neither).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.attention import DCA, BandMethod, Dense, InfLLM, Lambda, SelfExtend, Streaming, attend, resolve
from lminf_jax.cache import cache_bytes, check_memory, init_cache
from lminf_jax.eval.passkey import NEW_TOKENS, first_integer, make_sample
from lminf_jax.inference.forward import token_nll
from lminf_jax.inference.generation import Sampling, decode, left_pad, prefill
from lminf_jax.inference.stream import stream_nll
from lminf_jax.loading import load
from lminf_jax.models.config import LlamaConfig, RopeScaling
from lminf_jax.models.llama import Llama
from lminf_jax.positional import Rotary
from lminf_jax.rope import inv_frequencies

SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192, tie_word_embeddings=True, param_dtype="bfloat16",
                      dtype="bfloat16")


def attended_pairs(spec, t: int) -> int:
  """(query, key) pairs one query head attends over a row of t tokens: a band method's band and
  starting keys, every causal pair for the others (selfextend, dca)."""
  i = np.arange(t, dtype=np.int64)
  if not isinstance(spec, BandMethod):
    return int((i + 1).sum())
  band = spec.band()
  local = np.minimum(i + 1, band.window)
  return int((local + np.clip(i - band.window + 1, 0, band.n_start)).sum())


def inputs(t: int, n: int, kv: int, h: int, dtype, pad: int = 0, offset: int = 0, seed: int = 0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((1, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, t, kv, h)), jnp.float32) for _ in range(2))
  pos = jnp.asarray(np.where(np.arange(t) >= pad, np.arange(t) - pad + offset, -1)[None], jnp.int32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), pos


def timed(fn, *args, repeats: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - start)
  return best


def splash_only(kernel: str, items: list) -> list:
  """`items` where `kernel` is splash (dca has no cuDNN path), else none."""
  return items if kernel == "splash" or (kernel == "auto" and jax.default_backend() == "tpu") else []


def layer(spec, h: int):
  pe = Rotary(jnp.asarray(inv_frequencies(h, 500000.0, RopeScaling())))
  return lambda q, k, v, pos: attend(q, k, v, pos, pe, resolve(spec, 8192))


def check(kernel: str, small: bool) -> None:
  t, n, kv, h = (256, 9, 3, 64) if small else (1024, 9, 3, 64)
  half = jax.default_backend() == "gpu"
  dtype = jnp.bfloat16 if half else jnp.float32
  window = t // 4
  f32 = inputs(t, n, kv, h, jnp.float32, pad=t // 8, offset=10**6)
  ours_in = tuple(x.astype(dtype) if x.dtype == jnp.float32 else x for x in f32)
  real = np.asarray(f32[3][0] >= 0)
  errors = {}
  for name, spec in [("dense (T <= n_local)", Dense()), ("lambda", Lambda(n_global=10, n_local=window)),
                     ("streaming", Streaming(n_sink=4, n_recent=window)),
                     ("selfextend", SelfExtend(group_size=4, window_size=window))] + splash_only(kernel, [
                         ("dca", DCA(chunk_size=window, local_window=window // 8))]):
    reference = jax.jit(layer(dataclasses.replace(spec, kernel="xla"), h))(*f32)
    ours = jax.jit(layer(dataclasses.replace(spec, kernel=kernel), h))(*ours_in)
    errors[name] = float(jnp.max(jnp.abs(ours.astype(jnp.float32) - reference)[0][real]))
  print(f"correctness ({jnp.dtype(dtype).name} kernel path vs float32 XLA path, T={t}, offset 10^6, left padding):")
  for name, err in errors.items():
    print(f"  {name:<22} max |diff| {err:.2e}")
  # In bf16 the bound is one bf16 dense kernel call's error, with 10% for the merged output's
  # second rounding to bf16 (the band's output is bf16 already).
  bound = 1.1 * errors["dense (T <= n_local)"] if half else 1e-4
  ok = all(err <= bound for err in errors.values())
  print(f"  bound {bound:.2e} ({'1.1 x one bf16 dense kernel call vs float32' if half else 'float32'}): "
        f"{'PASS' if ok else 'FAIL'}")


@dataclasses.dataclass(frozen=True)
class HalfLse:
  """A kernel whose log-sum-exp is rounded to bf16, as jax.nn.dot_product_attention returns cuDNN's."""

  inner: object

  def __call__(self, *args):
    o, lse = self.inner(*args)
    return o, lse.astype(jnp.bfloat16).astype(jnp.float32)


def lse_precision(small: bool) -> None:
  """The merge's sensitivity to the precision of the band's log-sum-exp, in bf16: a kernel that
  accumulates in float32 (cuDNN on a GPU; elsewhere splash, interpreted) with its float32
  log-sum-exp, and the same rounded to bf16 as jax.nn.dot_product_attention returns cuDNN's."""
  from lminf_jax.attention.kernels import DotProductAttention, Splash

  t, n, kv, h = (256, 9, 3, 64) if small else (1024, 9, 3, 64)
  f32 = inputs(t, n, kv, h, jnp.float32, offset=10**6)
  half = tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in f32)
  pe = Rotary(jnp.asarray(inv_frequencies(h, 500000.0, RopeScaling())))
  kernel = DotProductAttention("cudnn") if jax.default_backend() == "gpu" else Splash(interpret=True)
  print(f"\nmerge precision (bf16 through {kernel}, T={t}; |diff| to the float32 XLA path):")
  for name, spec in [("dense, one call", Dense()), ("lambda L=T/4", Lambda(n_global=10, n_local=t // 4)),
                     ("streaming", Streaming(n_sink=4, n_recent=t // 4))]:
    spec = resolve(spec, 8192)
    reference = spec.xla_attend(*f32, pe)[0]
    diffs = [jnp.abs(spec.kernel_attend(k, *half, pe)[0].astype(jnp.float32) - reference)
             for k in (kernel, HalfLse(kernel))]
    print(f"  {name:<18} float32 lse: max {float(diffs[0].max()):.2e} mean {float(diffs[0].mean()):.2e}   "
          f"bf16 lse: max {float(diffs[1].max()):.2e} mean {float(diffs[1].mean()):.2e}")


def layers(kernel: str, small: bool, repeats: int) -> None:
  shapes = [("SmolLM2", 9, 3, 64), ("Llama-3-8B", 32, 8, 128)]
  lengths = [1024, 2048] if small else [32768, 131072]
  locals_ = [256, 128] if small else [8192, 4096]
  dtype = jnp.float32 if small and jax.default_backend() == "cpu" else jnp.bfloat16
  print(f"\none attention layer ({jnp.dtype(dtype).name}), best of {repeats}, compile excluded:")
  print(f"  {'shape':<22} {'T':>7} {'method':<18} {'path':<7} {'ms':>9} {'Gpairs/s':>9}")
  for family, n, kv, h in shapes:
    if small:  # (a third of the heads, a quarter of the head dim)
      n, kv, h = n // 3 or 1, kv // 3 or 1, h // 4
    label = f"{family} {n}/{kv} H={h}"
    for t in lengths:
      args = inputs(t, n, kv, h, dtype)
      rate = {}
      rows = [(f"lambda L={w}", Lambda(n_global=10, n_local=w), path) for w in locals_ for path in ("xla", kernel)]
      if t <= lengths[0]:  # (O(T^2) on XLA: the shorter length only)
        rows += [("selfextend G=8", SelfExtend(group_size=8), path) for path in ("xla", kernel)]
        rows += [("dca", DCA(), path) for path in ("xla", *splash_only(kernel, [kernel]))]
      for name, spec, path in rows + [("dense", Dense(), kernel)]:
        seconds = timed(layer(dataclasses.replace(spec, kernel=path), h), *args, repeats=repeats)
        rate[name, path] = attended_pairs(resolve(spec, 8192), t) * n / seconds
        print(f"  {label:<22} {t:>7} {name:<18} {path:<7} {seconds * 1e3:>9.2f} {rate[name, path] / 1e9:>9.2f}",
              flush=True)
      for w in locals_:
        print(f"  {label:<22} {t:>7} lambda L={w} kernel pairs/s over dense kernel pairs/s: "
              f"{rate[f'lambda L={w}', kernel] / rate['dense', kernel]:.2f}")


def smollm2(small: bool) -> tuple[LlamaConfig, dict]:
  """SmolLM2's config and random weights (--small: 2 layers, a 512-token vocabulary, float32)."""
  config = SMOLLM2
  if small:
    config = dataclasses.replace(config, num_layers=2, vocab_size=512, dtype="float32", param_dtype="float32")
  params = Llama(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return config, jax.tree.map(lambda x: x.astype(config.param_dtype), params)


def model(kernel: str, small: bool, repeats: int) -> None:
  config, params = smollm2(small)
  t_nll, t_prompt, new = (512, 256, 8) if small else (131072, 32768, 32)
  n_local = 128 if small else 8192
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, t_nll)), jnp.int32)
  print(f"\nSmolLM2 shapes, random {config.param_dtype} weights: token_nll over {t_nll} tokens (lambda L={n_local}):")
  rate = {}
  for path in ("xla", kernel):
    spec = Lambda(n_global=10, n_local=n_local, kernel=path)
    seconds = timed(lambda p, x: token_nll(p, config, x, attention=spec), params, tokens, repeats=repeats)
    rate[path] = t_nll / seconds
    print(f"  {path:<7} {rate[path]:>10.0f} tokens/s", flush=True)
  print(f"  kernel / xla: {rate[kernel] / rate['xla']:.2f}")
  spec = config.resolve_attention(Lambda(n_global=10, n_local=n_local, kernel=kernel))
  chunk = spec.feed_chunk(None)
  ids = np.asarray(tokens[0, :t_prompt])
  prompt, positions = (jnp.asarray(x) for x in left_pad([ids.tolist()], chunk))
  cache = init_cache(config, spec, 1, max_len=prompt.shape[1] + new)
  prefill(params, config, jax.tree.map(jnp.copy, cache), prompt, positions, spec, chunk)[0].block_until_ready()
  start = time.perf_counter()
  logits, cache = prefill(params, config, cache, prompt, positions, spec, chunk)
  logits.block_until_ready()
  print(f"  prefill of a {t_prompt}-token prompt: {time.perf_counter() - start:.2f} s "
        f"({'one-shot through the kernel' if spec.prefill_one_shot(config.dtype) else f'chunks of {chunk} on XLA'})")
  args = (params, config, cache, logits, jnp.asarray([t_prompt], jnp.int32), jax.random.PRNGKey(0), spec,
          Sampling(), new, ())
  decode(*args[:2], jax.tree.map(jnp.copy, cache), *args[3:]).tokens_bn.block_until_ready()  # compiles
  start = time.perf_counter()
  decode(*args).tokens_bn.block_until_ready()
  print(f"  decode after a {t_prompt}-token prompt: {new / (time.perf_counter() - start):.1f} tokens/s (lambda, cached)")


def size(nbytes: float) -> str:
  return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def passkey_ids(length: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
  """A passkey-shaped prompt of `length` random token ids: a prefix, one filler sentence repeated,
  a needle at a random depth, the question (random weights read no text; the shape is the point)."""
  prefix, filler, needle, question = (rng.integers(0, vocab, n) for n in (30, 24, 16, 10))
  body = np.resize(filler, length - len(prefix) - len(needle) - len(question))
  at = int(rng.uniform() * len(body))
  return np.concatenate([prefix, body[:at], needle, body[at:], question]).astype(np.int32)


def offloaded(small: bool, total: int, offload: bool, checkpoint: str | None) -> None:
  """Section 2: infllm (blocks in host memory if `offload`) fed `total` passkey-shaped tokens."""
  if checkpoint:
    config, params, tokenizer = load(checkpoint, "bfloat16")
    config = dataclasses.replace(config, dtype="bfloat16")
    sample = make_sample(tokenizer, total, np.random.default_rng(0))
    ids, weights = sample.token_ids, f"checkpoint {checkpoint}"
  else:
    config, params = smollm2(small)
    ids = passkey_ids(total, config.vocab_size, np.random.default_rng(0))
    weights = f"random {config.param_dtype} weights"
  # --small: a window and pool that 8K tokens fill, so that blocks are formed, selected and fetched.
  shape = dict(n_local=1024, top_k=4, chunk=256) if small else dict(top_k=16, chunk=512)
  placement = dict(offload=True, device_blocks=8 if small else 32) if offload else {}
  spec = config.resolve_attention(InfLLM(block_size=128, **shape, **placement))
  chunk = spec.feed_chunk(None)
  tokens, positions = left_pad([list(ids)], chunk)
  length = tokens.shape[1]
  segment = max(chunk, min(32768, length // 4) // chunk * chunk)
  print(f"\ninfllm {'with offload' if offload else 'on the device'} at {len(ids)} tokens, SmolLM2 "
        f"({weights}; n_local {spec.n_local}, block {spec.block_size}, top_k {spec.top_k}, "
        f"{f'device_blocks {spec.device_blocks}, ' if offload else ''}chunk {chunk}):")
  max_len = length + NEW_TOKENS
  check_memory(config, spec, max_len)
  device_b, host_b = cache_bytes(config, spec, max_len)
  print(f"  cache: device {size(device_b)}, host {size(host_b)} (cache_bytes)", flush=True)
  cache = init_cache(config, spec, 1, max_len=max_len)
  seconds, fed = [], []
  for start in range(0, length, segment):
    at = slice(start, start + segment)
    began = time.perf_counter()
    logits, cache = prefill(params, config, cache, tokens[:, at], positions[:, at], spec, chunk)
    logits.block_until_ready()
    seconds.append(time.perf_counter() - began)
    fed.append(tokens[:, at].shape[1])
  steady = [(n, t) for i, (n, t) in enumerate(zip(fed, seconds)) if i and n == segment]
  rate = sum(n for n, _ in steady) / sum(t for _, t in steady) if steady else float("nan")
  print(f"  feed: {rate:>10.0f} tokens/s over calls 2-{len(steady) + 1} of {segment} tokens (the first, compile "
        f"included: {seconds[0]:.1f} s; all {length} tokens: {sum(seconds):.1f} s)", flush=True)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"  device memory: peak {size(stats['peak_bytes_in_use'])} (the process's so far), "
          f"in use after feeding {size(stats['bytes_in_use'])}")
  else:
    print(f"  device memory: no memory_stats on {jax.devices()[0].platform}; the cache's device arrays "
          f"{size(device_b)}")
  chunks, layers_ = length // chunk, config.num_layers
  block = 2 * config.num_kv_heads * spec.block_size * config.head_dim * jnp.dtype(config.dtype).itemsize  # k + v
  formed = int(np.asarray(cache.shared).sum())
  held = getattr(cache.kv.extra, "held", None)
  if offload and held is not None:
    fetched = int(np.asarray(held.fetched_b).sum())
    print(f"  blocks copied in per chunk per layer: {fetched / chunks / layers_:.2f} (of top_k {spec.top_k}; "
          f"{fetched} in {chunks} chunks x {layers_} layers)")
    print(f"  bytes copied per chunk (all layers): in {size(fetched * block / chunks)}, out (formed blocks) "
          f"{size(formed * layers_ * block / chunks)}")
  else:
    print(f"  blocks copied: none (no offload; {formed} blocks formed)")
  if checkpoint:
    out = decode(params, config, cache, logits, jnp.asarray([len(ids)], jnp.int32), jax.random.PRNGKey(0), spec,
                 Sampling(), NEW_TOKENS, ())
    text = tokenizer.decode(np.asarray(out.tokens_bn[0]).tolist())
    found = first_integer(text) == sample.key
    print(f"  passkey {sample.key} at depth {sample.depth:.2f}: generated {text!r}: "
          f"{'found' if found else 'NOT found'}")


def streaming(small: bool, tokens: int) -> None:
  """Section 5: lambda's streaming throughput (`stream_nll`): the first `tokens` warm up (compile,
  filling the window), the next `tokens` are timed."""
  config, params = smollm2(small)
  spec = config.resolve_attention(Lambda(n_local=256) if small else Lambda())
  chunk = spec.feed_chunk(None)
  total = 2 * tokens
  ids = np.random.default_rng(0).integers(0, config.vocab_size, total)
  rates = []
  stream_nll(params, config, init_cache(config, spec, 1, max_len=total),
             (ids[i:i + chunk] for i in range(0, total, chunk)), total, spec, tokens,
             lambda index, nll, rate, rss: rates.append(rate))
  print(f"\nlambda streaming through the cache (stream_nll, SmolLM2 shapes, random {config.param_dtype} weights, "
        f"n_local {spec.n_local}, chunk {chunk}):")
  print(f"  {rates[1]:>10.0f} tokens/s over {tokens} tokens after {tokens} of warm-up")
  print(f"  LM-Infinite's 200M-token stream at this rate: {200e6 / rates[1] / 3600:.1f} h")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="small shapes (runs on a CPU in interpret mode)")
  parser.add_argument("--kernel", default=None, help="kernel path to test (default: auto; --small on CPU: splash)")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--offload-tokens", type=int, default=None,
                      help="tokens fed to infllm with offload (default: 1048576; --small: 8192)")
  parser.add_argument("--no-offload", dest="offload", action="store_false",
                      help="infllm's section with its memory blocks on the device")
  parser.add_argument("--smollm2", metavar="CKPT", default=None,
                      help="a converted SmolLM2 checkpoint: run the real passkey at --offload-tokens")
  parser.add_argument("--stream-tokens", type=int, default=None,
                      help="tokens timed through lambda's cache (default: 65536; --small: 2048)")
  args = parser.parse_args()
  kernel = args.kernel or ("splash" if args.small and jax.default_backend() == "cpu" else "auto")
  print(f"devices: {jax.devices()}  kernel path: {kernel}")
  start = time.perf_counter()
  check(kernel, args.small)
  lse_precision(args.small)
  offloaded(args.small, args.offload_tokens or (8192 if args.small else 1048576), args.offload, args.smollm2)
  layers(kernel, args.small, args.repeats)
  model(kernel, args.small, args.repeats)
  streaming(args.small, args.stream_tokens or (2048 if args.small else 65536))
  print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
