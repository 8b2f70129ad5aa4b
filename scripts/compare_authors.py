"""Self-Extend and dual chunk attention against their authors' code (LongLM, ChunkLlama), on CPU.

    python scripts/compare_authors.py --longlm LONGLM --chunkllama CHUNKLLAMA \
        --py438 /tmp/v-authors438/bin/python --py440 /tmp/v-authors/bin/python [--json OUT]

LONGLM and CHUNKLLAMA are checkouts of datamllab/LongLM (cdbbb06) and HKUNLP/ChunkLlama (2add4d7);
only their .py files are read, from there (nothing of theirs is in this repo). Their code patches
the old transformers it was written for; each runs in a venv of its own that borrows torch from
this one (run with this repo's python; the .pth puts its packages after the old transformers):

    for v in 438:4.38.2 440:4.40.2; do
      python3.11 -m venv /tmp/v-authors${v%%:*}
      /tmp/v-authors${v%%:*}/bin/pip install transformers==${v#*:}
      python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        > /tmp/v-authors${v%%:*}/lib/python3.11/site-packages/zz_torch.pth
    done

LongLM's `self_extend_patch/Llama.py` needs 4.38.2 (its README's version: it passes `seq_len` to
the rotary embedding, which 4.39 dropped); `Llama_4_40.py` runs under both (its eager decode only
under 4.38.2, whose full-size causal mask it indexes); ChunkLlama under 4.40.2 (its decode checks
the mask's shape, which 4.38's full-size mask fails).

One command does it all (about 3 minutes on 2 shared CPU cores):
1. writes a tiny random Llama (GQA: 2 layers, 4 query / 2 kv heads, head dim 16,
   max_position_embeddings 32, seeded) as an HF dir (model.safetensors + config.json), from numpy;
2. runs, in each old-transformers python (`--authors-side`), the authors' patched model in float32
   and float64: one-shot and through its cache (a one-shot prefill, then one token per call; and
   several tokens per call, recorded when it raises), and writes the logits to an npz.
   `flash_attn` (and `triton`, which LongLM's package imports) are modules put in sys.modules:
   `flash_attn_func` is exact softmax attention with flash-attn's bottom-right causal alignment
   and window, returning the log-sum-exp as flash-attn does with return_attn_probs=True; LongLM's
   flash path runs through its own SelfExtend.apply on LlamaFlashAttention2 modules;
3. in this python: a float64 numpy Llama with each method's rule written out (the position of the
   query and of the key for every pair (i, j), docs/semantics.md), and lminf-jax's logits
   (one-shot, cached OUR_CHUNK tokens at a time, and a prefill then decode); prints max |diff| of
   logits, of log-softmax and of next-token NLL (max and mean) for each comparison.

Float64 runs are float64 throughout: transformers' RMSNorm and RoPE, the float32 softmax upcasts,
the float32 logits of LlamaForCausalLM (the head is applied here), ChunkLlama's float32 RoPE tables
and float32 casts are lifted to float64 in that process (ChunkLlama's tables also run once as built,
'f32 tables'). ChunkLlama without mscale has `get_mscale` patched to return 1; its bfloat16 merge
runs as written, and once with the weights left unrounded ('unrounded merge').
`--skip-ours` leaves lminf-jax out (the authors' code against the float64 rule only).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np

CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=32, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
LENGTH = 112     # tokens compared (3.5x max_position_embeddings)
PREFILL = 40     # the cached runs' one-shot prefill, then one token per call
SE_CASES = ((4, 8), (3, 8))           # (group_size G, window_size W): G divides W, and not
DCA_CASE = dict(chunk_size=24, local_window=4)  # ChunkLlama's defaults for a 32-token model (3/4, 1/8)
OUR_CHUNK = 7    # lminf-jax's cached run: chunks of 7 tokens (crossing every boundary)


# --- the model: numpy weights, an HF dir, a float64 forward -----------------------------------------------

def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named float32 weights of the tiny Llama; projections large enough that attention is not flat."""
  rng = np.random.default_rng(seed)
  c = CONFIG
  d, f, h, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
  n, k = c["num_attention_heads"], c["num_key_value_heads"]
  normal = lambda *shape, std: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
  w = {"model.embed_tokens.weight": normal(v, d, std=1.0), "model.norm.weight": 1 + normal(d, std=0.1),
       "lm_head.weight": normal(v, d, std=0.2)}
  for layer in range(c["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    w.update({p + "self_attn.q_proj.weight": normal(n * h, d, std=0.25),
              p + "self_attn.k_proj.weight": normal(k * h, d, std=0.25),
              p + "self_attn.v_proj.weight": normal(k * h, d, std=0.2),
              p + "self_attn.o_proj.weight": normal(d, n * h, std=0.1),
              p + "mlp.gate_proj.weight": normal(f, d, std=0.15), p + "mlp.up_proj.weight": normal(f, d, std=0.15),
              p + "mlp.down_proj.weight": normal(d, f, std=0.1),
              p + "input_layernorm.weight": 1 + normal(d, std=0.1),
              p + "post_attention_layernorm.weight": 1 + normal(d, std=0.1)})
  return w


