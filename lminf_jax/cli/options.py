"""What the commands share: argparse types, the attention flags (generated from the methods' options),
token, mesh and output arguments, and the loading they imply."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lminf_jax.errors import UserCodeError, UserError
from lminf_jax.eval.texts import builtin_text
from lminf_jax.util.atomic import check_output_file
from lminf_jax.util.files import read_text, readable_file
from lminf_jax.util.limits import INT32_MAX


def _int_at_least(minimum: int, what: str, maximum: int = INT32_MAX, why: str = "int32 positions"):
  """An argparse type: an integer in [minimum, maximum] (by default what int32 positions hold)."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    if value > maximum:
      raise argparse.ArgumentTypeError(f"must be at most {maximum} ({why}), got {value}")
    return value

  return parse


positive_int = _int_at_least(1, "positive")


non_negative_int = _int_at_least(0, ">= 0")


seed_int = _int_at_least(0, f"in [0, {2**32 - 1}] (a 32-bit PRNG seed)", 2**32 - 1, "a 32-bit PRNG seed")


def _finite_float(accept, what: str):
  """An argparse type: a finite float for which `accept` holds."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and accept(value)):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value

  return parse


temperature_float = _finite_float(lambda t: t >= 0, "a finite number >= 0 (0: greedy)")


top_p_float = _finite_float(lambda p: 0 < p <= 1, "in (0, 1]")


class AttentionFlag(NamedTuple):
  """A command-line flag generated from a built-in method's option."""

  flag: str  # without the leading --
  option: str  # the dataclass field it sets
  methods: tuple[str, ...] | None  # the methods it is for; None: any chosen method with that option
  field: dataclasses.Field  # (of the first built-in method that has the option)
  kind: type  # the field's type without None: int or bool
  scope: str  # "lambda, infllm: " where not every built-in method has the option

  @property
  def dest(self) -> str:
    return "opt_" + self.flag.replace("-", "_")


@functools.cache
def _attention_flags() -> tuple[AttentionFlag, ...]:
  """The attention flags, generated from the built-in methods' options: one flag per option name
  (--n-local), shared by the methods that have it, except where an option is declared
  `per_method` (lminf_jax.attention.option): then each method has its own (--lambda-top-k, --infllm-top-k)."""
  from lminf_jax.attention import ATTENTION_METHODS

  by_name: dict[str, dict[str, dataclasses.Field]] = {}
  for method, cls in ATTENTION_METHODS.items():
    for field in dataclasses.fields(cls):
      by_name.setdefault(field.name, {})[method] = field
  flags = []
  for name, fields in by_name.items():
    shared = {method: f for method, f in fields.items() if not f.metadata.get("per_method")}
    if shared:
      first = next(iter(shared))
      scoped = len(shared) < len(ATTENTION_METHODS)
      flags.append(AttentionFlag(name.replace("_", "-"), name, None, shared[first], _kind(first, name),
                                 ", ".join(shared) + ": " if scoped else ""))
    flags += [AttentionFlag(f"{method}-{name}".replace("_", "-"), name, (method,), field, _kind(method, name),
                            f"{method}: ")
              for method, field in fields.items() if method not in shared]
  return tuple(flags)


def _kind(method: str, option: str) -> type:
  """A built-in method's option's type without None (int, bool, str)."""
  import typing

  from lminf_jax.attention import ATTENTION_METHODS

  hint = typing.get_type_hints(ATTENTION_METHODS[method])[option]
  return next(k for k in typing.get_args(hint) or (hint,) if k is not type(None))


def add_attention_args(p: argparse.ArgumentParser, several: bool = False, feeds: bool = False) -> None:
  """--attention, a flag per built-in method option (`_attention_flags`), --attn-opt for any
  method's options, --rope-scaling, and, for commands that feed a cache (`feeds`), --prefill-chunk."""
  from lminf_jax.attention import ATTENTION_METHODS

  p.add_argument("--attention", default="dense",
                 help=f"attention method{'s, comma-separated' if several else ''}: "
                      f"{' | '.join(ATTENTION_METHODS)} | package.module:ClassName (your own AttentionMethod)")
  group = p.add_argument_group("attention method options (each sets the option of the chosen methods that have it)")
  for a in _attention_flags():
    default, help_text = a.field.default, a.scope + a.field.metadata["help"]
    if a.kind is bool:
      group.add_argument(f"--no-{a.flag}" if default else f"--{a.flag}", dest=a.dest, action="store_const",
                         const=not default, help=help_text)
    else:
      minimum = a.field.metadata["minimum"]
      parse = a.kind if minimum is None else _int_at_least(minimum, "positive" if minimum == 1 else f">= {minimum}")
      choices = a.field.metadata.get("choices")
      group.add_argument(f"--{a.flag}", dest=a.dest, type=parse, choices=choices,
                         metavar="{" + ",".join(choices) + "}" if choices else a.option.upper(),
                         help=help_text + (f" (default {default})" if default is not None else ""))
  group.add_argument("--top-k", dest="legacy_top_k", type=positive_int,
                     help="the old spelling of --lambda-top-k or --infllm-top-k, for whichever of the two is chosen")
  group.add_argument("--attn-opt", action="append", default=[], metavar="NAME=VALUE",
                     help="any option of the chosen methods, yours included (repeatable), e.g. --attn-opt stride=4")
  add_rope_scaling_arg(p)
  if feeds:
    p.add_argument("--prefill-chunk", type=positive_int,
                   help="tokens fed through the cache at a time (default: the method's chunk; infllm: always its chunk)")


