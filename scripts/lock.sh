#!/usr/bin/env bash
# Regenerate requirements.lock and the pip list of envs/varup.yaml (the same pins).
#
#   bash scripts/lock.sh           # resolve pyproject.toml afresh ('.[test]') in a throwaway venv and freeze it;
#                                  # keeps the lock's torch/torchvision pair unless VARUP_TORCH_PIN names another
#   bash scripts/lock.sh .venv     # freeze an existing venv instead (e.g. after a deliberate pip install -U there)
#   VARUP_CUDA=12 bash scripts/lock.sh [VENV]
#                                  # the second lock, requirements-cu12.lock: the newest torch/torchvision pair whose
#                                  # PyPI wheels are built for CUDA 12 (VARUP_TORCH_PIN names another), everything else
#                                  # at requirements.lock's pins; for clusters whose driver predates CUDA 13 (README:
#                                  # Installing on an older CUDA driver). It has no conda env file: --sdm conda uses
#                                  # envs/varup.yaml, the main lock's pins.
#
# Run it on the target platform, Linux x86_64 with Python 3.11: the CUDA torch build depends on Linux-only
# nvidia-* wheels, and the freeze records what was resolved here. Then run the tests (tests/test_packaging.py).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MAIN_LOCK=requirements.lock
LOCK=$MAIN_LOCK
ENV_FILE=envs/varup.yaml
TORCH_FAMILY='^(torch|torchvision|triton|nvidia-[^=]*|cuda-[^=]*)=='
case "${VARUP_CUDA:-13}" in
  13) ;;
  12) LOCK=requirements-cu12.lock ENV_FILE= ;;
  *) echo "lock: VARUP_CUDA=${VARUP_CUDA}: use 13 (requirements.lock) or 12 (requirements-cu12.lock)" >&2; exit 2 ;;
esac

fresh_venv() {  # $1: venv dir to create; installs the torch pair first, as scripts/setup.sh does
  local pin=${VARUP_TORCH_PIN:-$(grep -sE '^(torch|torchvision)==' "$LOCK" | tr '\n' ' ')} c=()
  if [ -z "$pin" ]; then
    echo "lock: $LOCK has no torch/torchvision pins: name the pair, VARUP_TORCH_PIN=\"torch==A torchvision==B\"" >&2
    exit 2
  fi
  if [ "$LOCK" != "$MAIN_LOCK" ]; then  # the second lock: the main lock's pins for everything but the torch build
    grep -vE "$TORCH_FAMILY" "$MAIN_LOCK" > "$1.constraints"
    c=(-c "$1.constraints")
  fi
  "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install -q "${c[@]}" --upgrade pip
  # shellcheck disable=SC2086
  "$1/bin/python" -m pip install -q "${c[@]}" $pin
  # shellcheck disable=SC2086
  "$1/bin/python" -m pip install -q "${c[@]}" '.[test]' $pin
}

write_lock() {  # $1: venv to freeze
  local py="$1/bin/python" where
  where=$("$py" -c 'import platform as p; print(f"{p.system()} {p.machine()}, {p.python_implementation()} {p.python_version()}")')
  {
    echo "# $LOCK: every distribution of varup's environment (pyproject.toml's dependencies and the"
    echo "# [test] extra, with everything they pull in), exactly pinned. varup itself is not listed."
    if [ "$LOCK" = "$MAIN_LOCK" ]; then
      echo "# Used as pip constraints by scripts/setup.sh (pip install -c requirements.lock ...); envs/varup.yaml lists the"
      echo "# same pins for --sdm conda. tests/test_packaging.py checks that both agree and that nothing is missing."
    else
      echo "# The torch/torchvision pair built for CUDA 12 (for a driver older than CUDA 13's), everything else at"
      echo "# $MAIN_LOCK's pins. Installed by VARUP_CUDA=12 bash scripts/setup.sh; tests/test_cu12_lock.py checks it."
    fi
    echo "# Regenerate with: ${VARUP_CUDA:+VARUP_CUDA=$VARUP_CUDA }bash scripts/lock.sh   (see its header; never edit the pins by hand)"
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
if [ -n "$ENV_FILE" ]; then
  write_env_file "$venv"
fi
echo "lock: wrote $LOCK ($(grep -cvE '^\s*(#|$)' "$LOCK") pins)${ENV_FILE:+ and $ENV_FILE}"
