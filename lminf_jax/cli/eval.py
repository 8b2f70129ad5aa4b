"""Evaluation commands: ppl, demo, passkey, ruler, longbench, infinitebench."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lminf_jax.cache import check_memory
from lminf_jax.cli.options import (CKPT_HELP, add_attention_args, add_mesh_args, _load_for_answers, load_on_mesh,
                                   mesh_context, mesh_from_args, methods_from_args, non_negative_int, parse_lengths,
                                   place_tokens, positive_int, seed_int)
from lminf_jax.errors import UserError
from lminf_jax.eval.infinitebench import GENERATED as IB_GENERATED
from lminf_jax.eval.ruler import TASKS as RULER_TASKS
from lminf_jax.eval.task import run
from lminf_jax.eval.texts import builtin_text
from lminf_jax.util.atomic import atomic_file, check_output_dir, check_output_file
from lminf_jax.util.files import read_text, readable_file

def run_ppl(ckpt: Path, text: str, lengths: list[int], methods: dict, offset: int, bucket: int,
            json_out: Path | None, plot_out: Path | None, title: str, mesh=None,
            rope_scaling: str | None = None) -> None:
  from lminf_jax.eval import perplexity as evaluate

  for out, suffix in ((json_out, None), (plot_out, ".png")):
    if out is not None:
      check_output_file(out, suffix)
  config, params, tokenizer = load_on_mesh(ckpt, mesh, rope_scaling)
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


def _ppl_parser(sub) -> None:
  p = sub.add_parser("ppl", help="NLL per position bucket against length, for several attention methods")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--text-file", help="UTF-8 text (default: the built-in text)")
  p.add_argument("--lengths", type=parse_lengths, default=[4096, 8192, 16384], help="comma-separated slice lengths")
  p.add_argument("--offset", type=non_negative_int, default=0, help="token offset of the slices in the text")
  p.add_argument("--bucket", type=positive_int, default=1024, help="positions per bucket")
  p.add_argument("--json", help="write the results as JSON")
  p.add_argument("--plot", help="write a PNG of NLL against position")
  add_attention_args(p, several=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_ppl, attention="lambda,dense")


def cmd_ppl(args: argparse.Namespace) -> None:
  methods = methods_from_args(args)
  text = read_text(args.text_file) if args.text_file else builtin_text()
  title = f"{Path(args.ckpt).name}: {Path(args.text_file).name if args.text_file else 'built-in text'}"
  run_ppl(Path(args.ckpt), text, args.lengths, methods, args.offset, args.bucket,
          Path(args.json) if args.json else None, Path(args.plot) if args.plot else None, title, mesh_from_args(args),
          args.rope_scaling)


def _demo_parser(sub) -> None:
  p = sub.add_parser("demo", help="the main job: SmolLM2 perplexity past its training length, dense vs lambda")
  p.add_argument("--length", type=positive_int, default=16384, help="tokens (default 16384, twice the training length)")
  p.add_argument("--out", default="lminf-demo", help="directory for ppl.json and ppl.png")
  p.set_defaults(func=cmd_demo)


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


def _passkey_parser(sub) -> None:
  p = sub.add_parser("passkey", help="passkey retrieval accuracy per length and needle depth")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--lengths", type=parse_lengths, default=[2048, 4096, 8192, 16384], help="prompt lengths in tokens")
  p.add_argument("--samples", type=positive_int, default=20, help="samples per length")
  p.add_argument("--seed", type=seed_int, default=0)
  p.add_argument("--batch", type=positive_int, default=4, help="samples decoded together (left-padded)")
  p.add_argument("--depth-buckets", type=positive_int, default=5)
  p.add_argument("--json", help="write every sample's result as JSON")
  p.add_argument("--plot", help="write a PNG heatmap: context length x needle depth, accuracy, a panel per method")
  add_attention_args(p, several=True, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_passkey, attention="lambda,dense")


def cmd_passkey(args: argparse.Namespace) -> None:
  from lminf_jax.eval.passkey import NEW_TOKENS, PasskeyTask

  methods = methods_from_args(args)
  mesh, config, params, tokenizer = _load_for_answers(args, [(args.json, None), (args.plot, ".png")])
  task = PasskeyTask(tuple(args.lengths), args.samples, args.seed, args.depth_buckets)
  _run(args, task, mesh, config, params, tokenizer, methods, max(args.lengths) + NEW_TOKENS, args.plot,
       f"passkey retrieval: {Path(args.ckpt).name}, {args.samples} samples per length")


def _ruler_parser(sub) -> None:
  p = sub.add_parser("ruler", help="RULER's synthetic tasks: score per task, length and method")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--lengths", type=parse_lengths, default=[4096, 8192, 16384], help="prompt lengths in tokens")
  p.add_argument("--tasks", default=",".join(RULER_TASKS), help="comma-separated RULER tasks (default: all)")
  p.add_argument("--samples", type=positive_int, default=10, help="samples per task and length")
  p.add_argument("--seed", type=seed_int, default=0)
  p.add_argument("--batch", type=positive_int, default=4, help="samples decoded together")
  p.add_argument("--haystack-file", help="UTF-8 text for the essay haystacks (default: the built-in text)")
  p.add_argument("--json", help="write every sample's result as JSON")
  p.add_argument("--plot", help="write a PNG heatmap: task x length, score, a panel per method")
  add_attention_args(p, several=True, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_ruler, attention="lambda,dense")


def cmd_ruler(args: argparse.Namespace) -> None:
  from lminf_jax.eval import ruler

  methods = methods_from_args(args)
  tasks = ruler.task_names(args.tasks)
  mesh, config, params, tokenizer = _load_for_answers(args, [(args.json, None), (args.plot, ".png")])
  most_new = max(ruler.TASKS[t].new_tokens for t in tasks)
  essay = read_text(args.haystack_file) if args.haystack_file else builtin_text()
  task = ruler.RulerTask(tuple(tasks), tuple(args.lengths), args.samples, args.seed, essay)
  _run(args, task, mesh, config, params, tokenizer, methods, max(args.lengths) + most_new, args.plot,
       f"RULER: {Path(args.ckpt).name}, {args.samples} samples per cell")


def _longbench_parser(sub) -> None:
  p = sub.add_parser("longbench", help="a LongBench task from its JSONL file: predictions and the task's metric")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--data", required=True, help="the task's LongBench JSONL file (e.g. data/qasper.jsonl)")
  p.add_argument("--task", required=True, help="LongBench task name (e.g. qasper)")
  p.add_argument("--max-length", type=positive_int,
                 help="prompt tokens kept, cut in the middle (default: the training length - the task's new tokens)")
  p.add_argument("--samples", type=positive_int, help="only the first N records")
  p.add_argument("--batch", type=positive_int, default=1, help="records decoded together")
  p.add_argument("--json", help="write every prediction, its score and the mean as JSON")
  add_attention_args(p, several=True, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_longbench, attention="lambda")


def cmd_longbench(args: argparse.Namespace) -> None:
  from lminf_jax.eval import longbench

  methods = methods_from_args(args)
  spec = longbench.task(args.task)
  longbench.check_packages(spec)
  records = longbench.read_jsonl(readable_file(args.data))
  if args.samples:
    records = records[:args.samples]
  mesh, config, params, tokenizer = _load_for_answers(args, [(args.json, None)])
  max_length = args.max_length or config.max_position_embeddings - spec.max_new_tokens
  if max_length < 1:  # (derived: checked as a given one is)
    raise UserError(f"the model's training length {config.max_position_embeddings} leaves no room for a prompt "
                    f"before {args.task}'s {spec.max_new_tokens} new tokens: give --max-length")
  task = longbench.LongBenchTask(args.task, tuple(records), max_length, str(args.data))
  # (a chat template adds a few tokens)
  _run(args, task, mesh, config, params, tokenizer, methods, max_length + spec.max_new_tokens + 64)


def _infinitebench_parser(sub) -> None:
  p = sub.add_parser("infinitebench", help="InfiniteBench's tasks: score per task, length and method")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--lengths", type=parse_lengths, default=[16384, 32768],
                 help="prompt lengths in tokens (generated prompts are that long; read ones are cut to it)")
  p.add_argument("--tasks", default=",".join(IB_GENERATED), help="comma-separated InfiniteBench tasks, by their file "
                 "names (default: the generated ones, passkey,number_string,kv_retrieval)")
  p.add_argument("--data-dir", help="InfiniteBench's data directory (<task>.jsonl): every task is read from it "
                 "(without it, passkey, number_string and kv_retrieval are generated, and the others refused)")
  p.add_argument("--samples", type=positive_int,
                 help="per task and length: generated samples (default 10), or the first N records (default all)")
  p.add_argument("--seed", type=seed_int, default=0, help="the generated samples' seed")
  p.add_argument("--batch", type=positive_int, default=1, help="samples decoded together (left-padded)")
  p.add_argument("--json", help="write every sample's result as JSON")
  p.add_argument("--plot", help="write a PNG heatmap: task x length, score, a panel per method")
  add_attention_args(p, several=True, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_infinitebench, attention="lambda,dense")


def cmd_infinitebench(args: argparse.Namespace) -> None:
  from lminf_jax.eval import infinitebench as ib

  methods = methods_from_args(args)
  tasks = ib.task_names(args.tasks)
  records = ib.read_records(tasks, args.data_dir, args.samples) if args.data_dir else {}
  ib.check_sources(tasks, records)
  mesh, config, params, tokenizer = _load_for_answers(args, [(args.json, None), (args.plot, ".png")])
  task = ib.InfiniteBenchTask(tuple(tasks), tuple(args.lengths), args.samples, args.seed, records, args.data_dir)
  most_new = max(ib.TASKS[t].max_new_tokens for t in tasks)
  # (a read prompt, cut, decoded and encoded again, may come back a few tokens longer)
  _run(args, task, mesh, config, params, tokenizer, methods, max(args.lengths) + most_new + (64 if records else 0),
       args.plot, f"InfiniteBench: {Path(args.ckpt).name}")


def _run(args: argparse.Namespace, task, mesh, config, params, tokenizer, methods: dict, longest: int,
         plot: str | None = None, title: str = "") -> None:
  """Runs an evaluation task on the --mesh (lminf_jax.eval.task.run), once every method's cache for
  `longest` tokens (prompt and new tokens) is known to fit."""
  with mesh_context(mesh):
    for spec in methods.values():
      check_memory(config, spec, longest, batch=args.batch)
    run(task, params, config, tokenizer, methods, args.batch, args.prefill_chunk, args.json, plot, title)


def register(sub) -> None:
  """Adds this module's commands to the `lminf` subparsers."""
  _ppl_parser(sub)
  _demo_parser(sub)
  _passkey_parser(sub)
  _ruler_parser(sub)
  _longbench_parser(sub)
  _infinitebench_parser(sub)
