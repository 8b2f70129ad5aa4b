"""The band of a `Band` method through the platform's flash kernel (Pallas splash on TPU, cuDNN on
GPU), merged with its starting keys by log-sum-exp.

A band method's attention splits in two softmax branches over disjoint keys:
  - the band, keys with 0 <= i-j < window at true distance: causal sliding-window attention,
    which is exactly what the flash kernels compute (`Splash`, `DotProductAttention`);
  - the starting keys beyond the band, with the method's rotation: a small [T x n_start] branch
    in XLA (`banded.add_starting_keys`).
Each branch returns its output and log-sum-exp (float32); `merge` weighs them into one softmax.

The kernels take pre-rotated queries and keys. To keep RoPE exact (rope.py: offsets below 2^16),
a row is fed in `Segments`: windows of `length` tokens, each rotated relative to its own last
position, that overlap by the band's context. Rows are left-padded; the kernels' masks are
position-free (causal, left window), so each row is first rolled to put its padding at the end,
in every real query's future. Axis letters as in blockwise.py; X: rows times segments, L: a
segment's tokens.

The gradient of the kernel path is the XLA path's (a custom VJP that recomputes it): training
runs the kernel forward only where its result equals the XLA one, which the tests check.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lminf_jax.attention import blockwise as bw
from lminf_jax.errors import UserError
from lminf_jax.positional import Positional
from lminf_jax.sharding import head_spec

KERNELS = ("auto", "xla", "splash", "cudnn")
KERNEL_HELP = ("attention kernel: auto (splash on TPU, cudnn on GPU for bf16/fp16, else xla) | xla | splash "
               "(interpret mode off TPU) | cudnn")
# RoPE offsets are exact below 2^16 (rope.py): the longest span a kernel call is rotated over.
SPAN = 2**16
ALIGN = 128  # kernel block multiple: segment lengths are padded to it


@dataclasses.dataclass(frozen=True)
class Splash:
  """Pallas splash attention (TPU; `interpret` runs it anywhere, slowly): causal, left window,
  logits soft-capped at `softcap` (None: not); `masked` takes any splash mask."""

  interpret: bool

  def __call__(self, q_xlnh, k_xlkh, v_xlkh, window: int | None, softcap: float | None = None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (q_xlnh.shape[1],) * 2
    mask = masks.CausalMask(shape)
    if window is not None:  # (the left window is inclusive: window - 1 keeps `window` keys)
      mask = mask & masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    return self.masked(q_xlnh, k_xlkh, v_xlkh, mask, softcap=softcap)

  def masked(self, q_xlnh, k_xlkh, v_xlkh, mask, segment_ids: tuple[jnp.ndarray, jnp.ndarray] | None = None,
             softcap: float | None = None, block: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(out [X,L,N,H], lse [X,L,N]) of q [X,L,N,H] over k/v [X,L,K,H] (pre-rotated, q pre-scaled)
    under a splash `mask` [L, L], a query seeing a key only where their `segment_ids` (of the
    queries and of the keys, [X, L] each) agree, in blocks of `block` (default: the largest of 512,
    256, 128 dividing L). A query that sees no key gets an undefined row."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    x, length, n, h = q_xlnh.shape
    kv = k_xlkh.shape[2]
    kernel = _splash_kernel(mask, n // kv, self.interpret, softcap,
                            block or next(b for b in (512, 256, 128) if length % b == 0))
    q_xkglh = q_xlnh.reshape(x, length, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k_xklh, v_xklh = (jnp.swapaxes(a, 1, 2) for a in (k_xlkh, v_xlkh))
    if segment_ids is None:
      o_xkglh, (lse_xkgl,) = jax.vmap(jax.vmap(kernel))(q_xkglh, k_xklh, v_xklh)
    else:
      def row(q_kglh, k_klh, v_klh, q_ids_l, kv_ids_l):
        ids = splash.SegmentIds(q_ids_l, kv_ids_l)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_kglh, k_klh, v_klh)

      o_xkglh, (lse_xkgl,) = jax.vmap(row)(q_xkglh, k_xklh, v_xklh, *segment_ids)
    return (o_xkglh.transpose(0, 3, 1, 2, 4).reshape(x, length, n, h),
            lse_xkgl.transpose(0, 3, 1, 2).reshape(x, length, n))


def _splash_kernel(mask, heads: int, interpret: bool, softcap: float | None, block: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block)
  # (built per trace: splash caches the numpy processing of the mask itself)
  return splash.make_splash_mqa_single_device(masks.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                              save_residuals=True, attn_logits_soft_cap=softcap,
                                              interpret=interpret)


@dataclasses.dataclass(frozen=True)
class DotProductAttention:
  """`jax.nn.dot_product_attention`'s kernels: "cudnn" (GPU, fp16/bf16), or "xla" (the same masks
  anywhere, for tests). cuDNN computes its log-sum-exp in float32 and jax.nn casts it to the
  input dtype, which costs the merge about 1e-2 in bf16: "cudnn" calls the function underneath
  jax.nn to keep the float32 one."""

  implementation: str

  def __call__(self, q_xlnh, k_xlkh, v_xlkh, window: int | None, softcap: float | None = None):
    if softcap is not None:
      raise ValueError("jax.nn.dot_product_attention has no logit soft-capping")
    if self.implementation == "cudnn":
      mask_type, cudnn_attention = private_cudnn_attention()
      o_xlnh, lse_xnl = cudnn_attention(q_xlnh, k_xlkh, v_xlkh, scale=1.0, mask_type=mask_type.CAUSAL,
                                        sliding_window_length=window, return_residual=True)
      return o_xlnh, jnp.swapaxes(lse_xnl, 1, 2).astype(jnp.float32)
    o_xlnh, lse_xln = jax.nn.dot_product_attention(
        q_xlnh, k_xlkh, v_xlkh, scale=1.0, is_causal=True, implementation=self.implementation,
        local_window_size=None if window is None else (window - 1, 0), return_residual=True)
    return o_xlnh, lse_xln.astype(jnp.float32)


FlashKernel = Splash | DotProductAttention

# jax's private cuDNN attention (which keeps the float32 log-sum-exp) was checked against these
# jax releases (major, minor), first and last; outside them the cudnn kernel is unavailable.
CUDNN_CHECKED_JAX = ((0, 8), (0, 10))


def private_cudnn_attention() -> tuple | None:
  """(MaskType, dot_product_attention) of `jax._src.cudnn.fused_attention_stablehlo`, or None
  where this jax is outside CUDNN_CHECKED_JAX or does not have them."""
  first, last = CUDNN_CHECKED_JAX
  if not first <= tuple(jax.__version_info__[:2]) <= last:
    return None
  try:
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  except ImportError:
    return None
  return MaskType, dot_product_attention


def _cudnn_unavailable() -> str:
  first, last = (".".join(map(str, v)) for v in CUDNN_CHECKED_JAX)
  return (f"jax {jax.__version__} lacks the private cuDNN attention the cudnn kernel calls (checked on jax "
          f"{first} to {last})")


def flash_kernel(kernel: str, dtype, pe: Positional | None = None) -> FlashKernel | None:
  """The flash kernel a method's `kernel` option picks on this platform for a model whose logits
  take `pe` (None: the XLA path). No kernel has ALiBi's bias; cuDNN has no soft-capping: "auto"
  takes XLA for those."""
  platform = jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  alibi = pe is not None and not pe.rotates
  softcap = None if pe is None else pe.softcap
  if kernel == "auto":
    kernel = {"tpu": "splash", "gpu": "cudnn" if half and softcap is None else "xla"}.get(platform, "xla")
    kernel = "xla" if alibi else kernel
    if kernel == "cudnn" and private_cudnn_attention() is None:
      warnings.warn(f"{_cudnn_unavailable()}: kernel auto takes the XLA path", stacklevel=2)
      kernel = "xla"
  if kernel == "xla":
    return None
  if alibi:
    raise UserError(f"the {kernel} kernel has no ALiBi bias: use --kernel auto or xla")
  if kernel == "splash":
    return Splash(interpret=platform != "tpu")
  if kernel == "cudnn":
    if platform != "gpu" or not half:
      raise UserError(f"the cudnn kernel needs a GPU and bf16/fp16 activations (here: {platform}, "
                      f"{jnp.dtype(dtype).name}): use --kernel auto or xla")
    if softcap is not None:
      raise UserError("the cudnn kernel has no logit soft-capping: use --kernel auto or xla")
    if private_cudnn_attention() is None:
      raise UserError(f"{_cudnn_unavailable()}: use --kernel auto or xla")
    return DotProductAttention("cudnn")
  raise UserError(f"unknown kernel {kernel!r} (choose from {', '.join(KERNELS)})")


class Segments(NamedTuple):
  """A row of T tokens as `count` kernel calls of `length` tokens: call s covers tokens
  [begin[s], begin[s] + length) and gives the outputs of [s*step, (s+1)*step), which sit at
  offset s*step - begin[s] in it (its first tokens are the band's context)."""

  length: int
  step: int
  begin: tuple[int, ...]

  @staticmethod
  def plan(t: int, window: int, span: int = SPAN) -> Segments:
    context = _round_up(window - 1, ALIGN)
    if t <= span or 4 * context > span:  # one call (beyond SPAN, dense's offsets are no longer exact)
      length = _round_up(t, ALIGN)
      return Segments(length, length, (0,))
    count = -(-t // (span - context))
    step = _round_up(-(-t // count), ALIGN)
    return Segments(context + step, step, tuple(max(0, s * step - context) for s in range(count)))

  def gather_columns(self) -> np.ndarray:
    """[count, length] the token each call's slot reads."""
    return np.asarray(self.begin)[:, None] + np.arange(self.length)

  def output_slots(self) -> np.ndarray:
    """[count * step] the flat slot of [count, length] that holds each token's output."""
    s = np.arange(len(self.begin))
    return (s * self.length + s * self.step - np.asarray(self.begin))[:, None] + np.arange(self.step)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def flash_band(q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
               pe: Positional, window: int, kernel: FlashKernel,
               span: int = SPAN) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The band alone, keys 0 <= i-j < window at true distance, through `kernel`: q [B,T,N,H], k/v
  [B,T,K,H] before RoPE -> (out [B,T,N,H] float32, lse [B,T,N]; 0 and -inf for padding). `span`:
  the longest call (tests make it short)."""
  b, t, n, h = q_btnh.shape
  idx_bt = bw.sequence_index(positions_bt)
  plan = Segments.plan(t, window, span)
  count = len(plan.begin)
  # Roll each row so its real tokens come first: column c holds token (c + pads) % T.
  pads_b = jnp.sum(idx_bt < 0, axis=1)
  real_bt = jnp.arange(t)[None] < (t - pads_b)[:, None]
  roll = lambda x: bw.roll_padding(x, pads_b)  # noqa: E731
  last_b1 = jnp.max(jnp.where(idx_bt >= 0, positions_bt, jnp.iinfo(jnp.int32).min), axis=1, keepdims=True)
  pos_bt = jnp.where(real_bt, roll(positions_bt), last_b1)  # (padding at the row's last position: finite offsets)
  # Each call's tokens, rotated relative to the call's last real position.
  extent = count * plan.step
  cols = plan.gather_columns().reshape(-1)

  def segment(x_bt):
    return bw.pad_axis(x_bt, 1, 0, extent - t)[:, cols].reshape((b * count, plan.length) + x_bt.shape[2:])

  pos_xl = jnp.pad(pos_bt, ((0, 0), (0, extent - t)), mode="edge")[:, cols].reshape(b * count, plan.length)
  offsets_xl1 = (pos_xl - jnp.max(pos_xl, axis=1, keepdims=True))[:, :, None]
  q_xlnh = pe.rotate(segment(roll(q_btnh)), offsets_xl1) * h**-0.5
  k_xlkh = pe.rotate(segment(roll(k_btkh)), offsets_xl1)
  o_xlnh, lse_xln = kernel(q_xlnh.astype(q_btnh.dtype), k_xlkh, segment(roll(v_btkh)),
                           window if window < plan.length else None, pe.softcap)
  # Back to the rows' own order; padding queries see nothing.
  slots = plan.output_slots().reshape(-1)[:t]
  o_btnh = o_xlnh.reshape(b, count * plan.length, n, h)[:, slots]
  lse_btn = lse_xln.reshape(b, count * plan.length, n)[:, slots]
  real_bt1 = (idx_bt >= 0)[:, :, None]
  return (jnp.where(real_bt1[..., None], bw.roll_padding(o_btnh, -pads_b).astype(jnp.float32), 0.0),
          jnp.where(real_bt1, bw.roll_padding(lse_btn, -pads_b), -jnp.inf))


def merge(o_a: jnp.ndarray, lse_a: jnp.ndarray, o_b: jnp.ndarray, lse_b: jnp.ndarray,
          dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One softmax from two over disjoint keys, in float32: (out [B,T,N,H] in `dtype`, lse [B,T,N])."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
  w_a, w_b = (jnp.where(jnp.isneginf(x), 0.0, jnp.exp(x - safe))[..., None] for x in (lse_a, lse_b))
  return (o_a.astype(jnp.float32) * w_a + o_b.astype(jnp.float32) * w_b).astype(dtype), lse


def flash_or_xla(spec, q_btnh: jnp.ndarray, k_btkh: jnp.ndarray, v_btkh: jnp.ndarray, positions_bt: jnp.ndarray,
                 pe: Positional, kinds: tuple[type, ...] = (Splash, DotProductAttention)) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(out [B,T,N,H], lse [B,T,N]) of a method with `kernel_attend(kernel, ...)` and `xla_attend(...)`:
  through the flash kernel its `kernel` option picks on this platform, if it is of `kinds` (on each
  shard of the mesh, differentiated as XLA), or through XLA."""
  kernel = flash_kernel(spec.kernel, q_btnh.dtype, pe)
  if not isinstance(kernel, kinds):  # (None: XLA)
    return spec.xla_attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)
  fast = functools.partial(spec.kernel_attend, kernel)
  return on_mesh(functools.partial(xla_gradient, fast, spec.xla_attend), q_btnh, k_btkh, v_btkh, positions_bt, pe)


def on_mesh(attend, q_btnh, k_btkh, v_btkh, positions_bt, pe, with_lse: bool = True):
  """attend(q, k, v, positions, pe) -> (out, lse) (or out alone, `with_lse=False`) on each
  shard of rows and heads of the current mesh (XLA does not partition a Pallas or cuDNN kernel
  itself); directly without one. Not for a `sequence` axis (the band crosses shards)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or np.prod(list(dict(mesh.shape).values())) == 1:
    return attend(q_btnh, k_btkh, v_btkh, positions_bt, pe)
  qkv = head_spec(k_btkh.shape, mesh)
  out_specs = (qkv, PartitionSpec(*qkv[:3])) if with_lse else qkv
  return jax.shard_map(attend, in_specs=(qkv, qkv, qkv, PartitionSpec(*qkv[:2]), PartitionSpec()),
                       out_specs=out_specs, check_vma=False)(q_btnh, k_btkh, v_btkh, positions_bt, pe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def xla_gradient(fast, reference, q_btnh, k_btkh, v_btkh, positions_bt, pe):
  """fast(q, k, v, positions, pe), differentiated (in q, k, v) as `reference`: the same
  attention through XLA, recomputed in the backward pass."""
  return fast(q_btnh, k_btkh, v_btkh, positions_bt, pe)


def _forward(fast, reference, *inputs):
  return fast(*inputs), inputs


def _backward(fast, reference, inputs, cotangents):
  q_btnh, k_btkh, v_btkh, positions_bt, pe = inputs
  xla = lambda q, k, v: reference(q, k, v, positions_bt, pe)  # noqa: E731
  return (*jax.vjp(xla, q_btnh, k_btkh, v_btkh)[1](cotangents), None, None)


xla_gradient.defvjp(_forward, _backward)
