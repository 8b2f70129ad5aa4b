"""Evaluation tasks (docs/evaluation.md): perplexity against length, passkey retrieval, RULER and
LongBench, their texts and plots."""
