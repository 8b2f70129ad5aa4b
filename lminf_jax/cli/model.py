"""Commands on checkpoints: convert, export, fetch."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lminf_jax.cli.options import CKPT_HELP, add_rope_scaling_arg
from lminf_jax.util.atomic import check_output_dir


def _convert_parser(sub) -> None:
  p = sub.add_parser("convert", help="HF model dir or .gguf file -> checkpoint dir")
  p.add_argument("src", help="HF model dir, .gguf file or hub id ORG/NAME[@REVISION]")
  p.add_argument("out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 help="the params' dtype (default: an HF dir's own: bfloat16 stays bfloat16, float16 and a GGUF's "
                      "dequantised weights become float32)")
  p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> None:
  from lminf_jax.loading import convert_checkpoint

  start = time.perf_counter()
  out = convert_checkpoint(Path(args.src), Path(args.out), args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _export_parser(sub) -> None:
  p = sub.add_parser("export", help="checkpoint dir (or HF dir, .gguf) -> Hugging Face model dir (safetensors)")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("out")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the checkpoint's")
  add_rope_scaling_arg(p)
  p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
  from lminf_jax.convert.export import write_hf
  from lminf_jax.loading import load
  from lminf_jax.models.rope_scaling import with_rope_scaling

  start = time.perf_counter()
  out = check_output_dir(Path(args.out))
  config, params, tokenizer = load(Path(args.ckpt))
  if args.rope_scaling is not None:
    config = with_rope_scaling(config, args.rope_scaling)
  write_hf(out, config, params, tokenizer, args.dtype)
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _fetch_parser(sub) -> None:
  p = sub.add_parser("fetch", help="download and convert a real test model")
  p.add_argument("model", choices=("smollm2",))
  p.add_argument("--out", help="checkpoint dir (default: under ~/.cache/lminf_jax/)")
  p.set_defaults(func=cmd_fetch)


def cmd_fetch(args: argparse.Namespace) -> None:
  from lminf_jax.util.fetch import fetch_smollm2

  print(fetch_smollm2(Path(args.out) if args.out else None))


def register(sub) -> None:
  """Adds this module's commands to the `lminf` subparsers."""
  _convert_parser(sub)
  _export_parser(sub)
  _fetch_parser(sub)
