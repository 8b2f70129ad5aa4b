"""Evaluation tasks (docs/evaluation.md): perplexity against length, passkey retrieval, RULER,
LongBench and InfiniteBench, their texts and plots. Passkey, RULER, LongBench and InfiniteBench follow
one protocol (`lminf_jax.eval.task`): importing this package registers them in `EVAL_TASKS`."""

from lminf_jax.eval import infinitebench, longbench, passkey, ruler  # noqa: F401  (registers their tasks)
from lminf_jax.eval.task import EVAL_TASKS, EvalTask, evaluate, run

__all__ = ["EVAL_TASKS", "EvalTask", "evaluate", "run"]
