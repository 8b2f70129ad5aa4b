"""Commands that run a model: nll, generate, stream-ppl, finetune."""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

from lminf_jax.cache import check_memory
from lminf_jax.cli.options import (CKPT_HELP, add_attention_args, add_mesh_args, add_token_source_args,
                                   attention_from_args, _int_at_least, load_model_and_tokens, load_on_mesh,
                                   mesh_context, mesh_from_args, non_negative_int, place_tokens, positive_int, seed_int,
                                   temperature_float, top_p_float)
from lminf_jax.errors import UserError
from lminf_jax.eval.texts import builtin_text
from lminf_jax.util import interrupt
from lminf_jax.util.atomic import atomic_file, check_output_dir, check_output_file
from lminf_jax.util.files import read_text

def _nll_parser(sub) -> None:
  p = sub.add_parser("nll", help="per-token negative log-likelihoods of a text")
  add_token_source_args(p, "UTF-8 text (default: the built-in text, Python's help topics)")
  p.add_argument("--out", required=True, help="output .npy of float32 NLLs, length T-1")
  p.add_argument("--cached", action="store_true",
                 help="feed the text through a fixed-size cache, --prefill-chunk tokens at a time (same result)")
  add_attention_args(p, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_nll)


def cmd_nll(args: argparse.Namespace) -> None:
  import jax.numpy as jnp

  from lminf_jax.inference.forward import cached_token_nll, token_nll

  attention = attention_from_args(args, args.attention)
  out = check_output_file(Path(args.out), ".npy")
  mesh, config, params, ids, _ = load_model_and_tokens(args)
  if ids.size < 2:
    raise UserError(f"need at least 2 tokens, got {ids.size}")
  start = time.perf_counter()
  with mesh_context(mesh):
    check_memory(config, attention, int(ids.size) if args.cached else None)
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


def _generate_parser(sub) -> None:
  p = sub.add_parser("generate", help="generate text after a prompt, streaming the tokens")
  p.add_argument("ckpt", help=CKPT_HELP)
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
  add_mesh_args(p)
  p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> None:
  import jax

  from lminf_jax.inference.generation import Sampling, generate

  prompt = read_text(args.prompt_file) if args.prompt_file else args.prompt
  if not prompt:
    raise UserError("empty prompt")
  attention = attention_from_args(args, args.attention)
  sampling = Sampling(args.temperature, args.top_k_sample, args.top_p)
  mesh = mesh_from_args(args)
  config, params, tokenizer = load_on_mesh(args.ckpt, mesh, args.rope_scaling)
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  if not ids:
    raise UserError("empty prompt")
  with mesh_context(mesh):
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
  with mesh_context(mesh):
    generate(params, config, [ids], args.max_new_tokens, attention, sampling, jax.random.PRNGKey(args.seed),
             chunk=args.prefill_chunk, on_tokens=on_tokens, stats=stats)
  print(f"\n[prefill {stats['prompt_tokens']} tokens at {stats['prompt_tokens'] / stats['prefill_seconds']:.1f} tok/s, "
        f"decode {stats['new_tokens']} tokens at {stats['new_tokens'] / stats['decode_seconds']:.1f} tok/s "
        f"(compile included)]")


def _stream_ppl_parser(sub) -> None:
  p = sub.add_parser("stream-ppl", help="streaming perplexity through the fixed-size cache")
  p.add_argument("ckpt", help=CKPT_HELP)
  p.add_argument("--text-file", help="UTF-8 text (default: the built-in text); repeats as documents if short")
  p.add_argument("--tokens", type=_int_at_least(2, ">= 2"), default=100_000, help="tokens to stream")
  p.add_argument("--segment", type=positive_int, default=20_000, help="tokens per reported segment")
  add_attention_args(p, feeds=True)
  add_mesh_args(p)
  p.set_defaults(func=cmd_stream_ppl, attention="lambda")


def cmd_stream_ppl(args: argparse.Namespace) -> None:
  from tqdm import tqdm

  from lminf_jax.cache import init_cache
  from lminf_jax.inference.stream import document_stream, peak_rss_mib, stream_nll

  attention = attention_from_args(args, args.attention)
  mesh = mesh_from_args(args)
  config, params, tokenizer = load_on_mesh(args.ckpt, mesh, args.rope_scaling)
  if tokenizer is None:
    raise UserError(f"{args.ckpt} has no tokenizer")
  text = read_text(args.text_file) if args.text_file else builtin_text()
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
  if ids.size < 2:
    raise UserError("the text has fewer than 2 tokens")
  with mesh_context(mesh):
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
  with tqdm(total=total, unit="tok", desc="stream-ppl") as bar, mesh_context(mesh):
    nll = stream_nll(params, config, cache, chunks, total, attention, args.segment, report, bar)
  seconds = time.perf_counter() - start
  print(f"overall: mean NLL {nll.mean():.4f}, perplexity {np.exp(nll.mean()):.3f}, {total / seconds:.1f} tokens/s, "
        f"peak RSS {peak_rss_mib():.0f} MiB")


def _finetune_parser(sub) -> None:
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


def register(sub) -> None:
  """Adds this module's commands to the `lminf` subparsers."""
  _nll_parser(sub)
  _generate_parser(sub)
  _stream_ppl_parser(sub)
  _finetune_parser(sub)
