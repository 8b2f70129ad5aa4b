#!/usr/bin/env bash
# The test cases CI's suite leaves out, with LMINF_SLOW=1: the wider random searches against the naive
# references (tests/test_infllm.py, tests/test_alibi.py), every method cached and generating on every family
# (tests/test_families.py), the contract's other cache chunks and wider one-shot search
# (tests/methods/test_contract.py), InfiniteBench's tasks read from files through the command
# (tests/test_infinitebench.py), and the multidevice cases marked `slow` (more
# meshes, SmolLM2's commands through a mesh).
#   bash scripts/slow_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export LMINF_SLOW=1
python -m pytest -q -p no:cacheprovider tests/test_infllm.py tests/test_alibi.py -k naive "$@"
python -m pytest -q -p no:cacheprovider tests/test_families.py -k "every_method or greedy_generation" "$@"
python -m pytest -q -p no:cacheprovider tests/methods/test_contract.py -k "cached_chunked or one_shot_matches" "$@"
python -m pytest -q -p no:cacheprovider -m slow tests/test_infinitebench.py "$@"
XLA_FLAGS=--xla_force_host_platform_device_count=8 LMINF_MULTIDEVICE=1 \
  python -m pytest -q -p no:cacheprovider -m slow tests/multidevice "$@"
