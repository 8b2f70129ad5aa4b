"""Hugging Face checkpoints (safetensors, sharded safetensors, PyTorch .bin) -> JAX params.

Conversion is tensor by tensor into preallocated stacked arrays, so peak memory is the final
params plus one source tensor.
"""

from __future__ import annotations

import functools
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lminf_jax.convert import safetensors_file
from lminf_jax.errors import UserError
from lminf_jax.util.files import read_json_object
from lminf_jax.util.limits import check_fits, host_memory_bytes
from lminf_jax.models.config import LlamaConfig
from lminf_jax.models.families import family
from lminf_jax.models.fields import token_ids
from lminf_jax.models.params import abstract_params, param_shardings

# HF name -> (params path, layout). Layouts turn an HF [out, in] matrix into our einsum axes.
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("attn", "wq_dnh"), "in_nh"),
    "self_attn.k_proj.weight": (("attn", "wk_dkh"), "in_nh"),
    "self_attn.v_proj.weight": (("attn", "wv_dkh"), "in_nh"),
    "self_attn.o_proj.weight": (("attn", "wo_nhd"), "nh_out"),
    "self_attn.q_proj.bias": (("attn", "bq_nh"), "nh"),
    "self_attn.k_proj.bias": (("attn", "bk_kh"), "nh"),
    "self_attn.v_proj.bias": (("attn", "bv_kh"), "nh"),
    "self_attn.o_proj.bias": (("attn", "bo_d"), "same"),
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale_h"), "same"),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale_h"), "same"),
    "mlp.gate_proj.weight": (("mlp", "w_gate_df"), "transpose"),
    "mlp.up_proj.weight": (("mlp", "w_up_df"), "transpose"),
    "mlp.down_proj.weight": (("mlp", "w_down_fd"), "transpose"),
    "input_layernorm.weight": (("attn_norm", "scale_d"), "same"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale_d"), "same"),
    # the norms of the attention and MLP outputs (Gemma's, renamed from its own names: its `Family.renames`)
    "post_attn_norm.weight": (("post_attn_norm", "scale_d"), "same"),
    "post_mlp_norm.weight": (("post_mlp_norm", "scale_d"), "same"),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": (("embed_vd",), "same"),
    "model.norm.weight": (("final_norm", "scale_d"), "same"),
    "lm_head.weight": (("w_unembed_dv",), "transpose"),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# Projections that some families' checkpoints store fused (`Family.fused`): the fused name -> the parts it
# stacks along its rows.
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def _renamed(model_type: str, name: str, to_llama: bool = True) -> str:
  """A tensor's Llama name (`to_llama`), or its name in a `model_type` checkpoint (its family's
  `renames`, mapped on reading before `_unfused` and back on export)."""
  for theirs, llama in family(model_type).renames:
    source, target = (theirs, llama) if to_llama else (llama, theirs)
    if match := re.fullmatch(re.escape(source).replace(r"\{\}", r"(\d+)"), name):
      return target.format(*match.groups())
  return name


def _to_layout(w: np.ndarray, layout: str, target_shape: tuple[int, ...]) -> np.ndarray:
  """in_nh: [N*H, D] -> [D, N, H]; nh_out: [D, N*H] -> [N, H, D]; nh: [N*H] -> [N, H]."""
  return (w.T if layout in ("in_nh", "nh_out", "transpose") else w).reshape(target_shape)


def _from_layout(w: np.ndarray, layout: str) -> np.ndarray:
  """The inverse of `_to_layout`: our einsum layout -> the HF tensor."""
  if layout == "in_nh":
    return w.reshape(w.shape[0], -1).T
  if layout == "nh_out":
    return w.reshape(-1, w.shape[-1]).T
  if layout == "nh":
    return w.reshape(-1)
  return w.T if layout == "transpose" else w


def _expected_source_shape(layout: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "in_nh":
    d, n, h = target_shape
    return (n * h, d)
  if layout == "nh_out":
    n, h, d = target_shape
    return (d, n * h)
  if layout == "nh":
    return (int(np.prod(target_shape)),)
  if layout == "transpose":
    return tuple(reversed(target_shape))
  return tuple(target_shape)


def assemble_params(config: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]], on_device: bool = False,
                    mesh=None) -> dict:
  """Fills a params tree from (HF name, array) pairs, one tensor at a time: numpy arrays, or
  `on_device` device arrays (on `mesh`, placed by `lminf_jax.models.params.param_shardings`; else on
  the default device, uncommitted), each tensor written into its slice, so the host holds one tensor,
  never the params.

  Raises UserError naming the tensor on a shape mismatch, and naming the first missing one, and
  before allocating params bigger than this machine's memory. Warns (stderr, one line per tensor)
  about NaN or Inf weights.
  """
  shapes = abstract_params(config)
  dtype = jnp.dtype(config.param_dtype)
  nbytes = sum(s.size for s in jax.tree.leaves(shapes)) * dtype.itemsize
  check_fits(f"holding the params ({config.num_params()} parameters as {dtype})", nbytes,
             ("this machine", host_memory_bytes()))
  if not on_device:
    params = jax.tree.map(lambda s: np.empty(s.shape, dtype), shapes)
  elif mesh is None:
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, dtype), shapes)
  else:
    params = jax.tree.map(lambda s, sharding: jnp.zeros(s.shape, dtype, device=sharding), shapes,
                          param_shardings(config, mesh))
  filled: set[tuple] = set()
  renamed = ((_renamed(config.model_type, name), array) for name, array in tensors)
  for name, array in _unfused(config, renamed):
    if _IGNORED.match(name):
      continue
    layer, (path, layout) = None, _GLOBAL_TENSORS.get(name, (None, None))
    if match := _LAYER.fullmatch(name):
      layer = int(match.group(1))
      path, layout = _LAYER_TENSORS.get(match.group(2), (None, None))
      path = ("layers",) + path if path else None
      if path and layer >= config.num_layers:
        raise UserError(f"tensor {name}: layer {layer} but the config has {config.num_layers} layers")
    if path is None or (path == ("w_unembed_dv",) and config.tie_word_embeddings):
      continue  # e.g. a tied lm_head copy, or tensors of heads we do not model
    try:
      node = params
      for key in path[:-1]:
        node = node[key]
      target = node[path[-1]]
    except KeyError:
      raise UserError(f"tensor {name} is not used by this config "
                      f"(e.g. a bias with attention_bias=False)") from None
    target_shape = target.shape[1:] if layer is not None else target.shape
    expected = _expected_source_shape(layout, target_shape)
    if tuple(array.shape) != expected:
      raise UserError(f"tensor {name} has shape {tuple(array.shape)}, "
                      f"expected {expected} from the model config")
    value = _to_layout(np.asarray(array), layout, target_shape)
    if not on_device:
      destination = target if layer is None else target[layer]
      destination[...] = value  # (cast as it is copied: no other copy)
    else:
      destination = np.ascontiguousarray(value, dtype)
      node[path[-1]] = (jax.device_put(destination, target.sharding if mesh else None) if layer is None else
                        _set_layer(target, destination, layer))
    if bad := _nonfinite(destination):
      print(f"lminf: warning: tensor {name} has {bad} NaN or Inf values", file=sys.stderr)
    filled.add(path + ((layer,) if layer is not None else ()))
  _check_complete(config, shapes, filled)
  return params


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: np.ndarray, layer: int) -> jax.Array:
  """`stacked` [L, ...] with `value` at `layer`, in place (donated; its sharding kept)."""
  return stacked.at[layer].set(value)


