"""Pure-functional Flax (linen) Llama decoder: Llama, Mistral, Qwen2, Qwen3, Phi-3, MPT, Gemma 2 and 3 checkpoints.

Axis letters (used in parameter and variable names): B batch, T query length, S key length,
D model width, N query heads, K kv heads, G query heads per kv head, H head dim, V vocab,
F MLP width, L layers.

Modules only hold parameters; the attention method is a frozen spec passed at call time:

    logits = Llama(config).apply({'params': params}, tokens_bt, positions_bt, attention=Dense())

The L decoder layers are one `nn.scan`, so every layer parameter has a leading L axis. With
`Llama(config, remat=True)` each layer is rematerialised (`nn.remat`): a backward pass keeps
only the layers' inputs [B, T, D] and recomputes the rest, layer by layer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lminf_jax.attention import AttentionMethod, Dense, attend
from lminf_jax.attention.blockwise import after
from lminf_jax.attention.per_layer import PerLayer
from lminf_jax.cache import Cache, CachedInput, attend_cached, chunk_indices, split_host, write
from lminf_jax.models.config import LlamaConfig, RopeScaling
from lminf_jax.positional import ALiBi, Positional, Rotary, alibi_slopes, cap
from lminf_jax.rope import dynamic_inv_frequencies, inv_frequencies
from lminf_jax.sharding import constrain, mesh_axis_size, on_host


def _init(*logical_axes: str):
  """Normal(0.02) init carrying logical axis names (lminf_jax.sharding maps them to the mesh)."""
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), logical_axes)


def _const(init, *logical_axes: str):
  return nn.with_logical_partitioning(init, logical_axes)


def _dtype(name: str):
  return jnp.dtype(name)


def rope_frequencies(config: LlamaConfig, positions_bt: jnp.ndarray) -> jnp.ndarray:
  """RoPE's inverse frequencies [R/2] for a call at `positions_bt`. longrope and dynamic depend on the
  call, as transformers' do per forward call: longrope picks its long factors, and dynamic grows its
  base with the call's length, when the call's largest position + 1 exceeds the original length
  (docs/semantics.md#rope-scaling; through a cache: docs/caches.md#rope-scaling-through-a-cache)."""
  scaling, r = config.rope_scaling, config.rotary_dim
  short = jnp.asarray(inv_frequencies(r, config.rope_theta, scaling))
  if not scaling.per_call:
    return short
  length = jnp.max(positions_bt) + 1
  if scaling.kind == "dynamic":
    long = dynamic_inv_frequencies(r, config.rope_theta, scaling, length)
  else:
    long = jnp.asarray(inv_frequencies(r, config.rope_theta, scaling, long=True))
  return jnp.where(length > scaling.original_max_position_embeddings, long, short)


def rope_attention_scale(config: LlamaConfig, layer: jnp.ndarray) -> jnp.ndarray | None:
  """What layer `layer`'s rotated q.k is multiplied by: the square of the scaling's attention factor
  (longrope, yarn: cos and sin times it), except on Gemma 3's windowed layers, whose own RoPE is
  unscaled; None where it is 1."""
  factor = config.rope_scaling.attention_factor
  if factor == 1:
    return None
  if config.local_rope_theta is None:
    return jnp.float32(factor**2)
  windowed = jnp.asarray(config.window_layers or (True,) * config.num_layers)
  return jnp.where(windowed[layer], jnp.float32(1), jnp.float32(factor**2))


def positional(config: LlamaConfig, positions_bt: jnp.ndarray, layer: jnp.ndarray | None = None) -> Positional:
  """How a call at `positions_bt` puts positions into layer `layer`'s logits. With windowed layers
  of their own RoPE theta (Gemma 3) and no `layer`: every layer's, frequencies [L, 1, 1, 1, R/2],
  to rotate a cache write's keys [L, B, C, K, H]."""
  if config.alibi_bias_max is not None:
    return ALiBi(jnp.asarray(alibi_slopes(config.num_heads, config.alibi_bias_max)), config.attn_softcap)
  inv_freq_h = rope_frequencies(config, positions_bt)
  if config.local_rope_theta is not None:
    local_h = jnp.asarray(inv_frequencies(config.rotary_dim, config.local_rope_theta, RopeScaling()))
    windowed = jnp.asarray(config.window_layers or (True,) * config.num_layers)
    if layer is None:
      inv_freq_h = jnp.where(windowed[:, None], local_h, inv_freq_h)[:, None, None, None]
    else:
      inv_freq_h = jnp.where(windowed[layer], local_h, inv_freq_h)
  return Rotary(inv_freq_h, config.attn_softcap)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis: the model width D (param `scale_d`), or with `axis="head_dim"`
  each head's H (param `scale_h`, Qwen3's q/k norm). `center`: the mean is subtracted first
  (LayerNorm without bias, MPT). `offset`: the scale is 1 + the param, applied in float32 (Gemma)."""

  eps: float
  param_dtype: str
  axis: str = "embed"
  center: bool = False
  offset: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    name = "scale_d" if self.axis == "embed" else "scale_h"
    init = nn.initializers.zeros if self.offset else nn.initializers.ones  # (an identity at init)
    scale = self.param(name, _const(init, self.axis), (x.shape[-1],), _dtype(self.param_dtype))
    x32 = x.astype(jnp.float32)
    if self.center:
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (normed * (1 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


NO_CACHE = CachedInput(None, None, None)  # (the layer scan's input without a cache)


class LayerWrite(NamedTuple):
  """What a layer gives `lminf_jax.cache.write`: the chunk's keys and values [B, T, K, H] and
  what the method's cached attention returned for its `write_extra`."""

  k_btkh: jnp.ndarray
  v_btkh: jnp.ndarray
  aux: Any


