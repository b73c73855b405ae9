#!/usr/bin/env bash
# Set up the environment (first time only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The test files run side by side, one worker per logical CPU (pytest-xdist); tests/conftest.py keeps the files that
# share the finished tiny DAG and the local Slurm on one worker. VARUP_TEST_WORKERS=0 runs everything in one process.
exec .venv/bin/python -m pytest -n "${VARUP_TEST_WORKERS:-logical}" --dist loadgroup "$@"
