#!/usr/bin/env bash
# Set up the environment (first time only) and run the whole DAG of the embedded toy experiment:
# every table, figure and the HTML report, offline, on CPU. Extra arguments go to snakemake.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)
.venv/bin/snakemake --cores "${VARUP_CORES:-2}" "$@"
.venv/bin/snakemake --cores 1 --report results/toy/report.html "$@"
echo "toy experiment finished in $(( $(date +%s) - start )) s: results/toy/tables, results/toy/figures, results/toy/report.html"