def write_hf_dir(out: Path, seed: int = 0) -> None:
  """model.safetensors + config.json of the tiny Llama."""
  from safetensors.numpy import save_file

  out.mkdir(parents=True, exist_ok=True)
  save_file(make_weights(seed), str(out / "model.safetensors"), metadata={"format": "pt"})
  config = dict(CONFIG, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                torch_dtype="float32", attention_bias=False, bos_token_id=1, eos_token_id=2, pretraining_tp=1)
  (out / "config.json").write_text(json.dumps(config, indent=2))


def tokens(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], size=LENGTH)


class Rule(NamedTuple):
  """Every pair's positions under a method: logit(i, j) = scale_ij (R_{pq_ij} q_i).(R_{pk_ij} k_j) / sqrt(H)."""
  pq_tt: np.ndarray
  pk_tt: np.ndarray
  scale_tt: np.ndarray


def selfextend_rule(t: int, group: int, window: int, float_shift: bool = False) -> Rule:
  """Neighbours i-j < W at their positions; the rest at i//G + W - W//G and j//G (W - W/G if float_shift)."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  shift = window - (window / group if float_shift else window // group)
  near = i - j < window
  return Rule(np.where(near, i, i // group + shift).astype(np.float64),
              np.broadcast_to(np.where(near, j, j // group), (t, t)).astype(np.float64), np.ones((t, t)))


def mscale(scale: float) -> float:
  """ChunkLlama's (and YaRN's) attention factor for a length `scale` times the training length."""
  return 1.0 if scale <= 1 else 0.05 * math.log(scale) + 1.0


def dca_rule(t: int, chunk_size: int, local_window: int, mscale_of=None) -> Rule:
  """Key j at j mod c; query i at i mod c (same chunk), min(i mod c + c, chunk_size) (the chunk before),
  min(2c - 1, chunk_size) (earlier chunks). `mscale_of(i)` [T] scales query i's and key j's rotations."""
  c = chunk_size - local_window
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  a, b = i // c, j // c
  pq = np.where(b == a, i % c, np.where(b == a - 1, np.minimum(i % c + c, chunk_size), min(2 * c - 1, chunk_size)))
  m = np.ones(t) if mscale_of is None else np.asarray([mscale_of(p) for p in range(t)])
  return Rule(pq.astype(np.float64), np.broadcast_to(j % c, (t, t)).astype(np.float64), m[:, None] * m[None, :])


def rope64(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
  """Half-split RoPE in float64: x [..., H] at positions pos (broadcast to x.shape[:-1])."""
  h = x.shape[-1]
  ang = pos[..., None] * (1.0 / theta ** (np.arange(0, h, 2) / h))
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def reference_logits(weights: dict[str, np.ndarray], ids: np.ndarray, rule: Rule) -> np.ndarray:
  """Float64 logits [T, V] of the tiny Llama with attention by `rule` (causal, one softmax per query)."""
  c = CONFIG
  w = {name: a.astype(np.float64) for name, a in weights.items()}
  n, k, h = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
  t = len(ids)
  norm = lambda x, g: g * x / np.sqrt((x * x).mean(-1, keepdims=True) + c["rms_norm_eps"])  # noqa: E731
  causal = np.tril(np.ones((t, t), bool))
  x = w["model.embed_tokens.weight"][ids]
  for layer in range(c["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    y = norm(x, w[p + "input_layernorm.weight"])
    q_tnh = (y @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n, h)
    k_tkh = np.repeat((y @ w[p + "self_attn.k_proj.weight"].T).reshape(t, k, h), n // k, axis=1)
    v_tkh = np.repeat((y @ w[p + "self_attn.v_proj.weight"].T).reshape(t, k, h), n // k, axis=1)
    # every (i, j) pair rotates q_i and k_j at its own positions: [T, T, N, H]
    qr = rope64(np.broadcast_to(q_tnh[:, None], (t, t, n, h)), rule.pq_tt[:, :, None], c["rope_theta"])
    kr = rope64(np.broadcast_to(k_tkh[None], (t, t, n, h)), rule.pk_tt[:, :, None], c["rope_theta"])
    s_nij = np.einsum("ijnh,ijnh->nij", qr, kr) * rule.scale_tt / math.sqrt(h)
    s_nij = np.where(causal, s_nij, -np.inf)
    p_nij = np.exp(s_nij - s_nij.max(-1, keepdims=True))
    p_nij /= p_nij.sum(-1, keepdims=True)
    o = np.einsum("nij,jnh->inh", p_nij, v_tkh).reshape(t, n * h)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    y = norm(x, w[p + "post_attention_layernorm.weight"])
    gate = y @ w[p + "mlp.gate_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
  return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


# --- the authors' side (old transformers, torch) -------------------------------------------------------------

def install_stubs() -> None:
  """`flash_attn` as exact attention in torch, and an inert `triton` (LongLM's package imports its kernels)."""
  import torch

  def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                      alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Sq, N, H], k/v [B, Sk, K, H] -> out [B, Sq, N, H] (and lse [B, N, Sq], None), flash-attn's masks:
    query i sits at key index i + Sk - Sq (bottom-right), window (left, right) around it."""
    assert dropout_p == 0.0 and alibi_slopes is None
    sq, sk, n = q.shape[1], k.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(n // x.shape[2], dim=2) for x in (k, v))
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqnh,bknh->bnqk", q.to(work), k.to(work)) * (softmax_scale or q.shape[-1] ** -0.5)
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
      allowed &= j <= i
    if window_size[0] >= 0:
      allowed &= j >= i - window_size[0]
    if window_size[1] >= 0:
      allowed &= j <= i + window_size[1]
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]))
    out = torch.einsum("bnqk,bknh->bqnh", p, v.to(work)).to(q.dtype)
    return (out, lse, None) if return_attn_probs else out

  def unavailable(*args, **kwargs):
    raise NotImplementedError("not stubbed: the comparison never calls it")

  flash = types.ModuleType("flash_attn")
  iface = types.ModuleType("flash_attn.flash_attn_interface")
  for mod in (flash, iface):
    mod.flash_attn_func = flash_attn_func
    mod.flash_attn_varlen_func = mod.flash_attn_qkvpacked_func = mod.flash_attn_with_kvcache = unavailable
  flash.flash_attn_interface = iface
  triton = types.ModuleType("triton")
  triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
  triton.heuristics = triton.autotune = lambda *a, **kw: (lambda f: f)
  triton.cdiv = lambda a, b: -(-a // b)
  language = types.ModuleType("triton.language")
  language.__getattr__ = lambda name: object()
  triton.language = language
  stubs = {"flash_attn": flash, "flash_attn.flash_attn_interface": iface, "triton": triton, "triton.language": language}
  for name, mod in stubs.items():  # a spec but no distribution: transformers still finds no flash-attn installed
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
  sys.modules.update(stubs)


def lift_to_float64() -> None:
  """transformers' RMSNorm and RoPE, and softmax's float32 upcast, in the input's precision when it is float64."""
  import torch
  from transformers.models.llama import modeling_llama as ml

  def rms_norm(self, x):
    if x.dtype != torch.float64:
      return rms_norm.stock(self, x)
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

  def rotary(self, x, position_ids, seq_len=None):
    if x.dtype != torch.float64:
      return rotary.stock(self, x, position_ids)
    inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()

  rms_norm.stock, rotary.stock = ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward
  ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward = rms_norm, rotary
  stock_softmax = torch.nn.functional.softmax

  def softmax(x, dim=None, _stacklevel=3, dtype=None):
    return stock_softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

  torch.nn.functional.softmax = softmax


