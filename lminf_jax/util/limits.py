"""Size limits, checked before anything big is allocated: int32 positions and available memory."""

from __future__ import annotations

import os

from lminf_jax.errors import UserError

INT32_MAX = 2**31 - 1  # token ids and positions are int32
THIS_MACHINE = "this machine"  # (the name of the host's memory)


def gib(nbytes: int) -> str:
  return f"{nbytes / 2**30:.1f} GiB"


def host_memory_bytes() -> int:
  """Physical memory of this machine."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory() -> tuple[str, int]:
  """(name, bytes) of the memory of JAX's first device: its own (GPU, TPU) or the host's (CPU)."""
  import jax

  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return f"{device.platform}:{device.id}", int(stats["bytes_limit"])
  return THIS_MACHINE, host_memory_bytes()


def check_fits(what: str, nbytes: int, memory: tuple[str, int]) -> None:
  """Refuses `what` (a noun phrase) when its `nbytes` exceed the `memory` (name, bytes)."""
  name, available = memory
  if nbytes > available:
    raise UserError(f"{what} needs {gib(nbytes)}, more than the {gib(available)} of memory of {name}")