def _rope_scaling_spec(text: str) -> str:
  """An argparse type: a `with_rope_scaling` spec, checked as far as it can be before the model loads."""
  from lminf_jax.models.rope_scaling import parse_rope_scaling

  try:
    parse_rope_scaling(text)
  except UserError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def add_rope_scaling_arg(p: argparse.ArgumentParser) -> None:
  p.add_argument("--rope-scaling", type=_rope_scaling_spec, metavar="KIND:NAME=VALUE,...",
                 help="RoPE scaling put on the model zero-shot (replacing its own), KIND ntk, linear, dynamic or "
                      "yarn, e.g. yarn:factor=4 or dynamic:factor=2 (lminf_jax.with_rope_scaling)")


CKPT_HELP = "checkpoint dir, HF model dir, .gguf file or hub id ORG/NAME[@REVISION]"


def load_on_mesh(ckpt: str | Path, mesh, rope_scaling: str | None = None) -> tuple:
  """(config, params, tokenizer) of `ckpt`, the params placed on `mesh` (None: one device), the
  config with `rope_scaling` if given (`with_rope_scaling`), with a one-line note when the mesh's
  tensor axis does not divide the model's heads (they are replicated over it)."""
  import sys

  from lminf_jax.loading import load
  from lminf_jax.models.rope_scaling import with_rope_scaling

  config, params, tokenizer = load(Path(ckpt), mesh=mesh)
  if rope_scaling is not None:
    config = with_rope_scaling(config, rope_scaling)
  tensor = 1 if mesh is None else dict(mesh.shape).get("tensor", 1)
  odd = [f"{n} {what}" for n, what in ((config.num_heads, "heads"), (config.num_kv_heads, "kv heads")) if n % tensor]
  if odd:
    print(f"lminf: note: tensor={tensor} does not divide the model's {' and '.join(odd)}: they are replicated over it",
          file=sys.stderr)
  return config, params, tokenizer


def add_token_source_args(p: argparse.ArgumentParser, text_help: str) -> None:
  """CKPT and the tokens `read_token_ids` reads: --text-file or --tokens-file, --max-tokens."""
  p.add_argument("ckpt", help=CKPT_HELP)
  source = p.add_mutually_exclusive_group()
  source.add_argument("--text-file", help=text_help)
  source.add_argument("--tokens-file", help="1-D integer .npy of token ids")
  p.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--mesh", help="device mesh AXIS=SIZE[,AXIS=SIZE...] over data, fsdp, tensor, sequence "
                                "(-1: the rest of the devices), e.g. sequence=8 or data=2,sequence=4")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() (settings from the environment or below)")
  p.add_argument("--coordinator", help="multi-host: coordinator address host:port")
  p.add_argument("--num-processes", type=positive_int, help="multi-host: number of processes")
  p.add_argument("--process-id", type=non_negative_int, help="multi-host: this process's id")


def mesh_from_args(args: argparse.Namespace):
  """Starts the multi-host runtime if asked; returns the --mesh mesh, or None without --mesh."""
  if args.distributed or args.coordinator or args.num_processes:
    import jax

    try:
      jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                 process_id=args.process_id)
    except Exception as e:  # off Cloud TPU and without settings: a long ValueError / RuntimeError
      line = (str(e).splitlines() or [""])[0][:120]
      raise UserError(f"cannot start the multi-host runtime ({type(e).__name__}: {line}); pass --coordinator, "
                      f"--num-processes and --process-id") from None
  if not args.mesh:
    return None
  from lminf_jax.sharding import make_mesh, parse_mesh

  return make_mesh(parse_mesh(args.mesh))