def load_model(hf_dir: Path, dtype):
  import torch
  from transformers import LlamaForCausalLM

  model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=dtype, attn_implementation="eager").eval()
  if hasattr(model.model, "causal_mask"):  # transformers 4.38: its mask buffer grows only with a long input
    model.model.register_buffer("causal_mask", torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1),
                                persistent=False)
  return model


def as_flash_attention(model) -> None:
  """The eager attention modules become LlamaFlashAttention2 (flash_attn is the stub), as a model loaded
  with attn_implementation='flash_attention_2' would have them."""
  from transformers.models.llama.modeling_llama import LlamaFlashAttention2

  for layer in model.model.layers:
    layer.self_attn.__class__ = LlamaFlashAttention2
    layer.self_attn._flash_attn_uses_top_left_mask = False
  model.config._attn_implementation = "flash_attention_2"


def run_model(model, ids: np.ndarray, prefill: int | None, chunk: int = 1) -> np.ndarray:
  """Logits [T, V] (float64 numpy): one-shot if prefill is None, else a one-shot prefill of `prefill`
  tokens and then `chunk` tokens per call through the cache. The head is applied here, in the model's
  dtype (LlamaForCausalLM casts its logits to float32)."""
  import torch

  ids_bt = torch.as_tensor(ids)[None]
  with torch.no_grad():
    if prefill is None:
      hidden = [model.model(input_ids=ids_bt, use_cache=False).last_hidden_state]
    else:
      out = model.model(input_ids=ids_bt[:, :prefill], attention_mask=torch.ones(1, prefill, dtype=torch.long),
                        use_cache=True)
      hidden, past = [out.last_hidden_state], out.past_key_values
      for s in range(prefill, len(ids), chunk):
        e = min(s + chunk, len(ids))
        out = model.model(input_ids=ids_bt[:, s:e], attention_mask=torch.ones(1, e, dtype=torch.long),
                          past_key_values=past, use_cache=True)
        hidden.append(out.last_hidden_state)
        past = out.past_key_values
    return model.lm_head(torch.cat(hidden, dim=1))[0].double().numpy()


