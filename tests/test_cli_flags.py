"""The attention flags come from the methods' dataclass fields: every option has a flag with the
field's own help and default, a flag means one thing, and old spellings keep working."""

from __future__ import annotations

import dataclasses

import pytest

from lminf_jax.attention import ATTENTION_METHODS, DCA, Dense, InfLLM, Lambda, SelfExtend, Streaming
from lminf_jax.cli.app import build_parser
from lminf_jax.cli.options import attention_from_args
from lminf_jax.errors import UserError


def _parse(*argv: str):
  return build_parser().parse_args(["ppl", "ckpt", *argv])


def _help_of(flag: str) -> str:
  sub = build_parser()._subparsers._group_actions[0].choices["ppl"]
  return next(a.help for a in sub._actions if flag in a.option_strings)


def test_every_option_of_every_method_has_a_flag_with_its_help_and_default():
  for name, cls in ATTENTION_METHODS.items():
    for field in dataclasses.fields(cls):
      flag = field.name.replace("_", "-")
      candidates = [f"--{flag}", f"--{name}-{flag}", f"--no-{flag}"]
      helps = [h for h in map(_help_of_or_none, candidates) if h is not None and "old spelling" not in h]
      assert len(helps) == 1 and field.metadata["help"] in helps[0], (name, field.name, helps)
      if field.default is not None and not isinstance(field.default, bool):
        assert f"(default {field.default})" in helps[0]


def _help_of_or_none(flag):
  try:
    return _help_of(flag)
  except StopIteration:
    return None


def test_a_flag_sets_only_what_it_names():
  args = _parse("--attention", "lambda,infllm", "--lambda-top-k", "5", "--infllm-top-k", "7", "--chunk", "64",
                "--n-local", "100", "--no-mask")
  with pytest.raises(UserError, match="top_k needs mask=True"):
    attention_from_args(args, "lambda")
  args = _parse("--attention", "lambda,infllm,streaming", "--lambda-top-k", "5", "--infllm-top-k", "7", "--chunk",
                "64", "--n-local", "100")
  assert attention_from_args(args, "lambda") == Lambda(top_k=5, chunk=64, n_local=100)
  assert attention_from_args(args, "infllm") == InfLLM(top_k=7, chunk=64, n_local=100)
  assert attention_from_args(args, "streaming") == Streaming(chunk=64)
  assert attention_from_args(_parse("--attention", "infllm"), "infllm") == InfLLM()  # the spec's own defaults
  args = _parse("--attention", "dense,selfextend,dca", "--group-size", "4", "--scale-base", "4096", "--chunk-size",
                "600", "--mscale")
  assert attention_from_args(args, "dense") == Dense()
  assert attention_from_args(args, "selfextend") == SelfExtend(group_size=4, scale_base=4096)
  assert attention_from_args(args, "dca") == DCA(chunk_size=600, mscale=True)


def test_released_prefill_is_a_flag_and_an_attn_opt():
  assert attention_from_args(_parse("--attention", "infllm"), "infllm").released_prefill is False
  for argv in (["--released-prefill"], ["--attn-opt", "released_prefill=true"]):
    assert attention_from_args(_parse("--attention", "infllm", *argv), "infllm") == InfLLM(released_prefill=True)
  with pytest.raises(UserError, match="released_prefill takes bool"):
    attention_from_args(_parse("--attention", "infllm", "--attn-opt", "released_prefill=maybe"), "infllm")


def test_old_top_k_spelling_works_for_one_method_and_is_refused_for_both():
  assert attention_from_args(_parse("--attention", "infllm", "--top-k", "3"), "infllm") == InfLLM(top_k=3)
  assert attention_from_args(_parse("--attention", "lambda", "--top-k", "3"), "lambda") == Lambda(top_k=3)
  with pytest.raises(UserError, match="--lambda-top-k and --infllm-top-k"):
    attention_from_args(_parse("--attention", "lambda,infllm", "--top-k", "3"), "lambda")


def test_attn_opt_parses_by_field_type_and_names_the_field():
  args = _parse("--attention", "lambda", "--attn-opt", "distance_limit=false", "--attn-opt", "limit=none",
                "--attn-opt", "n_global=3")
  assert attention_from_args(args, "lambda") == Lambda(distance_limit=False, limit=None, n_global=3)
  with pytest.raises(UserError, match=r"Lambda.mask takes bool, got 'maybe'"):
    attention_from_args(_parse("--attention", "lambda", "--attn-opt", "mask=maybe"), "lambda")
  with pytest.raises(UserError, match=r"Lambda has no option 'n_sink'"):
    attention_from_args(_parse("--attention", "lambda", "--attn-opt", "n_sink=2"), "lambda")
  # With several methods, an option applies to those that have it.
  args = _parse("--attention", "lambda,streaming", "--attn-opt", "n_sink=2")
  assert attention_from_args(args, "streaming") == Streaming(n_sink=2)
  assert attention_from_args(args, "lambda") == Lambda()


