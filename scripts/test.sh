#!/usr/bin/env bash
# Set up the environment (first time only) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One process by default. VARUP_TEST_WORKERS=N spreads the test files over N pytest-xdist workers (tests/conftest.py
# keeps every test of the finished tiny DAG and of the local Slurm on one worker). Not the default: the DAG tests'
# Snakemake runs use both cores each, so on 2 cores two workers oversubscribe them (a full run took as long as one
# process, the learning test 4x longer) and the Slurm tests failed; use it for the fast tests (-m "not slow").
exec .venv/bin/python -m pytest -n "${VARUP_TEST_WORKERS:-0}" --dist loadgroup "$@"
