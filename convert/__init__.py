"""Checkpoint converters (installed as `lminf_jax.convert`)."""