def test_prefill_chunk_is_its_own_flag():
  parser = build_parser()
  args = parser.parse_args(["generate", "ckpt", "--prompt", "x", "--chunk", "64", "--prefill-chunk", "16"])
  assert args.prefill_chunk == 16 and attention_from_args(args, "dense").chunk == 64
  with pytest.raises(SystemExit):
    parser.parse_args(["ppl", "ckpt", "--prefill-chunk", "16"])  # (ppl feeds no cache)


MESH_FLAGS = ["--coordinator", "--distributed", "--mesh", "--num-processes", "--process-id"]
ADDED = {command: MESH_FLAGS for command in ("generate", "stream-ppl", "passkey", "ruler", "longbench")}  # (issue 29)
METHOD_OPTIONS_ADDED = ["--device-blocks", "--offload", "--released-prefill"]  # (issue 30: every command with infllm's options)
# (issue 31: selfextend's and dca's options, with every method's)
METHOD_OPTIONS_ADDED += ["--group-size", "--window-size", "--chunk-size", "--local-window", "--mscale", "--trained-length"]
METHOD_OPTIONS_ADDED += ["--scale-base"]  # (selfextend: LongLM's log scaling of queries)
# Commands added since: (the command whose flags they share, flags of their own, flags of it they lack).
NEW_COMMANDS = {"infinitebench": ("ruler", ["--data-dir"], ["--haystack-file"])}  # (issue 31)
ROPE_ADDED = ["--rope-scaling"]  # (issue 31: every command that runs a model, and export)


def test_every_command_keeps_its_flags():
  """`lminf <command> --help` lists the flags each command had at a4f7749 (tests/cli_flags.json, dumped from
  that commit's parser), and only the flags added since on purpose (ADDED, NEW_COMMANDS): a layout change renames
  none."""
  import json
  from pathlib import Path

  expected = json.loads((Path(__file__).parent / "cli_flags.json").read_text())
  expected = {name: sorted(flags + ADDED.get(name, []) + (METHOD_OPTIONS_ADDED if "--capacity-blocks" in flags else [])
                          + (ROPE_ADDED if "--attention" in flags or name == "export" else []))
              for name, flags in expected.items()}
  for name, (like, own, lacks) in NEW_COMMANDS.items():
    expected[name] = sorted(set(expected[like]) - set(lacks) | set(own))
  commands = build_parser()._subparsers._group_actions[0].choices
  got = {name: sorted(s for a in p._actions for s in (a.option_strings or [a.dest])) for name, p in commands.items()}
  assert got == expected


def test_a_new_built_in_with_its_own_chunk_help_renames_no_flag(monkeypatch):
  """Flag names are declared with the options (`option(..., per_method=True)`), not inferred from
  help texts: a new built-in whose `chunk` help differs keeps --chunk one flag for every method."""
  from lminf_jax.attention import Dense, option
  from lminf_jax.attention import registry
  from lminf_jax.cli import options

  @dataclasses.dataclass(frozen=True)
  class Other(Dense):
    chunk: int = option(64, "queries per step, in another method's words", minimum=1)
    top_k: int = option(2, "another method's top_k, with its own flag", minimum=1, per_method=True)

  monkeypatch.setitem(registry.ATTENTION_METHODS, "other", Other)
  options._attention_flags.cache_clear()
  try:
    flags = {a.flag: a.methods for a in options._attention_flags()}
    assert flags["chunk"] is None and "other-chunk" not in flags and "dense-chunk" not in flags
    assert flags["other-top-k"] == ("other",) and flags["lambda-top-k"] == ("lambda",) and "top-k" not in flags
    args = build_parser().parse_args(["ppl", "ckpt", "--attention", "other,lambda", "--chunk", "32",
                                      "--other-top-k", "3"])
    assert attention_from_args(args, "other") == Other(chunk=32, top_k=3)
    assert attention_from_args(args, "lambda") == Lambda(chunk=32)
  finally:
    options._attention_flags.cache_clear()


def test_docs_cli_md_holds_every_commands_current_help(monkeypatch):
  """docs/cli.md's "Help of each command" is `lminf [command] --help` at 100 columns, for every command
  (regenerate it with the loop the page gives)."""
  from pathlib import Path

  monkeypatch.setenv("COLUMNS", "100")
  page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
  parser = build_parser()
  commands = parser._subparsers._group_actions[0].choices
  for name, sub in [("", parser), *commands.items()]:
    block = f"### lminf{' ' + name if name else ''}\n\n```\n{sub.format_help().rstrip()}\n```\n"
    assert block in page, f"docs/cli.md: the help of `lminf {name}` is stale"
