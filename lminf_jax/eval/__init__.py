"""Evaluation tasks (DESIGN section 7): perplexity against length, passkey retrieval, RULER and
LongBench, their texts and plots."""
