"""Run only through tests/test_sharding.py, which starts pytest with 8 virtual CPU devices."""

import jax


def pytest_configure(config):
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