def _nonfinite(a: np.ndarray, piece: int = 1 << 22) -> int:
  """The NaN and Inf values of a contiguous array, counted a piece at a time (no mask of the whole)."""
  flat = a.reshape(-1)
  return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + piece]))) for i in range(0, flat.size, piece))


def _unfused(config: LlamaConfig, tensors: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
  """`tensors` with each fused projection split into its parts (their rows, in `_FUSED`'s order)."""
  shapes = {}  # the unfused HF shapes of a layer's tensors, once a fused one comes
  for name, array in tensors:
    match = _LAYER.fullmatch(name)
    if not match or match.group(2) not in _FUSED:
      yield name, array
      continue
    shapes = shapes or {t.name.split(".", 3)[3]: t.shape for t in hf_tensor_names(config, as_saved=False)
                        if t.layer == 0}
    parts = [(part, shapes[part]) for part in _FUSED[match.group(2)]]
    expected = (sum(shape[0] for _, shape in parts),) + parts[0][1][1:]
    if tuple(array.shape) != expected:
      raise UserError(f"tensor {name} has shape {tuple(array.shape)}, expected {expected} from the model config")
    ends = np.cumsum([shape[0] for _, shape in parts])[:-1]
    for (part, _), piece in zip(parts, np.split(np.asarray(array), ends)):
      yield f"model.layers.{match.group(1)}.{part}", piece


class HFTensor(NamedTuple):
  """One tensor of a Hugging Face checkpoint: its HF shape and where it lives in our params (a
  fused one: the tensors it stacks, `parts`)."""

  name: str
  shape: tuple[int, ...]
  path: tuple[str, ...] = ()
  layer: int | None = None
  layout: str = "same"
  parts: tuple[HFTensor, ...] = ()


def hf_tensor_names(config: LlamaConfig, as_saved: bool = True) -> list[HFTensor]:
  """Every Hugging Face tensor that `config`'s params fill (the inverse of `assemble_params`'s
  tables; no lm_head when the embeddings are tied): as the model_type's checkpoints hold them
  (`as_saved`: fused projections, their own names), or one Llama-named tensor per param."""
  leaves = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
      abstract_params(config))[0]}
  out = [HFTensor(name, _expected_source_shape(layout, leaves[path].shape), path, None, layout)
         for name, (path, layout) in _GLOBAL_TENSORS.items() if path in leaves]
  for layer in range(config.num_layers):
    by_suffix = {suffix: HFTensor(f"model.layers.{layer}.{suffix}",
                                  _expected_source_shape(layout, leaves[("layers",) + path].shape[1:]),
                                  ("layers",) + path, layer, layout)
                 for suffix, (path, layout) in _LAYER_TENSORS.items() if ("layers",) + path in leaves}
    if as_saved and family(config.model_type).fused:
      for fused, parts in _FUSED.items():
        if all(part in by_suffix for part in parts):  # (MPT's MLP has no gate)
          stacked = tuple(by_suffix.pop(part) for part in parts)
          shape = (sum(t.shape[0] for t in stacked),) + stacked[0].shape[1:]
          by_suffix[fused] = HFTensor(f"model.layers.{layer}.{fused}", shape, parts=stacked)
    out += by_suffix.values()
  if as_saved:
    out = [t._replace(name=_renamed(config.model_type, t.name, to_llama=False)) for t in out]
  return out


