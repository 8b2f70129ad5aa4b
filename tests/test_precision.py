"""Float32 accuracy against a true float64 reference: no worse than transformers' own float32.

The reference is the transformers model in float64 with its RMSNorm and RoPE, which transformers
computes in float32 even in a float64 model, and its attention (SDPA) in float64 too.
"""

from __future__ import annotations

import copy
import types

import jax.numpy as jnp
import numpy as np
from helpers import tiny_hf_model, torch_logits

from lminf_jax.attention import Dense
from lminf_jax.inference.forward import forward
from lminf_jax.loading import load
from lminf_jax.rope import apply_rope, inv_frequencies

T = 2048
EARLY = 32
# lminf's float32 error may exceed transformers' by this factor: XLA:CPU and PyTorch sum their
# matmuls in different orders (up to 1.4x the rms error on SmolLM2). Measured ratio for random
# seeds 0-2: 0.53-0.75; 4.6-8.8 when RoPE rounded each angle to float32.
FACTOR = 2.0


def float64_reference(model):
  """A float64 copy of a transformers Llama computing everything in float64."""
  import torch
  import transformers.models.llama.modeling_llama as hf_llama

  def rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

  def rotary(self, x, position_ids):
    angle = position_ids[..., None].to(torch.float64) * self.inv_freq.to(torch.float64)
    emb = torch.cat((angle, angle), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

  ref = copy.deepcopy(model).double()
  for module in ref.modules():
    if isinstance(module, hf_llama.LlamaRMSNorm):
      module.forward = types.MethodType(rms_norm, module)
    elif isinstance(module, hf_llama.LlamaRotaryEmbedding):
      module.forward = types.MethodType(rotary, module)
  ref.config._attn_implementation = "sdpa"  # eager attention takes its softmax in float32
  return ref


def test_float32_logits_no_worse_than_transformers(tmp_path):
  """The first tokens of a long sequence in one attention chunk: their RoPE offsets from the
  chunk's last position are about T, while transformers rotates them by their small absolute
  positions. Query and key weights are scaled up 8x for sharp attention, as in trained models,
  so that RoPE errors show in the logits."""
  import torch

  model = tiny_hf_model("llama_gqa")
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.q_proj.weight.mul_(8.0)
      layer.self_attn.k_proj.weight.mul_(8.0)
  model.save_pretrained(tmp_path / "hf")
  config, params, _ = load(tmp_path / "hf")
  tokens = np.random.default_rng(0).integers(0, 97, size=(1, T))
  reference = torch_logits(float64_reference(model), tokens)[:, :EARLY]
  theirs = np.abs(torch_logits(model, tokens)[:, :EARLY] - reference).max()
  ours = np.asarray(forward(params, config, jnp.asarray(tokens), attention=Dense(chunk=T)))[:, :EARLY]
  ours = np.abs(ours.astype(np.float64) - reference).max()
  assert ours <= FACTOR * theirs, (ours, theirs)


def test_rope_angles_exact_for_large_offsets():
  """cos/sin of offset * inv_freq to about 1e-7 for offsets up to 2^16 (float32 rounding of the
  angle itself gives 2e-3 at 32K)."""
  h = 64
  inv_freq = inv_frequencies(h, 10000.0, types.SimpleNamespace(kind="default"))
  offsets = np.concatenate([np.arange(-600, 600), np.random.default_rng(0).integers(-(1 << 16), 1 << 16, 4000)])
  x = np.zeros((len(offsets), h), np.float32)
  x[:, :h // 2] = 1.0  # rotated: (cos, sin) of each angle
  rotated = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(offsets, jnp.int32), jnp.asarray(inv_freq)))
  angle = offsets[:, None].astype(np.float64) * inv_freq.astype(np.float64)
  err = np.abs(rotated.astype(np.float64) - np.concatenate([np.cos(angle), np.sin(angle)], axis=-1)).max()
  assert err < 1e-5, err