def attempt(out: dict, tag: str, run) -> None:
  """out[tag] = run(), or out[tag + '/raises'] = the error it raised."""
  try:
    out[tag] = run()
  except Exception as err:  # noqa: BLE001  (the authors' code failing is a finding, recorded)
    out[tag + "/raises"] = np.array(f"{type(err).__name__}: {err}"[:300])


def longlm_runs(longlm: Path, hf_dir: Path, ids: np.ndarray, files: list[str], tf: str) -> dict[str, np.ndarray]:
  """LongLM's Llama patches (eager and flash, via its SelfExtend.apply) for each (G, W) and dtype: one-shot,
  a prefill then one token per call, and (recorded if it raises) 4 tokens per call."""
  import importlib

  import torch

  sys.path.insert(0, str(longlm))
  import SelfExtend  # LongLM's own entry point
  import self_extend_patch as se

  out = {}
  for file in files:
    se.Llama = importlib.import_module(f"self_extend_patch.{file}")  # README: Llama_4_40.py replaces Llama.py
    for (group, window) in SE_CASES:
      for dtype in (torch.float32, torch.float64):
        for flash in (False, True):
          model = load_model(hf_dir, dtype)
          if flash:
            as_flash_attention(model)
          SelfExtend.apply(model, group, window, enable_flash_attention=flash, flash_attention_impl="flash_attn")
          tag = f"se/{tf}/{file}/{'flash' if flash else 'eager'}/G{group}W{window}/{str(dtype)[6:]}"
          attempt(out, tag + "/oneshot", lambda: run_model(model, ids, None))
          attempt(out, tag + "/cached", lambda: run_model(model, ids, PREFILL))
          attempt(out, tag + "/cached4", lambda: run_model(model, ids, PREFILL, chunk=4))
  return out


class TorchWith:
  """`torch` with some dtypes read as others: put in ChunkLlama's module namespace to lift its float32
  and bfloat16 casts (its merge weights, chunkllama_attn_replace.py:101/108) in one run."""

  def __init__(self, torch, **dtypes):
    self._torch, self._dtypes = torch, dtypes

  def __getattr__(self, name):
    return self._dtypes[name] if name in self._dtypes else getattr(self._torch, name)


