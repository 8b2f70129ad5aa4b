"""One entry point for models: checkpoint dirs, Hugging Face dirs and .gguf files."""

from __future__ import annotations

from pathlib import Path

from lminf_jax.util.atomic import check_output_dir
from lminf_jax.convert.checkpoint import is_checkpoint, load_checkpoint, read_config, save_checkpoint
from lminf_jax.convert.gguf_file import load_gguf, open_gguf
from lminf_jax.convert.gguf_tokenizer import gguf_tokenizer
from lminf_jax.convert.hf import load_hf
from lminf_jax.errors import UserError
from lminf_jax.models.config import LlamaConfig
from lminf_jax.util.hub import cached_checkpoint, hub_id, snapshot


def _auto_tokenizer(model_dir: Path):
  """transformers' AutoTokenizer of `model_dir`; any failure (a corrupt tokenizer.json, ...) is one line."""
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(str(model_dir))
  except Exception as e:
    line = (str(e).splitlines() or [""])[0][:200]
    raise UserError(f"cannot read the tokenizer of {model_dir}: {type(e).__name__}: {line}") from None


def _hf_tokenizer(model_dir: Path):
  if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    return None
  return _auto_tokenizer(model_dir)


def convert_source(src: Path, dtype: str | None = None, on_device: bool = False,
                   mesh=None) -> tuple[LlamaConfig, dict, object]:
  """HF dir, .gguf or hub id ORG/NAME[@REVISION] -> (config, params, tokenizer or None), in memory, in
  `dtype` (default: an HF dir's own, `saved_param_dtype`; a GGUF's dequantised float32): numpy arrays, or
  `on_device` device arrays (on `mesh`, else the default device), one tensor on the host at a time."""
  if hub := hub_id(src):
    src = snapshot(hub)
  src = Path(src)
  if not src.exists():
    raise UserError(f"no such file or directory: {src}")
  if src.is_file():
    if src.suffix != ".gguf":
      raise UserError(f"{src} is not a .gguf file or a model dir")
    config, params = load_gguf(src, dtype or "float32", on_device, mesh)
    return config, params, gguf_tokenizer(open_gguf(src), src)
  config, params = load_hf(src, dtype, on_device, mesh)
  return config, params, _hf_tokenizer(src)


def convert_checkpoint(src: Path, out: Path, dtype: str | None = None) -> Path:
  """Converts an HF dir, .gguf file or hub id (ORG/NAME[@REVISION]) into a checkpoint dir at `out`
  (atomically), in `dtype` (default: `convert_source`'s)."""
  check_output_dir(out)  # before the conversion's work
  config, params, tokenizer = convert_source(src, dtype)
  return save_checkpoint(out, config, params, tokenizer)


def load(path: Path, dtype: str | None = None, mesh=None) -> tuple[LlamaConfig, dict, object]:
  """Loads (config, params, tokenizer) from a checkpoint dir, an HF dir, a .gguf file or a hub id
  ORG/NAME[@REVISION] (converted once into lminf's cache, lminf_jax.util.hub).

  `dtype` casts the params; with a `mesh` they are placed by `lminf_jax.models.params.param_shardings`
  (a checkpoint is restored straight into that sharding)."""
  from lminf_jax.models.params import param_shardings

  if hub := hub_id(path):
    path = cached_checkpoint(hub, dtype)
  path = Path(path).expanduser()
  if path.is_dir() and is_checkpoint(path):
    config = read_config(path).replace(**({"param_dtype": dtype} if dtype else {}))
    config, params = load_checkpoint(path, dtype, param_shardings(config, mesh) if mesh else None)
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return config, params, _auto_tokenizer(path) if has_tokenizer else None
  return convert_source(path, dtype, on_device=True, mesh=mesh)
