"""The `lminf` command line. Bad input prints one line `lminf: error: ...` and exits non-zero."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from lminf_jax.errors import UserError
from lminf_jax.texts import builtin_text

ATTENTION_CHOICES = ("dense",)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, no usage dump
    print(f"lminf: error: {message}", file=sys.stderr)
    sys.exit(2)


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be positive, got {value}")
  return value


def add_attention_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--attention", default="dense", help=f"attention method: {' | '.join(ATTENTION_CHOICES)}")
  p.add_argument("--chunk", type=positive_int, default=512, help="query chunk length of the blockwise attention")


def attention_from_args(args: argparse.Namespace, name: str):
  from lminf_jax.attention import ATTENTION_METHODS

  if name not in ATTENTION_METHODS:
    raise UserError(f"unknown attention method {name!r} (choose from {', '.join(ATTENTION_METHODS)})")
  return ATTENTION_METHODS[name](chunk=args.chunk)


def _existing_file(path: str) -> Path:
  p = Path(path)
  if not p.is_file():
    raise UserError(f"no such file: {p}")
  return p


def read_text(path: str) -> str:
  try:
    return _existing_file(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not UTF-8 text: {e}") from None


def read_token_ids(args: argparse.Namespace, tokenizer, vocab_size: int) -> np.ndarray:
  """1-D int32 token ids from --tokens-file, else --text-file (default: the built-in text),
  tokenized without special tokens."""
  if args.tokens_file:
    try:
      ids = np.load(_existing_file(args.tokens_file), allow_pickle=False)
    except (ValueError, OSError) as e:
      raise UserError(f"{args.tokens_file} is not a valid .npy file: {e}") from None
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


def save_npy(path: Path, array: np.ndarray) -> None:
  """np.save through a temporary file: no half-written output on failure."""
  if not path.parent.is_dir():
    raise UserError(f"output directory {path.parent} does not exist")
  tmp = path.with_name(path.name + ".partial.npy")
  np.save(tmp, array)
  os.replace(tmp, path)


def cmd_convert(args: argparse.Namespace) -> None:
  from lminf_jax.loading import convert

  start = time.perf_counter()
  out = convert(Path(args.src), Path(args.out), args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def cmd_fetch(args: argparse.Namespace) -> None:
  from lminf_jax.fetch import fetch_smollm2

  print(fetch_smollm2(Path(args.out) if args.out else None))


def cmd_nll(args: argparse.Namespace) -> None:
  import jax.numpy as jnp

  from lminf_jax.forward import token_nll
  from lminf_jax.loading import load

  attention = attention_from_args(args, args.attention)
  out = Path(args.out)
  if not out.parent.is_dir():
    raise UserError(f"output directory {out.parent} does not exist")
  config, params, tokenizer = load(Path(args.ckpt))
  ids = read_token_ids(args, tokenizer, config.vocab_size)
  if ids.size < 2:
    raise UserError(f"need at least 2 tokens, got {ids.size}")
  start = time.perf_counter()
  nll = np.asarray(token_nll(params, config, jnp.asarray(ids)[None], attention=attention))[0]
  seconds = time.perf_counter() - start
  save_npy(out, nll.astype(np.float32))
  mean = float(nll.mean())
  print(f"{ids.size} tokens  mean NLL {mean:.4f}  perplexity {np.exp(mean):.3f}  "
        f"({ids.size / seconds:.0f} tokens/s, {args.attention})")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="lminf", description="Training-free long-context attention for Llama models in JAX.")
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  p = sub.add_parser("convert", help="HF model dir or .gguf file -> checkpoint dir")
  p.add_argument("src")
  p.add_argument("out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser("fetch", help="download and convert a real test model")
  p.add_argument("model", choices=("smollm2",))
  p.add_argument("--out", help="checkpoint dir (default: under ~/.cache/lminf_jax/)")
  p.set_defaults(func=cmd_fetch)

  p = sub.add_parser("nll", help="per-token negative log-likelihoods of a text")
  p.add_argument("ckpt", help="checkpoint dir, HF model dir or .gguf file")
  source = p.add_mutually_exclusive_group()
  source.add_argument("--text-file", help="UTF-8 text (default: the built-in text, Python's help topics)")
  source.add_argument("--tokens-file", help="1-D integer .npy of token ids")
  p.add_argument("--out", required=True, help="output .npy of float32 NLLs, length T-1")
  p.add_argument("--max-tokens", type=positive_int)
  add_attention_args(p)
  p.set_defaults(func=cmd_nll)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except UserError as e:
    print(f"lminf: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("lminf: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