def hf_tensor(params: dict, tensor: HFTensor) -> np.ndarray:
  """The Hugging Face array of one tensor of `params` (numpy, the params' dtype)."""
  if tensor.parts:
    return np.concatenate([hf_tensor(params, part) for part in tensor.parts])
  node = params
  for key in tensor.path:
    node = node[key]
  w = np.asarray(node if tensor.layer is None else node[tensor.layer])
  return np.ascontiguousarray(_from_layout(w, tensor.layout))


def _check_complete(config: LlamaConfig, shapes: dict, filled: set[tuple]) -> None:
  for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    needed = [keys + (i,) for i in range(config.num_layers)] if keys[0] == "layers" else [keys]
    missing = [k for k in needed if k not in filled]
    if missing:
      raise UserError(f"checkpoint is missing a tensor for parameter {'/'.join(map(str, missing[0]))}")


def read_hf_config(model_dir: Path) -> dict:
  path = model_dir / "config.json"
  try:
    path.stat()
  except (FileNotFoundError, NotADirectoryError):
    raise UserError(f"{model_dir} is not a model dir: no config.json") from None
  except OSError:
    pass  # read_json_object says why it cannot read it
  return read_json_object(path)


def hf_config(model_dir: Path) -> LlamaConfig:
  """The LlamaConfig of an HF model dir; errors name its config.json. Its EOS ids are those of
  generation_config.json when that gives any, as transformers' `generate` stops at them."""
  hf = read_hf_config(model_dir)
  try:
    config = LlamaConfig.from_hf(hf)
  except UserError as e:
    raise UserError(f"{model_dir / 'config.json'}: {e}") from None
  generation = model_dir / "generation_config.json"
  if not generation.is_file():
    return config
  try:
    eos = token_ids(read_json_object(generation).get("eos_token_id"))
  except UserError as e:
    raise UserError(f"{generation}: {e}") from None
  return config.replace(eos_token_ids=eos) if eos else config