class Attention(nn.Module):
  """Grouped-query attention; the method is the frozen spec `attention`."""

  config: LlamaConfig
  attention: AttentionMethod

  @nn.compact
  def __call__(self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, layer: jnp.ndarray,
               cached: CachedInput | None = None) -> tuple[jnp.ndarray, LayerWrite | None]:
    """Output [B, T, D]; with `cached` (this layer's cache), also what `lminf_jax.cache.write` stores."""
    cfg = self.config
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    wq_dnh = self.param("wq_dnh", _init("embed", "heads", "head_dim"), (d, n, h), pdt)
    wk_dkh = self.param("wk_dkh", _init("embed", "kv_heads", "head_dim"), (d, kv, h), pdt)
    wv_dkh = self.param("wv_dkh", _init("embed", "kv_heads", "head_dim"), (d, kv, h), pdt)
    wo_nhd = self.param("wo_nhd", _init("heads", "head_dim", "embed"), (n, h, d), pdt)
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, wq_dnh.astype(dt))
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wk_dkh.astype(dt))
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wv_dkh.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_btnh += self.param("bq_nh", _const(zeros, "heads", "head_dim"), (n, h), pdt).astype(dt)
      k_btkh += self.param("bk_kh", _const(zeros, "kv_heads", "head_dim"), (kv, h), pdt).astype(dt)
      v_btkh += self.param("bv_kh", _const(zeros, "kv_heads", "head_dim"), (kv, h), pdt).astype(dt)
    if cfg.qk_norm:
      q_btnh = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", offset=cfg.norm_offset, name="q_norm")(q_btnh)
      k_btkh = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, "head_dim", offset=cfg.norm_offset, name="k_norm")(k_btkh)
    pe = positional(cfg, positions_bt, layer)
    if cfg.query_pre_attn_scalar is not None:  # (logits scaled by it^-1/2; the attention scales by H^-1/2)
      q_btnh = q_btnh * jnp.asarray((h / cfg.query_pre_attn_scalar) ** 0.5, dt)
    if (scale := rope_attention_scale(cfg, layer)) is not None:  # (on the rotated dims)
      q_btnh = q_btnh * jnp.where(jnp.arange(h) < cfg.rotary_dim, scale, 1).astype(dt)
    if cached is None or cached.cache is None:  # (one-shot; with idx, into an empty cache: `Llama.cached_layers`)
      o_btnh = attend(q_btnh, k_btkh, v_btkh, positions_bt, pe, self.attention, layer)
      new_kv = None if cached is None or cached.idx_bt is None else LayerWrite(k_btkh, v_btkh, None)
    else:
      o_btnh, aux = attend_cached(q_btnh, k_btkh, v_btkh, positions_bt, cached, pe, self.attention, layer)
      new_kv = LayerWrite(k_btkh, v_btkh, aux)
    # One [N*H, D] contraction: XLA would otherwise transpose the weight on every call to match o's layout.
    out_btd = jnp.einsum("btx,xd->btd", o_btnh.reshape(*o_btnh.shape[:2], n * h), wo_nhd.reshape(n * h, d).astype(dt))
    if cfg.o_bias:
      out_btd += self.param("bo_d", _const(nn.initializers.zeros, "embed"), (d,), pdt).astype(dt)
    return out_btd, new_kv


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
    cfg = self.config
    d, f = cfg.hidden_size, cfg.intermediate_size
    pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    act = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
           "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}[cfg.hidden_act]
    if cfg.gated_mlp:
      w_gate_df = self.param("w_gate_df", _init("embed", "mlp"), (d, f), pdt).astype(dt)
    w_up_df = self.param("w_up_df", _init("embed", "mlp"), (d, f), pdt).astype(dt)
    w_down_fd = self.param("w_down_fd", _init("mlp", "embed"), (f, d), pdt).astype(dt)
    up_btf = x_btd @ w_up_df
    return (act(x_btd @ w_gate_df) * up_btf if cfg.gated_mlp else act(up_btf)) @ w_down_fd


class DecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, layer: jnp.ndarray, attention: AttentionMethod,
               cached: CachedInput | None = None) -> tuple[jnp.ndarray, LayerWrite | None]:
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, center=cfg.layer_norm,  # noqa: E731
                                offset=cfg.norm_offset, name=name)
    post = lambda name, y: norm(name)(y) if cfg.post_norms else y  # noqa: E731
    attn_btd, new_kv = Attention(cfg, attention, name="attn")(norm("attn_norm")(x_btd), positions_bt, layer, cached)
    x_btd = x_btd + post("post_attn_norm", attn_btd)
    x_btd = x_btd + post("post_mlp_norm", MLP(cfg, name="mlp")(norm("mlp_norm")(x_btd)))
    return constrain(x_btd, "batch", "length", "embed"), new_kv


class Llama(nn.Module):
  config: LlamaConfig
  remat: bool = False

  def setup(self):
    cfg = self.config
    pdt = _dtype(cfg.param_dtype)
    self.embed_vd = self.param("embed_vd", _init("vocab", "embed"), (cfg.vocab_size, cfg.hidden_size), pdt)
    self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.param_dtype, center=cfg.layer_norm, offset=cfg.norm_offset)
    # Attention specs are static pytrees (no leaves), so they pass through the scan unchanged;
    # a cache's per-layer keys and values are scanned along their leading L axis.
    layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
    # Scanned inputs: positions (broadcast), layer index (0), spec (broadcast), CachedInput (its kv
    # along L, the rest of the cache and idx broadcast; a cache per layer kind is all broadcast).
    cached_axes = CachedInput(0, nn.broadcast, nn.broadcast)
    self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, 0, nn.broadcast, cached_axes), length=cfg.num_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    if not cfg.tie_word_embeddings:
      self.w_unembed_dv = self.param("w_unembed_dv", _init("embed", "vocab"), (cfg.hidden_size, cfg.vocab_size), pdt)

  def hidden(self, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray | None = None, attention=Dense(),
             cache: Cache | None = None, one_shot: bool = False):
    """Final-normed hidden states [B, T, D] (compute dtype); with a `cache`, also the updated cache
    (`one_shot`: see `cached_layers`).

    Without a cache, under a mesh with a `sequence` axis, T is padded at the end to a multiple
    of it and cut back: padded tokens lie in every real token's future, and at its row's last
    position, so they change nothing (not even the longrope factors a call's largest position picks).
    """
    cfg = self.config
    t = tokens_bt.shape[1]
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
    positions_bt = positions_bt.astype(jnp.int32)
    pad = -t % mesh_axis_size("sequence") if cache is None else 0
    if pad:
      tokens_bt = jnp.pad(tokens_bt, ((0, 0), (0, pad)))
      positions_bt = jnp.concatenate([positions_bt, jnp.repeat(jnp.maximum(positions_bt[:, -1:], 0), pad, axis=1)], 1)
    attention = cfg.resolve_attention(attention)
    x_btd = self.embed(tokens_bt)
    if cache is None:
      x_btd, _ = self.layers(x_btd, positions_bt, jnp.arange(cfg.num_layers), attention, NO_CACHE)
      return self.final_norm(x_btd)[:, :t]
    x_btd, cache = self.cached_layers(x_btd, positions_bt, attention, cache, one_shot)
    return self.final_norm(x_btd), cache

  def embed(self, tokens_bt: jnp.ndarray) -> jnp.ndarray:
    """Token embeddings [B, T, D] (compute dtype)."""
    x_btd = jnp.take(self.embed_vd, tokens_bt, axis=0).astype(_dtype(self.config.dtype))
    if self.config.embed_scale != 1:
      x_btd = x_btd * jnp.asarray(self.config.embed_scale, x_btd.dtype)
    return constrain(x_btd, "batch", "length", "embed")

  def cached_layers(self, x_btd: jnp.ndarray, positions_bt: jnp.ndarray, attention, cache: Cache,
                    one_shot: bool = False):
    """The decoder layers (embedded input to last layer output [B, T, D]) over a cache, under a
    resolved spec: (output, updated cache). `one_shot`: the cache is empty, so each layer attends
    the chunk one-shot (`attend`, the method's `prefill_one_shot`) and the chunk is stored after."""
    cfg = self.config
    idx_bt = chunk_indices(cache.next_idx, positions_bt)
    if one_shot:
      cached = CachedInput(None, None, idx_bt)
    elif cache.windowed is not None:  # (a cache per layer kind: each layer reads its kind's at its index)
      cached = CachedInput(None, cache, idx_bt)
    else:  # (the kv scanned along L; arrays in host memory passed whole, each layer reading its part)
      kv, host = split_host(cache.kv)
      cached = CachedInput(kv, cache._replace(kv=host), idx_bt)
    x_btd, new_kv = self.layers(x_btd, positions_bt, jnp.arange(cfg.num_layers), attention, cached)
    return _write(cfg, x_btd, cache, new_kv, positions_bt, idx_bt, attention)

  def logits(self, x_btd: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, T, V] (float32) of last-layer outputs: the final norm, then `unembed`."""
    return self.unembed(self.final_norm(x_btd))

  def unembed(self, x_btd: jnp.ndarray) -> jnp.ndarray:
    """Logits [B, T, V] in float32."""
    w_dv = self.embed_vd.T if self.config.tie_word_embeddings else self.w_unembed_dv
    return cap(jnp.einsum("btd,dv->btv", x_btd, w_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32),
               self.config.final_softcap)

  def __call__(self, tokens_bt: jnp.ndarray, positions_bt: jnp.ndarray | None = None, attention=Dense(),
               cache: Cache | None = None):
    """Logits [B, T, V] (float32); with a `cache` (lminf_jax.cache), (logits, updated cache)."""
    if cache is None:
      return self.unembed(self.hidden(tokens_bt, positions_bt, attention))
    x_btd, cache = self.hidden(tokens_bt, positions_bt, attention, cache)
    return self.unembed(x_btd), cache


def cached_layer(config: LlamaConfig, layer_params: dict, layer: int, x_btd: jnp.ndarray, positions_bt: jnp.ndarray,
                 attention, cache: Cache) -> tuple[jnp.ndarray, Cache]:
  """`Llama.cached_layers` for one layer, with no scan: its params and a cache holding only it
  (every kv leaf with a leading axis of 1, as sliced from the stacked ones: `cache.split_layers`,
  of the layer's kind under `PerLayer`, whose attention it runs). For a loop over layers whose
  buffers are separate: XLA copies the cache around a one-step scan on each call."""
  if isinstance(attention, PerLayer):
    attention = attention.kind(layer)
  idx_bt = chunk_indices(cache.next_idx, positions_bt)
  squeeze = lambda tree: jax.tree.map(  # noqa: E731 (host-memory arrays stay whole: `Cache.layer`)
      lambda x: x if on_host(x) else jax.lax.index_in_dim(x, 0, keepdims=False), tree)
  x_btd, new_kv = DecoderLayer(config).apply({"params": squeeze(layer_params)}, x_btd, positions_bt, jnp.int32(layer),
                                             attention, CachedInput(squeeze(cache.kv), cache._replace(kv=None), idx_bt))
  return _write(config, x_btd, cache, jax.tree.map(lambda x: x[None], new_kv), positions_bt, idx_bt, attention,
                jnp.int32(layer))


def _write(config: LlamaConfig, x_btd: jnp.ndarray, cache: Cache, new_kv: LayerWrite, positions_bt, idx_bt,
           attention, layer: jnp.ndarray | None = None) -> tuple[jnp.ndarray, Cache]:
  """(x, the cache with the layers' keys and values [L, B, T, K, H] stored: every layer's, or
  `layer`'s alone). The stores wait for the layers' output x (`after`), so they follow every read
  of the cache and update it in place."""
  k_lbtkh, v_lbtkh = after(new_kv.k_btkh, x_btd), after(new_kv.v_btkh, x_btd)
  return x_btd, write(cache, k_lbtkh, v_lbtkh, new_kv.aux, positions_bt, idx_bt,
                      positional(config, positions_bt, layer), attention)