def chunkllama_runs(chunkllama: Path, hf_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
  """ChunkLlama's patch, with its mscale and with get_mscale patched to return 1: one-shot, one token
  per call, and a prefill then 1, 5 (calls within one chunk: 40 + 5k never crosses a multiple of
  c = 20) or 6 tokens per call (calls that cross chunk boundaries); the one-shot again with its merge
  weights left unrounded ('oneshot_exact_merge'). The float64 runs build its RoPE tables in float64 (its `.float()` calls read as `.double()` while it
  builds them) and read its float32 casts as float64; 'tokens_f32_tables' keeps its float32 tables."""
  import torch

  sys.path.insert(0, str(chunkllama))
  import chunkllama_attn_replace as cl

  stock_mscale, stock_tables = cl.get_mscale, cl.ChunkLlamaRotaryEmbedding._set_cos_sin_cache
  lifted = {"tables": False}

  def tables(self, seq_len, device, dtype):
    if not lifted["tables"]:
      return stock_tables(self, seq_len, device, dtype)
    to_float = torch.Tensor.float
    torch.Tensor.float = torch.Tensor.double
    try:
      stock_tables(self, seq_len, device, torch.float64)
    finally:
      torch.Tensor.float = to_float

  cl.ChunkLlamaRotaryEmbedding._set_cos_sin_cache = tables

  def setup(dtype, exact_merge: bool = False, f64_tables: bool = True) -> None:
    wide = {"float32": torch.float64} if dtype == torch.float64 else {}
    cl.torch = TorchWith(torch, **wide, **({"bfloat16": dtype} if exact_merge else {}))
    lifted["tables"] = dtype == torch.float64 and f64_tables

  out = {}
  for with_mscale in (False, True):
    cl.get_mscale = stock_mscale if with_mscale else (lambda scale=1: 1.0)
    cl.replace_with_chunkllama(pretraining_length=CONFIG["max_position_embeddings"])
    assert (cl.chunk_size, cl.local_window) == (DCA_CASE["chunk_size"], DCA_CASE["local_window"])
    for dtype in (torch.float32, torch.float64):
      tag = f"dca/{'mscale' if with_mscale else 'nomscale'}/{str(dtype)[6:]}"
      # a fresh model per run: its rotary tables (and their mscale) keep the longest length seen
      fresh = lambda: load_model(hf_dir, dtype)  # noqa: E731
      setup(dtype)
      attempt(out, tag + "/oneshot", lambda: run_model(fresh(), ids, None))
      attempt(out, tag + "/tokens", lambda: run_model(fresh(), ids, 1))
      attempt(out, tag + "/cached", lambda: run_model(fresh(), ids, PREFILL))
      attempt(out, tag + "/cached5", lambda: run_model(fresh(), ids, PREFILL, chunk=5))
      attempt(out, tag + "/cached6", lambda: run_model(fresh(), ids, PREFILL, chunk=6))
      setup(dtype, exact_merge=True)
      attempt(out, tag + "/oneshot_exact_merge", lambda: run_model(fresh(), ids, None))
      if dtype == torch.float64 and not with_mscale:
        setup(dtype, f64_tables=False)
        attempt(out, tag + "/tokens_f32_tables", lambda: run_model(fresh(), ids, 1))
  cl.torch = torch
  return out


def authors_side(args) -> None:
  import torch
  import transformers

  torch.manual_seed(0)
  install_stubs()
  lift_to_float64()
  ids = np.load(args.hf_dir / "tokens.npy")
  out = {"transformers": np.array(transformers.__version__)}
  if args.longlm_files:
    out.update(longlm_runs(args.longlm, args.hf_dir, ids, args.longlm_files.split(","), transformers.__version__))
  if args.chunkllama:
    out.update(chunkllama_runs(args.chunkllama, args.hf_dir, ids))
  np.savez(args.out, **out)


# --- lminf-jax and the comparison ---------------------------------------------------------------------------

def ours(hf_dir: Path, ids: np.ndarray, spec) -> dict[str, np.ndarray]:
  """lminf-jax logits [T, V]: one-shot, cached OUR_CHUNK tokens at a time, and a prefill then decode."""
  import jax.numpy as jnp

  from lminf_jax.cache import init_cache
  from lminf_jax.inference.forward import forward, forward_cached
  from lminf_jax.loading import load

  config, params, _ = load(hf_dir)
  t = len(ids)
  tokens_bt = jnp.asarray(ids, jnp.int32)[None]
  positions_bt = jnp.arange(t, dtype=jnp.int32)[None]

  def cached(bounds: list[int]) -> np.ndarray:
    cache, logits = init_cache(config, spec, 1, max_len=t), []
    for s, e in zip(bounds[:-1], bounds[1:]):
      step, cache = forward_cached(params, config, cache, tokens_bt[:, s:e], positions_bt[:, s:e], spec)
      logits.append(np.asarray(step[0], np.float64))
    return np.concatenate(logits)

  return {"oneshot": np.asarray(forward(params, config, tokens_bt, attention=spec)[0], np.float64),
          "chunked": cached(list(range(0, t, OUR_CHUNK)) + [t]),
          "decode": cached([0] + list(range(PREFILL, t + 1)))}


def log_softmax(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def diff(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> dict[str, float]:
  """Max |a - b| of logits and of log-softmax, and max and mean |difference| of next-token NLL."""
  la, lb = log_softmax(a), log_softmax(b)
  dnll = np.abs(la - lb)[np.arange(len(ids) - 1), ids[1:]]
  return {"logits": float(np.abs(a - b).max()), "log_softmax": float(np.abs(la - lb).max()),
          "nll_max": float(dnll.max()), "nll_mean": float(dnll.mean())}


def report(runs: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, dict]:
  """Prints each comparison (max |diff| of logits / log-softmax / next-token NLL, max and mean) and
  returns them keyed 'run | reference' (a run that raised: {'raises': message})."""
  results = {}

  def run(name: str, tag: str, against: list[tuple[str, str]]) -> None:
    if tag + "/raises" in runs:
      print(f"  {name:<46} raises {runs[tag + '/raises']}")
      results[tag] = {"raises": str(runs[tag + "/raises"])}
    elif tag in runs:
      for what, ref in against:
        if ref in runs:
          d = results[f"{tag} | {ref}"] = diff(runs[tag], runs[ref], ids)
          print(f"  {name + ' vs ' + what:<72} logits {d['logits']:8.2e}  log-softmax {d['log_softmax']:8.2e}  "
                f"NLL max {d['nll_max']:8.2e} mean {d['nll_mean']:8.2e}")

  modes = {"oneshot": "one-shot", "cached": f"prefill {PREFILL} + 1/call", "cached4": f"prefill {PREFILL} + 4/call",
           "tokens": "1 token/call", "cached5": f"prefill {PREFILL} + 5/call",
           "cached6": f"prefill {PREFILL} + 6/call", "chunked": f"{OUR_CHUNK}/call",
           "oneshot_exact_merge": "one-shot, unrounded merge", "tokens_f32_tables": "1 token/call, f32 tables",
           "decode": f"prefill {PREFILL} + decode"}
  versions = sorted({name.split("/")[1] for name in runs if name.startswith("se/")})
  for group, window in SE_CASES:
    case = f"G{group}W{window}"
    rule, rule_float = f"rule/se/{case}", f"rule/se/{case}/float"
    print(f"\nSelf-Extend G={group} W={window} ({LENGTH} tokens, max_position_embeddings "
          f"{CONFIG['max_position_embeddings']}; rule: shift W - W//G = {window - window // group}, "
          f"float shift W - W/G = {window - window / group:.4f})")
    for tf in versions:
      for file in ("Llama", "Llama_4_40"):
        for path in ("eager", "flash"):
          for mode in ("oneshot", "cached", "cached4"):
            tag, who = f"se/{tf}/{file}/{path}/{case}", f"{file}.py {path} ({tf}) {modes[mode]}"
            run(f"{who} f64", f"{tag}/float64/{mode}", [("rule (//) f64", rule), ("rule (W - W/G) f64", rule_float)])
            ours_mode = "oneshot" if mode == "oneshot" else "decode"
            run(f"{who} f32", f"{tag}/float32/{mode}", [(f"ours {modes[ours_mode]}", f"ours/se/{case}/{ours_mode}")])
    for mode in ("oneshot", "chunked", "decode"):
      run(f"ours {modes[mode]} f32", f"ours/se/{case}/{mode}", [("rule (//) f64", rule)])
  print(f"\nDual chunk attention chunk_size={DCA_CASE['chunk_size']} local_window={DCA_CASE['local_window']} "
        f"(c = {DCA_CASE['chunk_size'] - DCA_CASE['local_window']}, {LENGTH} tokens, max_position_embeddings "
        f"{CONFIG['max_position_embeddings']})")
  for ms in ("nomscale", "mscale"):
    rule = "rule/dca" if ms == "nomscale" else "rule/dca/mscale"
    print(f"  -- {'get_mscale patched to return 1; ours mscale=False' if ms == 'nomscale' else 'stock get_mscale; ours mscale=True'}"
          f"{'' if ms == 'nomscale' else ' (rule: mscale((i+1)/M) mscale((j+1)/M) on logit (i, j))'}")
    for mode in ("tokens", "tokens_f32_tables", "cached", "cached5", "cached6", "oneshot", "oneshot_exact_merge"):
      against = [("rule f64", rule)]
      if ms == "mscale" and mode.startswith("oneshot"):
        against.append(("rule f64 with mscale(T/M) for all", "rule/dca/mscale_oneshot"))
      if not mode.startswith("tokens"):
        against.append(("its 1 token/call f64", f"dca/{ms}/float64/tokens"))
      run(f"ChunkLlama {modes[mode]} f64", f"dca/{ms}/float64/{mode}", against)
      ours_mode = "oneshot" if mode.startswith("oneshot") else "decode"
      run(f"ChunkLlama {modes[mode]} f32", f"dca/{ms}/float32/{mode}",
          [(f"ours {modes[ours_mode]}", f"ours/{ms}/{ours_mode}")])
    for mode in ("oneshot", "chunked", "decode"):
      run(f"ours {modes[mode]} f32", f"ours/{ms}/{mode}", [("rule f64", rule)])
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--longlm", type=Path, help="checkout of datamllab/LongLM")
  parser.add_argument("--chunkllama", type=Path, help="checkout of HKUNLP/ChunkLlama")
  parser.add_argument("--py438", help="python with transformers 4.38.2 (LongLM's Llama.py)")
  parser.add_argument("--py440", help="python with transformers 4.40.2 (LongLM's Llama_4_40.py, ChunkLlama)")
  parser.add_argument("--skip-ours", action="store_true", help="leave lminf-jax out")
  parser.add_argument("--json", type=Path, help="also write the comparisons here")
  parser.add_argument("--authors-side", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
  parser.add_argument("--longlm-files", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.authors_side:
    return authors_side(args)

  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = Path(tmp) / "hf"
    write_hf_dir(hf_dir)
    ids = tokens()
    np.save(hf_dir / "tokens.npy", ids)
    runs: dict[str, np.ndarray] = {}
    jobs = [(args.py438, "Llama,Llama_4_40", None), (args.py440, "Llama_4_40", args.chunkllama)]
    for n, (python, files, chunkllama) in enumerate(jobs):
      if python is None or (args.longlm is None and chunkllama is None):
        continue
      out = Path(tmp) / f"authors{n}.npz"
      cmd = [python, __file__, "--authors-side", "--hf-dir", str(hf_dir), "--out", str(out)]
      if args.longlm is not None:
        cmd += ["--longlm", str(args.longlm.resolve()), "--longlm-files", files]
      if chunkllama is not None:
        cmd += ["--chunkllama", str(chunkllama.resolve())]
      subprocess.run(cmd, check=True)
      with np.load(out) as z:
        print(f"authors' side: {files}{' + ChunkLlama' if chunkllama else ''} under transformers {z['transformers']}")
        runs.update({name: z[name] for name in z.files if name != "transformers"})

    weights = make_weights()
    m = CONFIG["max_position_embeddings"]
    for group, window in SE_CASES:
      runs[f"rule/se/G{group}W{window}"] = reference_logits(weights, ids, selfextend_rule(LENGTH, group, window))
      runs[f"rule/se/G{group}W{window}/float"] = reference_logits(
          weights, ids, selfextend_rule(LENGTH, group, window, float_shift=True))
    runs["rule/dca"] = reference_logits(weights, ids, dca_rule(LENGTH, **DCA_CASE))
    runs["rule/dca/mscale"] = reference_logits(weights, ids, dca_rule(LENGTH, **DCA_CASE,
                                                                      mscale_of=lambda p: mscale((p + 1) / m)))
    runs["rule/dca/mscale_oneshot"] = reference_logits(weights, ids, dca_rule(LENGTH, **DCA_CASE,
                                                                              mscale_of=lambda p: mscale(LENGTH / m)))
    if not args.skip_ours:
      from lminf_jax.attention import DCA, SelfExtend

      for group, window in SE_CASES:
        for mode, logits in ours(hf_dir, ids, SelfExtend(group_size=group, window_size=window)).items():
          runs[f"ours/se/G{group}W{window}/{mode}"] = logits
      for ms in (False, True):
        for mode, logits in ours(hf_dir, ids, DCA(**DCA_CASE, mscale=ms)).items():
          runs[f"ours/{'mscale' if ms else 'nomscale'}/{mode}"] = logits
    results = report(runs, ids)
    if args.json is not None:
      args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