def _weight_files(model_dir: Path) -> list[Path]:
  index = model_dir / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
      raise UserError(f"{index} is not a valid safetensors index: its weight_map must map tensor names to "
                      f"file names, got a {type(weight_map).__name__}")
    files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
  else:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
  if not files:
    raise UserError(f"{model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
  for f in files:
    if not f.is_file():
      raise UserError(f"missing weight file {f}")
  return files


def _load_torch_bin(path: Path) -> dict:
  """The state dict in a PyTorch .bin, unpickled with torch's weights-only unpickler (never
  arbitrary objects); memory-mapped unless it is in the legacy (pre-1.6, non-zip) format."""
  try:
    import torch
  except ImportError:
    raise UserError(f"reading {path} needs PyTorch: pip install torch (or convert the model to safetensors)") from None
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # the unpickler raises UnpicklingError, RuntimeError, EOFError, ... on bad bytes
    line = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"{path} is truncated or corrupt: {line[:200]}") from None
  if not isinstance(state, dict):
    raise UserError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
  for name, value in state.items():
    if not isinstance(name, str) or not isinstance(value, torch.Tensor):
      raise UserError(f"{path} holds {name!r} of type {type(value).__name__}, not a tensor")
  return state


def _iter_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
  state = _load_torch_bin(path)
  for name in list(state):
    yield name, state.pop(name).float().numpy()


def iter_hf_tensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
  for path in _weight_files(model_dir):
    reader = safetensors_file.iter_tensors if path.suffix == ".safetensors" else _iter_torch_bin
    yield from reader(path)


def saved_param_dtype(model_dir: Path) -> str:
  """The param dtype an HF model dir's weights keep when none is asked for, as transformers 5 loads
  them: bfloat16 where its config.json says so ("dtype", or transformers 4's "torch_dtype"), else
  float32 (float16 is widened: params are float32 or bfloat16)."""
  hf = read_hf_config(model_dir)
  return "bfloat16" if (hf.get("dtype") or hf.get("torch_dtype")) == "bfloat16" else "float32"


def load_hf(model_dir: Path, param_dtype: str | None = None, on_device: bool = False,
            mesh=None) -> tuple[LlamaConfig, dict]:
  """HF model dir -> (config, params), in `param_dtype` (default: `saved_param_dtype`): numpy arrays, or
  device arrays (`assemble_params`)."""
  param_dtype = param_dtype or saved_param_dtype(model_dir)
  config = _mlp_width_of_tensors(model_dir, hf_config(model_dir).replace(param_dtype=param_dtype))
  return config, assemble_params(config, iter_hf_tensors(model_dir), on_device, mesh)


def _mlp_width_of_tensors(model_dir: Path, config: LlamaConfig) -> LlamaConfig:
  """For a family whose config.json may misstate its MLP width (MPT: transformers builds 4 x d_model
  whatever expansion_ratio says), the width its safetensors hold, with a one-line note if it differs."""
  if not family(config.model_type).mlp_width_from_tensors:
    return config
  name = _renamed(config.model_type, "model.layers.0.mlp.down_proj.weight", to_llama=False)  # [D, F]
  for path in (p for p in _weight_files(model_dir) if p.suffix == ".safetensors"):
    entry = safetensors_file.read_header(path).get(name)
    if entry is None:
      continue
    shape = entry.shape
    if len(shape) == 2 and shape[1] != config.intermediate_size and shape[1] > 0:
      print(f"lminf: note: {model_dir / 'config.json'} implies an MLP of {config.intermediate_size}, its tensors "
            f"hold {shape[1]} (as transformers' {config.model_type} builds them): using {shape[1]}", file=sys.stderr)
      return config.replace(intermediate_size=int(shape[1]))
    return config
  return config
