"""The `lminf` command line. Bad input prints one line `lminf: error: ...` and exits non-zero."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import math
import logging
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lminf_jax.util import interrupt
from lminf_jax.util.atomic import atomic_file, check_output_dir, check_output_file, disk_full
from lminf_jax.errors import UserError, without_closed_loop_reports
from lminf_jax.util.files import read_text, readable_file
from lminf_jax.util.limits import INT32_MAX, check_fits, device_memory
from lminf_jax.eval.ruler import TASKS as RULER_TASKS
from lminf_jax.eval.texts import builtin_text


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, no usage dump
    print(f"lminf: error: {message}", file=sys.stderr)
    sys.exit(2)


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
  """The attention flags, generated from the built-in methods' options. An option with the same
  help text in every method that has it is one flag (--n-local); otherwise each method has its
  own (--lambda-top-k, --infllm-top-k)."""
  import typing

  from lminf_jax.attention import ATTENTION_METHODS

  by_name: dict[str, dict[str, dataclasses.Field]] = {}
  for method, cls in ATTENTION_METHODS.items():
    for field in dataclasses.fields(cls):
      by_name.setdefault(field.name, {})[method] = field
  flags = []
  for name, fields in by_name.items():
    first = next(iter(fields))
    hint = typing.get_type_hints(ATTENTION_METHODS[first])[name]
    kind = next(k for k in typing.get_args(hint) or (hint,) if k is not type(None))
    scoped = len(fields) < len(ATTENTION_METHODS)
    if len({f.metadata["help"] for f in fields.values()}) == 1:
      flags.append(AttentionFlag(name.replace("_", "-"), name, None, fields[first], kind,
                                 ", ".join(fields) + ": " if scoped else ""))
    else:
      flags += [AttentionFlag(f"{method}-{name}".replace("_", "-"), name, (method,), field, kind, f"{method}: ")
                for method, field in fields.items()]
  return tuple(flags)


def add_attention_args(p: argparse.ArgumentParser, several: bool = False, feeds: bool = False) -> None:
  """--attention, a flag per built-in method option (`_attention_flags`), --attn-opt for any
  method's options, and, for commands that feed a cache (`feeds`), --prefill-chunk."""
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
  if feeds:
    p.add_argument("--prefill-chunk", type=positive_int,
                   help="tokens fed through the cache at a time (default: the method's chunk; infllm: always its chunk)")


def add_token_source_args(p: argparse.ArgumentParser, text_help: str) -> None:
  """CKPT and the tokens `read_token_ids` reads: --text-file or --tokens-file, --max-tokens."""
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
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


def check_memory(config, attention, max_len: int | None = None, batch: int = 1) -> None:
  """Refuses, from sizes alone (nothing allocated), what would not fit in the device's memory:
  one layer's keys and values over the attention's window (banded attention pads a chunk's keys
  to it, however few tokens there are), and a cache for `max_len` tokens, if given (refused, too,
  beyond int32 positions)."""
  import jax
  import jax.numpy as jnp

  from lminf_jax.cache import init_cache

  spec = config.resolve_attention(attention)
  name, memory = spec.name.lower(), device_memory()
  if window := spec.window_tokens():
    per_token = 2 * batch * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    check_fits(f"{name} attention over a window of {window} tokens", (window + getattr(spec, "chunk", 0)) * per_token,
               memory)
  if max_len is None:
    return
  if max_len > INT32_MAX:
    raise UserError(f"{max_len} tokens are more than int32 positions hold (at most {INT32_MAX})")
  shapes = jax.eval_shape(lambda: init_cache(config, spec, batch, max_len=max_len))
  nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
  check_fits(f"a {name} cache for {max_len} tokens", nbytes, memory)


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


