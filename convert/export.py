"""Checkpoint -> Hugging Face model dir (config.json, generation_config.json, safetensors, tokenizer
files), written atomically.

The safetensors are split into shards of at most `MAX_SHARD_BYTES` as `save_pretrained` does
(one `model.safetensors`, or `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`),
and built one shard at a time, so peak memory is the params plus one shard.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lminf_jax.util.atomic import atomic_dir
from lminf_jax.convert.hf import HFTensor, hf_tensor, hf_tensor_names
from lminf_jax.models.config import LlamaConfig, hf_token_ids

MAX_SHARD_BYTES = 5 * 2**30


def _shards(tensors: list[HFTensor], sizes: list[int], max_bytes: int) -> list[list[HFTensor]]:
  """Consecutive tensors grouped into shards of at most `max_bytes` (a bigger tensor alone)."""
  shards: list[list[HFTensor]] = [[]]
  total = 0
  for tensor, size in zip(tensors, sizes):
    if shards[-1] and total + size > max_bytes:
      shards.append([])
      total = 0
    shards[-1].append(tensor)
    total += size
  return shards


def write_hf(out: Path, config: LlamaConfig, params: dict, tokenizer=None, dtype: str | None = None,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Writes `params` as a Hugging Face model dir `out` (which must not exist), in `dtype`
  (default: the params' own), that transformers' `AutoModelForCausalLM.from_pretrained` loads."""
  import ml_dtypes
  from safetensors.numpy import save_file
  from transformers import GenerationConfig

  config = config.replace(param_dtype=dtype or config.param_dtype)
  hf_config = config.to_hf()  # refuses what transformers cannot express, before any work
  np_dtype = np.dtype(ml_dtypes.bfloat16) if config.param_dtype == "bfloat16" else np.dtype(np.float32)
  tensors = hf_tensor_names(config)
  sizes = [math.prod(t.shape) * np_dtype.itemsize for t in tensors]
  shards = _shards(tensors, sizes, max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  umask = os.umask(0)
  os.umask(umask)
  with atomic_dir(out) as tmp:
    for name, shard in zip(names, shards):
      save_file({t.name: hf_tensor(params, t).astype(np_dtype, copy=False) for t in shard}, str(tmp / name),
                metadata={"format": "pt"})
      os.chmod(tmp / name, 0o666 & ~umask)  # (safetensors creates its files 0600)
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(sizes)},
               "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    # (as `save_pretrained` writes it for a model: the ids `generate` starts and stops with)
    GenerationConfig(bos_token_id=config.bos_token_id,
                     eos_token_id=hf_token_ids(config.eos_token_ids)).save_pretrained(str(tmp))
  return out