def attention_from_args(args: argparse.Namespace, name: str):
  """The attention spec named `name` (built in, or package.module:ClassName), with its options
  from the generated flags and --attn-opt."""
  from lminf_jax.attention import method_class

  cls = method_class(name)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  given = {}
  for a in _attention_flags():
    value = getattr(args, a.dest, None)
    if value is not None and a.option in fields and (a.methods is None or name in a.methods):
      given[a.option] = value
  if args.legacy_top_k is not None and "top_k" in fields:
    chosen = {n.strip() for n in args.attention.split(",")}
    if {"lambda", "infllm"} <= chosen:
      raise UserError("--top-k is ambiguous with both lambda and infllm: use --lambda-top-k and --infllm-top-k")
    given["top_k"] = args.legacy_top_k
  for item in args.attn_opt:
    option, equals, text = item.partition("=")
    option = option.strip()
    if not equals or not option:
      raise UserError(f"--attn-opt {item!r}: give NAME=VALUE")
    if option not in fields:
      if all(option not in {f.name for f in dataclasses.fields(method_class(n.strip()))}
             for n in args.attention.split(",") if n.strip()):
        raise UserError(f"--attn-opt {item}: {cls.__name__} has no option {option!r} (options: "
                        f"{', '.join(fields)})")
      continue
    given[option] = _parse_option(cls, option, text, item)
  try:
    return cls(**given)
  except UserError as e:
    raise UserError(f"{name}: {e}") from None
  except Exception as e:  # a user's class: its __post_init__, or abstract methods it lacks
    raise UserCodeError(f"{name}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in given.items())})", e) from e


def _parse_option(cls, option: str, text: str, item: str):
  """An --attn-opt value parsed by the type of the method's field (int, float, bool, str; "none" for None)."""
  import types
  import typing

  kind = typing.get_type_hints(cls)[option]
  kinds = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union \
      else (kind,)
  if type(None) in kinds and text.strip().lower() == "none":
    return None
  for k in kinds:
    if k is bool:
      if text.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return text.strip().lower() in ("true", "1", "yes")
    elif k in (int, float, str):
      try:
        return k(text)
      except ValueError:
        pass
  names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
  raise UserError(f"--attn-opt {item}: {cls.__name__}.{option} takes {names}, got {text!r}")


def read_token_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> np.ndarray:
  """1-D int32 token ids from --tokens-file, else --text-file (default: the built-in text),
  tokenized without special tokens."""
  if args.tokens_file:
    path = readable_file(args.tokens_file)
    try:
      ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise UserError(f"{args.tokens_file} is not a valid .npy file: {e}") from None
    if not isinstance(ids, np.ndarray):  # an .npz archive
      ids.close()
      raise UserError(f"{args.tokens_file} is an .npz archive; give a 1-D .npy of token ids")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise UserError(f"{args.tokens_file} must hold a 1-D integer array, got {ids.dtype} {ids.shape}")
  else:
    if tokenizer is None:
      raise UserError("this model has no tokenizer; use --tokens-file")
    text = read_text(args.text_file) if args.text_file else builtin_text()
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"])
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise UserError(f"token ids must be in [0, {vocab_size}), got range [{ids.min()}, {ids.max()}]")
  if args.max_tokens:
    ids = ids[: args.max_tokens]
  return ids.astype(np.int32)


def parse_lengths(text: str) -> list[int]:
  return [positive_int(x) for x in text.split(",")]


def load_model_and_tokens(args: argparse.Namespace) -> tuple:
  """(mesh, config, params placed on it, token ids, tokenizer); check the output paths first."""

  mesh = mesh_from_args(args)
  config, params, tokenizer = load_on_mesh(args.ckpt, mesh, args.rope_scaling)
  return mesh, config, params, read_token_ids(args, tokenizer, config.vocab_size), tokenizer


def mesh_context(mesh):
  import jax

  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def place_tokens(tokens_bt, mesh):
  if mesh is None:
    return tokens_bt
  import jax

  from lminf_jax.sharding import data_sharding

  return jax.device_put(tokens_bt, data_sharding(mesh, tokens_bt.shape))


def methods_from_args(args: argparse.Namespace) -> dict:
  names = [n.strip() for n in args.attention.split(",") if n.strip()]
  if not names:
    raise UserError("--attention names no method")
  return {name: attention_from_args(args, name) for name in names}


def _load_for_answers(args: argparse.Namespace, outputs: list[tuple[str | None, str]]):
  """Checks the output files (path, suffix), then loads the model, which needs a tokenizer, on
  the --mesh: (mesh or None, config, params, tokenizer)."""

  for path, suffix in outputs:
    if path is not None:
      check_output_file(Path(path), suffix)
  mesh = mesh_from_args(args)
  config, params, tokenizer = load_on_mesh(args.ckpt, mesh, args.rope_scaling)
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  return mesh, config, params, tokenizer