def cmd_convert(args: argparse.Namespace) -> None:
  from lminf_jax.loading import convert_checkpoint

  start = time.perf_counter()
  out = convert_checkpoint(Path(args.src), Path(args.out), args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def cmd_export(args: argparse.Namespace) -> None:
  from lminf_jax.convert.export import write_hf
  from lminf_jax.loading import load

  start = time.perf_counter()
  out = check_output_dir(Path(args.out))
  config, params, tokenizer = load(Path(args.ckpt))
  write_hf(out, config, params, tokenizer, args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def cmd_fetch(args: argparse.Namespace) -> None:
  from lminf_jax.util.fetch import fetch_smollm2

  print(fetch_smollm2(Path(args.out) if args.out else None))


def load_model_and_tokens(args: argparse.Namespace) -> tuple:
  """(mesh, config, params placed on it, token ids, tokenizer); check the output paths first."""
  from lminf_jax.loading import load

  mesh = mesh_from_args(args)
  config, params, tokenizer = load(Path(args.ckpt), mesh=mesh)
  return mesh, config, params, read_token_ids(args, tokenizer, config.vocab_size), tokenizer


def cmd_nll(args: argparse.Namespace) -> None:
  import jax.numpy as jnp

  from lminf_jax.inference.forward import cached_token_nll, token_nll

  attention = attention_from_args(args, args.attention)
  if args.cached and args.mesh:
    raise UserError("--cached runs on one device; drop --mesh")
  out = check_output_file(Path(args.out), ".npy")
  mesh, config, params, ids, _ = load_model_and_tokens(args)
  if ids.size < 2:
    raise UserError(f"need at least 2 tokens, got {ids.size}")
  check_memory(config, attention, int(ids.size) if args.cached else None)
  start = time.perf_counter()
  with mesh_context(mesh):
    tokens = place_tokens(jnp.asarray(ids)[None], mesh)
    if args.cached:
      nll = np.asarray(cached_token_nll(params, config, tokens, attention=attention, chunk=args.prefill_chunk))[0]
    else:
      nll = np.asarray(token_nll(params, config, tokens, attention=attention))[0]
  seconds = time.perf_counter() - start
  buffer = io.BytesIO()  # np.save to a file writes from C, whose errors carry no errno (a full disk)
  np.save(buffer, nll.astype(np.float32))
  with atomic_file(out) as tmp:
    tmp.write_bytes(buffer.getvalue())
  mean = float(nll.mean())
  print(f"{ids.size} tokens  mean NLL {mean:.4f}  perplexity {np.exp(mean):.3f}  "
        f"({ids.size / seconds:.0f} tokens/s, {args.attention})")


def mesh_context(mesh):
  import jax

  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def place_tokens(tokens_bt, mesh):
  if mesh is None:
    return tokens_bt
  import jax

  from lminf_jax.sharding import data_sharding

  return jax.device_put(tokens_bt, data_sharding(mesh, tokens_bt.shape))


def run_ppl(ckpt: Path, text: str, lengths: list[int], methods: dict, offset: int, bucket: int,
            json_out: Path | None, plot_out: Path | None, title: str, mesh=None) -> None:
  from lminf_jax.eval import perplexity as evaluate
  from lminf_jax.loading import load

  for out, suffix in ((json_out, None), (plot_out, ".png")):
    if out is not None:
      check_output_file(out, suffix)
  config, params, tokenizer = load(ckpt, mesh=mesh)
  if tokenizer is None:
    raise UserError(f"{ckpt} has no tokenizer")
  for spec in methods.values():
    check_memory(config, spec)
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
  with mesh_context(mesh):
    results = evaluate.perplexity_vs_length(params, config, ids, lengths, methods, offset, bucket,
                                            place=lambda tokens: place_tokens(tokens, mesh))
  print(evaluate.format_table(results, bucket))
  if json_out is not None:
    with atomic_file(json_out) as tmp:
      evaluate.write_json(tmp, results, bucket, dict(checkpoint=str(ckpt), offset=offset,
                                                     methods={k: repr(v) for k, v in methods.items()}))
    print(f"wrote {json_out}")
  if plot_out is not None:
    with atomic_file(plot_out) as tmp:
      evaluate.plot(tmp, results, bucket, title)
    print(f"wrote {plot_out}")


def methods_from_args(args: argparse.Namespace) -> dict:
  names = [n.strip() for n in args.attention.split(",") if n.strip()]
  if not names:
    raise UserError("--attention names no method")
  return {name: attention_from_args(args, name) for name in names}


def cmd_ppl(args: argparse.Namespace) -> None:
  methods = methods_from_args(args)
  text = read_text(args.text_file) if args.text_file else builtin_text()
  title = f"{Path(args.ckpt).name}: {Path(args.text_file).name if args.text_file else 'built-in text'}"
  run_ppl(Path(args.ckpt), text, args.lengths, methods, args.offset, args.bucket,
          Path(args.json) if args.json else None, Path(args.plot) if args.plot else None, title, mesh_from_args(args))


def cmd_demo(args: argparse.Namespace) -> None:
  """The main job: SmolLM2, dense against lambda, past the 8192-token training length."""
  from lminf_jax.attention import Dense, Lambda
  from lminf_jax.util.fetch import fetch_smollm2

  out = check_output_dir(Path(args.out), exist_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  ckpt = fetch_smollm2()
  methods = {"dense": Dense(), "lambda": Lambda(n_global=10, n_local=8192)}
  run_ppl(ckpt, builtin_text(), [args.length], methods, 0, 1024, out / "ppl.json", out / "ppl.png",
          f"SmolLM2-135M on Python's help topics ({args.length} tokens)")


def cmd_generate(args: argparse.Namespace) -> None:
  import jax

  from lminf_jax.inference.generation import Sampling, generate
  from lminf_jax.loading import load

  prompt = read_text(args.prompt_file) if args.prompt_file else args.prompt
  if not prompt:
    raise UserError("empty prompt")
  attention = attention_from_args(args, args.attention)
  sampling = Sampling(args.temperature, args.top_k_sample, args.top_p)
  config, params, tokenizer = load(Path(args.ckpt))
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  if not ids:
    raise UserError("empty prompt")
  check_memory(config, attention, len(ids) + args.max_new_tokens)
  generated: list[int] = []
  printed = [0]

  def on_tokens(step, tokens):  # host side, after every decode step: stream text, check stop strings
    generated.append(int(tokens[0]))
    text = tokenizer.decode(generated, skip_special_tokens=True)
    print(text[printed[0]:], end="", flush=True)
    printed[0] = len(text)
    return np.asarray([interrupt.requested() or any(stop in text for stop in args.stop)])

  stats: dict = {}
  generate(params, config, [ids], args.max_new_tokens, attention, sampling, jax.random.PRNGKey(args.seed),
           chunk=args.prefill_chunk, on_tokens=on_tokens, stats=stats)
  print(f"\n[prefill {stats['prompt_tokens']} tokens at {stats['prompt_tokens'] / stats['prefill_seconds']:.1f} tok/s, "
        f"decode {stats['new_tokens']} tokens at {stats['new_tokens'] / stats['decode_seconds']:.1f} tok/s "
        f"(compile included)]")


def cmd_stream_ppl(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.cache import init_cache
  from lminf_jax.loading import load
  from lminf_jax.inference.stream import document_stream, peak_rss_mib, stream_nll

  attention = attention_from_args(args, args.attention)
  config, params, tokenizer = load(Path(args.ckpt))
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  text = read_text(args.text_file) if args.text_file else builtin_text()
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
  if ids.size < 2:
    raise UserError("the text has fewer than 2 tokens")
  check_memory(config, attention, args.tokens)
  cache = init_cache(config, attention, 1, max_len=args.tokens)
  total = args.tokens
  chunk = config.resolve_attention(attention).feed_chunk(args.prefill_chunk)
  chunks = document_stream(ids, total, config.bos_token_id, chunk)
  print(f"streaming {total} tokens ({ids.size} per document) with {args.attention}, chunk {chunk}")
  print(f"{'segment':>8} {'tokens':>17} {'mean NLL':>9} {'tokens/s':>9} {'peak RSS MiB':>13}")

  def report(index, mean, rate, rss):
    span = f"{index * args.segment}-{min(total, (index + 1) * args.segment)}"
    tqdm.write(f"{index:>8} {span:>17} {mean:>9.4f} {rate:>9.1f} {rss:>13.0f}")

  start = time.perf_counter()
  with tqdm(total=total, unit="tok", desc="stream-ppl") as bar:
    nll = stream_nll(params, config, cache, chunks, total, attention, args.segment, report, bar)
  seconds = time.perf_counter() - start
  print(f"overall: mean NLL {nll.mean():.4f}, perplexity {np.exp(nll.mean()):.3f}, {total / seconds:.1f} tokens/s, "
        f"peak RSS {peak_rss_mib():.0f} MiB")


def cmd_passkey(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.inference.generation import generate
  from lminf_jax.eval.passkey import depth_bucket, first_integer, make_sample, plot_heatmap

  methods = methods_from_args(args)
  config, params, tokenizer = _load_for_answers(args, [(args.json, None), (args.plot, ".png")])
  for spec in methods.values():  # (each answer is 8 new tokens)
    check_memory(config, spec, max(args.lengths) + 8, batch=args.batch)
  rng = np.random.default_rng(args.seed)
  samples = {length: [make_sample(tokenizer, length, rng) for _ in range(args.samples)] for length in args.lengths}
  results = []
  total = len(methods) * sum(args.lengths) * args.samples
  with tqdm(total=total, unit="tok", desc="passkey") as bar:
    for name, spec in methods.items():
      for length, batch in samples.items():
        for start in range(0, len(batch), args.batch):
          rows = batch[start:start + args.batch]
          outputs = generate(params, config, [s.token_ids for s in rows], 8, spec, chunk=args.prefill_chunk)
          for sample, out in zip(rows, outputs):
            answer = first_integer(tokenizer.decode(out, skip_special_tokens=True))
            results.append(dict(method=name, length=length, depth=sample.depth, key=sample.key, answer=answer,
                                correct=answer == sample.key, prompt_tokens=len(sample.token_ids)))
          bar.update(length * len(rows))
  buckets = args.depth_buckets
  header = " ".join(f"d{b * 100 // buckets:02d}-{(b + 1) * 100 // buckets:02d}" for b in range(buckets))
  print(f"{'method':<10} {'length':>7} {'accuracy':>9}   per depth bucket: {header}")
  for name in methods:
    for length in args.lengths:
      rows = [r for r in results if r["method"] == name and r["length"] == length]
      per_bucket = []
      for b in range(buckets):
        hits = [r["correct"] for r in rows if depth_bucket(r["depth"], buckets) == b]
        per_bucket.append(f"{sum(hits)}/{len(hits)}" if hits else "-")
      accuracy = sum(r["correct"] for r in rows) / len(rows)
      print(f"{name:<10} {length:>7} {accuracy:>9.2f}   " + " ".join(f"{x:>7}" for x in per_bucket))
  _write_json(args.json, dict(methods={k: repr(v) for k, v in methods.items()}, results=results))
  if args.plot is not None:
    with atomic_file(Path(args.plot)) as tmp:
      plot_heatmap(tmp, results, list(methods), args.lengths, buckets,
                   f"passkey retrieval: {Path(args.ckpt).name}, {args.samples} samples per length")
    print(f"wrote {args.plot}")


def _load_for_answers(args: argparse.Namespace, outputs: list[tuple[str | None, str]]):
  """Checks the output files (path, suffix), then loads the model, which needs a tokenizer."""
  from lminf_jax.loading import load

  for path, suffix in outputs:
    if path is not None:
      check_output_file(Path(path), suffix)
  config, params, tokenizer = load(Path(args.ckpt))
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  return config, params, tokenizer


def _write_json(path: str | None, report: dict) -> None:
  import json

  if path is not None:
    with atomic_file(Path(path)) as tmp:
      tmp.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


def cmd_ruler(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.eval import ruler

  methods = methods_from_args(args)
  tasks = ruler.task_names(args.tasks)
  config, params, tokenizer = _load_for_answers(args, [(args.json, None), (args.plot, ".png")])
  most_new = max(ruler.TASKS[t].new_tokens for t in tasks)
  for spec in methods.values():
    check_memory(config, spec, max(args.lengths) + most_new, batch=args.batch)
  essay = read_text(args.haystack_file) if args.haystack_file else builtin_text()
  samples = ruler.generate_samples(tokenizer, tasks, args.lengths, args.samples, args.seed, essay)
  start = time.perf_counter()
  total = len(methods) * len(tasks) * sum(args.lengths) * args.samples
  with tqdm(total=total, unit="tok", desc="ruler") as bar:
    results = ruler.evaluate(params, config, tokenizer, methods, samples, args.batch, args.prefill_chunk, bar.update)
  seconds = time.perf_counter() - start
  print(f"RULER score (string_match_all x 100), {args.samples} samples per cell, {seconds:.0f} s")
  print(f"{'method':<10} {'task':<16} " + " ".join(f"{n:>8}" for n in args.lengths))
  for name in methods:
    grid = ruler.score_grid(results, name, tasks, args.lengths)
    for task, row in zip(tasks + ["mean"], list(grid) + [np.nanmean(grid, axis=0)]):
      print(f"{name:<10} {task:<16} " + " ".join(f"{100 * x:>8.1f}" for x in row))
  _write_json(args.json, dict(methods={k: repr(v) for k, v in methods.items()}, tasks=tasks, lengths=args.lengths,
                              samples=args.samples, seed=args.seed, seconds=seconds, results=results))
  if args.plot is not None:
    from lminf_jax.eval.plots import heatmap

    with atomic_file(Path(args.plot)) as tmp:
      heatmap(tmp, {m: ruler.score_grid(results, m, tasks, args.lengths) for m in methods},
              [str(n) for n in args.lengths], tasks, "context length (tokens)", "task",
              f"RULER: {Path(args.ckpt).name}, {args.samples} samples per cell", "score")
    print(f"wrote {args.plot}")


def cmd_longbench(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.eval import longbench

  methods = methods_from_args(args)
  spec = longbench.task(args.task)
  longbench.check_packages(spec)
  records = longbench.read_jsonl(readable_file(args.data))
  if args.samples:
    records = records[:args.samples]
  config, params, tokenizer = _load_for_answers(args, [(args.json, None)])
  max_length = args.max_length or config.max_position_embeddings - spec.max_new_tokens
  for attention in methods.values():  # (a chat template adds a few tokens)
    check_memory(config, attention, max_length + spec.max_new_tokens + 64, batch=args.batch)
  start = time.perf_counter()
  with tqdm(total=len(methods) * len(records), unit="sample", desc=args.task) as bar:
    results = longbench.evaluate(params, config, tokenizer, methods, args.task, records, max_length, args.batch,
                                 args.prefill_chunk, bar.update)
  seconds = time.perf_counter() - start
  means = {m: 100 * float(np.mean([r["score"] for r in results if r["method"] == m])) for m in methods}
  print(f"LongBench {args.task} ({spec.metric}, x 100), {len(records)} samples, max length {max_length}, "
        f"{seconds:.0f} s")
  for name, mean in means.items():
    print(f"{name:<10} {mean:>7.2f}")
  _write_json(args.json, dict(task=args.task, metric=spec.metric, max_length=max_length, data=str(args.data),
                              methods={k: repr(v) for k, v in methods.items()}, mean=means, seconds=seconds,
                              results=results))


def cmd_finetune(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.inference.stream import peak_rss_mib
  from lminf_jax.train import TrainSettings, finetune

  settings = TrainSettings(seq_len=args.seq_len, steps=args.steps, lr=args.lr, batch=args.batch, accum=args.accum,
                           train=args.train, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                           clip_norm=args.clip_norm, remat=not args.no_remat, bf16=args.bf16, seed=args.seed)
  attention = attention_from_args(args, args.attention)
  out = check_output_dir(Path(args.out), exist_ok=True)
  mesh, config, params, ids, tokenizer = load_model_and_tokens(args)
  check_memory(config, attention, batch=args.batch)
  bars = []  # made at the first step, after every input check

  def on_step(record: dict) -> None:
    if not bars:
      bars.append(tqdm(total=settings.steps, initial=record["step"] - 1, unit="step", desc="finetune"))
    bars[0].set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
    bars[0].update(1)

  try:
    history = finetune(config, params, ids, settings, out, attention, resume=args.resume, save_every=args.save_every,
                       keep=args.keep, tokenizer=tokenizer, mesh=mesh, on_step=on_step)
  finally:
    for bar in bars:
      bar.close()
  timed = [r["tokens_per_s"] for r in history[1:]] or [history[-1]["tokens_per_s"]]
  print(f"step {history[-1]['step']}: loss {history[-1]['loss']:.4f} (first {history[0]['loss']:.4f}); "
        f"{np.median(timed):.0f} tokens/s (median, compile excluded); peak RSS {peak_rss_mib():.0f} MiB")
  print(f"wrote {out / 'final'} (checkpoint), {out / 'log.json'}, {out / 'loss.png'}")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="lminf", description="Training-free long-context attention for Llama models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("convert", help="HF model dir or .gguf file -> checkpoint dir")
  p.add_argument("src")
  p.add_argument("out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser("export", help="checkpoint dir (or HF dir, .gguf) -> Hugging Face model dir (safetensors)")
  p.add_argument("ckpt")
  p.add_argument("out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the checkpoint's")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("fetch", help="download and convert a real test model")
  p.add_argument("model", choices=("smollm2",))
  p.add_argument("--out", help="checkpoint dir (default: under ~/.cache/lminf_jax/)")
  p.set_defaults(func=cmd_fetch)

  p = sub.add_parser("nll", help="per-token negative log-likelihoods of a text")
  add_token_source_args(p, "UTF-8 text (default: the built-in text, Python's help topics)")
  p.add_argument("--out", required=True, help="output .npy of float32 NLLs, length T-1")
  p.add_argument("--cached", action="store_true",
                 help="feed the text through a fixed-size cache, --prefill-chunk tokens at a time (same result)")
  add_attention_args(p, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_nll)

  p = sub.add_parser("generate", help="generate text after a prompt, streaming the tokens")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  prompt = p.add_mutually_exclusive_group(required=True)
  prompt.add_argument("--prompt")
  prompt.add_argument("--prompt-file")
  p.add_argument("--max-new-tokens", type=positive_int, default=128)
  p.add_argument("--temperature", type=temperature_float, default=0.0, help="0: greedy")
  p.add_argument("--top-p", type=top_p_float, help="nucleus sampling mass, in (0, 1]")
  p.add_argument("--top-k-sample", dest="top_k_sample", type=positive_int, help="sample among the k likeliest")
  p.add_argument("--seed", type=seed_int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  add_attention_args(p, feeds=True)
  p.set_defaults(func=cmd_generate)

  p = sub.add_parser("stream-ppl", help="streaming perplexity through the fixed-size cache")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  p.add_argument("--text-file", help="UTF-8 text (default: the built-in text); repeats as documents if short")
  p.add_argument("--tokens", type=_int_at_least(2, ">= 2"), default=100_000, help="tokens to stream")
  p.add_argument("--segment", type=positive_int, default=20_000, help="tokens per reported segment")
  add_attention_args(p, feeds=True)
  p.set_defaults(func=cmd_stream_ppl, attention="lambda")

  p = sub.add_parser("passkey", help="passkey retrieval accuracy per length and needle depth")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  p.add_argument("--lengths", type=parse_lengths, default=[2048, 4096, 8192, 16384], help="prompt lengths in tokens")
  p.add_argument("--samples", type=positive_int, default=20, help="samples per length")
  p.add_argument("--seed", type=seed_int, default=0)
  p.add_argument("--batch", type=positive_int, default=4, help="samples decoded together (left-padded)")
  p.add_argument("--depth-buckets", type=positive_int, default=5)
  p.add_argument("--json", help="write every sample's result as JSON")
  p.add_argument("--plot", help="write a PNG heatmap: context length x needle depth, accuracy, a panel per method")
  add_attention_args(p, several=True, feeds=True)
  p.set_defaults(func=cmd_passkey, attention="lambda,dense")

  p = sub.add_parser("ruler", help="RULER's synthetic tasks: score per task, length and method")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  p.add_argument("--lengths", type=parse_lengths, default=[4096, 8192, 16384], help="prompt lengths in tokens")
  p.add_argument("--tasks", default=",".join(RULER_TASKS), help="comma-separated RULER tasks (default: all)")
  p.add_argument("--samples", type=positive_int, default=10, help="samples per task and length")
  p.add_argument("--seed", type=seed_int, default=0)
  p.add_argument("--batch", type=positive_int, default=4, help="samples decoded together")
  p.add_argument("--haystack-file", help="UTF-8 text for the essay haystacks (default: the built-in text)")
  p.add_argument("--json", help="write every sample's result as JSON")
  p.add_argument("--plot", help="write a PNG heatmap: task x length, score, a panel per method")
  add_attention_args(p, several=True, feeds=True)
  p.set_defaults(func=cmd_ruler, attention="lambda,dense")

  p = sub.add_parser("longbench", help="a LongBench task from its JSONL file: predictions and the task's metric")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  p.add_argument("--data", required=True, help="the task's LongBench JSONL file (e.g. data/qasper.jsonl)")
  p.add_argument("--task", required=True, help="LongBench task name (e.g. qasper)")
  p.add_argument("--max-length", type=positive_int,
                 help="prompt tokens kept, cut in the middle (default: the training length - the task's new tokens)")
  p.add_argument("--samples", type=positive_int, help="only the first N records")
  p.add_argument("--batch", type=positive_int, default=1, help="records decoded together")
  p.add_argument("--json", help="write every prediction, its score and the mean as JSON")
  add_attention_args(p, several=True, feeds=True)
  p.set_defaults(func=cmd_longbench, attention="lambda")

  p = sub.add_parser("ppl", help="NLL per position bucket against length, for several attention methods")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  p.add_argument("--text-file", help="UTF-8 text (default: the built-in text)")
  p.add_argument("--lengths", type=parse_lengths, default=[4096, 8192, 16384], help="comma-separated slice lengths")
  p.add_argument("--offset", type=non_negative_int, default=0, help="token offset of the slices in the text")
  p.add_argument("--bucket", type=positive_int, default=1024, help="positions per bucket")
  p.add_argument("--json", help="write the results as JSON")
  p.add_argument("--plot", help="write a PNG of NLL against position")
  add_attention_args(p, several=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_ppl, attention="lambda,dense")

  p = sub.add_parser("finetune", help="fine-tune under an attention method (optax AdamW), resumable")
  add_token_source_args(p, "UTF-8 training text (default: the built-in text)")
  p.add_argument("--seq-len", type=_int_at_least(2, ">= 2"), required=True, help="tokens per training sequence")
  p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
  p.add_argument("--lr", type=float, required=True, help="peak learning rate (warmup, then cosine decay to lr/10)")
  p.add_argument("--batch", type=positive_int, default=1, help="sequences per microbatch")
  p.add_argument("--accum", type=positive_int, default=1, help="microbatches per step (gradient accumulation)")
  p.add_argument("--train", default=".*", help="regex searched in param paths, e.g. 'attn/' (default: all)")
  p.add_argument("--warmup-steps", type=non_negative_int, help="default: 10%% of --steps")
  p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay of weight matrices")
  p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip")
  p.add_argument("--no-remat", action="store_true", help="keep every layer's activations for the backward pass (more memory)")
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master params")
  p.add_argument("--seed", type=seed_int, default=0, help="seed of the data order")
  p.add_argument("--out", required=True, help="output dir: checkpoints/, final/, log.json, loss.png")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
  p.add_argument("--save-every", type=positive_int, help="training checkpoint every N steps (default: at the end)")
  p.add_argument("--keep", type=positive_int, default=3, help="training checkpoints kept")
  add_attention_args(p)
  add_mesh_args(p)
  p.set_defaults(func=cmd_finetune)

  p = sub.add_parser("demo", help="the main job: SmolLM2 perplexity past its training length, dense vs lambda")
  p.add_argument("--length", type=positive_int, default=16384, help="tokens (default 16384, twice the training length)")
  p.add_argument("--out", default="lminf-demo", help="directory for ppl.json and ppl.png")
  p.set_defaults(func=cmd_demo)
  return parser


def main(argv: list[str] | None = None) -> int:
  # transformers without torch (the run time needs none) would print an advisory on every command.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  # Orbax logs each failure of its writer threads with a traceback; the error that reaches us says it in one line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  sys.unraisablehook = without_closed_loop_reports(sys.unraisablehook)
  args = build_parser().parse_args(argv)
  with interrupt.handling():
    try:
      args.func(args)
    except UserError as e:
      return _error(str(e))
    except Exception as e:
      if disk_full(e):
        return _error(f"no space left on device{_file_of(e)}")
      if isinstance(e, OSError) and e.strerror:  # permissions, read-only file systems, ...
        return _error(f"{e.strerror}{_file_of(e)}")
      raise
    finally:
      if interrupt.requested():
        interrupt.exit_now()
  return 0


def _error(message: str) -> int:
  print(f"lminf: error: {message}", file=sys.stderr)
  return 1


def _file_of(error: BaseException) -> str:
  """': PATH' for the first file named by `error` or the errors it was raised from."""
  while error is not None:
    if isinstance(error, OSError) and error.filename:
      return f": {error.filename}"
    error = error.__cause__ or error.__context__
  return ""


if __name__ == "__main__":
  sys.exit(main())
