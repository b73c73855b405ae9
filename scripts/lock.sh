#!/usr/bin/env bash
# Regenerate requirements.lock and the pip list of envs/varup.yaml (the same pins).
#
#   bash scripts/lock.sh           # resolve pyproject.toml afresh ('.[test]') in a throwaway venv and freeze it;
#                                  # keeps the lock's torch/torchvision pair unless VARUP_TORCH_PIN names another
#   bash scripts/lock.sh .venv     # freeze an existing venv instead (e.g. after a deliberate pip install -U there)
#
# Run it on the target platform, Linux x86_64 with Python 3.11: the CUDA torch build depends on Linux-only
# nvidia-* wheels, and the freeze records what was resolved here. Then run the tests (tests/test_packaging.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LOCK=requirements.lock
ENV_FILE=envs/varup.yaml

fresh_venv() {  # $1: venv dir to create; installs the torch pair first, as scripts/setup.sh does
  local pin=${VARUP_TORCH_PIN:-$(grep -E '^(torch|torchvision)==' "$LOCK" | tr '\n' ' ')}
  "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$1/bin/python" -m pip install -q $pin
  # shellcheck disable=SC2086
  "$1/bin/python" -m pip install -q '.[test]' $pin
}

write_lock() {  # $1: venv to freeze
  local py="$1/bin/python" where
  where=$("$py" -c 'import platform as p; print(f"{p.system()} {p.machine()}, {p.python_implementation()} {p.python_version()}")')
  {
    echo "# requirements.lock: every distribution of varup's environment (pyproject.toml's dependencies and the"
    echo "# [test] extra, with everything they pull in), exactly pinned. varup itself is not listed."
    echo "# Used as pip constraints by scripts/setup.sh (pip install -c requirements.lock ...); envs/varup.yaml lists the"
    echo "# same pins for --sdm conda. tests/test_packaging.py checks that both agree and that nothing is missing."
    echo "# Regenerate with: bash scripts/lock.sh   (see its header; never edit the pins by hand)"
    echo "# Frozen on $where, $(date -u +%Y-%m-%d). Target: Linux x86_64, Python 3.11."
    echo "# The nvidia-*, cuda-* and triton pins are the CUDA torch build's Linux dependencies (pip ignores a"
    echo "# constraint on a package nothing requires). pip and setuptools are pinned too (torch needs setuptools)."
    "$py" -m pip freeze --all --exclude-editable --exclude varup
  } > "$LOCK.tmp"
  mv "$LOCK.tmp" "$LOCK"
}

write_env_file() {  # $1: the frozen venv (for its Python version)
  local pyver
  pyver=$("$1/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  {
    echo "# Conda environment for \`snakemake --sdm conda\`: Python and pip from conda-forge, then exactly the pins of"
    echo "# requirements.lock (written by scripts/lock.sh; do not edit by hand). It holds no path to the project:"
    echo "# Snakemake copies this file into .snakemake/conda/. The jobs import varup from the workflow's own src/"
    echo "# (VARUP_SRC, set by workflow/rules/common.smk); varup.post-deploy.sh adds the hook and the \`varup\` command."
    echo "name: varup"
    echo "channels: [conda-forge]"
    echo "dependencies:"
    echo "  - python=$pyver"
    echo "  - pip"
    echo "  - pip:"
    grep -vE '^\s*(#|$)' "$LOCK" | sed 's/^/      - /'
  } > "$ENV_FILE.tmp"
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

if [ $# -ge 1 ]; then
  venv=$1
else
  venv=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$venv")"' EXIT
  echo "lock: resolving pyproject.toml in $venv"
  fresh_venv "$venv"
fi
write_lock "$venv"
write_env_file "$venv"
echo "lock: wrote $LOCK ($(grep -cvE '^\s*(#|$)' "$LOCK") pins) and $ENV_FILE"
