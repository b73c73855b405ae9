#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv.
#
# torch and torchvision are installed as one matching registry pair: on CPU-only machines the
# local +cpu torch wheel cannot load any registry torchvision ("operator torchvision::nms does
# not exist"), while the CUDA builds of a matching pair run fine on CPU. The pair and every other distribution
# are pinned by requirements.lock, used as pip constraints (regenerate it with scripts/lock.sh).
# VARUP_TORCH_PIN="torch==A torchvision==B" installs another matching pair: the lock then constrains everything
# except torch, torchvision and the CUDA wheels that torch build brings (nvidia-*, cuda-*, triton).
# VARUP_CUDA=12 installs the second lock, requirements-cu12.lock, instead: torch 2.10.0 / torchvision 0.25.0 built for
# CUDA 12.8, for a node whose NVIDIA driver predates CUDA 13 (the main lock's torch needs a driver >= 580; README:
# "On an older CUDA driver"). Give it its own venv (VARUP_VENV=.venv-cu12) or it replaces .venv.
# Re-running is cheap: nothing is installed when pyproject.toml, the lock and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VARUP_VENV:-.venv}
LOCK=requirements.lock
case "${VARUP_CUDA:-13}" in
  13) ;;
  12) LOCK=requirements-cu12.lock ;;
  *) echo "setup: VARUP_CUDA=${VARUP_CUDA}: use 13 (requirements.lock, driver >= 580) or 12 (requirements-cu12.lock," \
       "driver >= 525.60.13; see README, On an older CUDA driver)" >&2; exit 2 ;;
esac
TORCH_PIN=${VARUP_TORCH_PIN:-$(grep -E '^(torch|torchvision)==' "$LOCK" | tr '\n' ' ')}

stamp="$VENV/.varup-setup"
want=$( (cat pyproject.toml "$LOCK" scripts/setup.sh; echo "$TORCH_PIN") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

# A CUDA build of torch takes about 5.5 GB in the venv, and pip's cache would hold another copy of every wheel it
# downloads: say so before a full disk stops pip half way, and keep no cache (the stamp above makes reruns free).
free_mb=$(df -Pm . | awk 'NR==2 {print $4}')
if [ "${free_mb:-0}" -lt 8000 ]; then
  echo "setup: only ${free_mb} MB free on $(df -P . | awk 'NR==2 {print $6}'); the venv needs about 8,000 MB" \
       "(torch's CUDA build); pip will stop when the disk is full" >&2
fi
export PIP_NO_CACHE_DIR=1
echo "setup: creating $VENV with $("$PYTHON" --version 2>&1), pins from $LOCK"
"$PYTHON" -m venv "$VENV"
constraints="$VENV/.varup-constraints.txt"
if [ -n "${VARUP_TORCH_PIN:-}" ]; then
  grep -vE '^(torch|torchvision|triton|nvidia-[^=]*|cuda-[^=]*)==' "$LOCK" > "$constraints"
else
  cp "$LOCK" "$constraints"
fi
"$VENV/bin/python" -m pip install -q -c "$constraints" --upgrade pip
echo "setup: installing $TORCH_PIN (a few GB on first install)"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -c "$constraints" $TORCH_PIN
echo "setup: installing varup and its dependencies"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q -c "$constraints" -e '.[test]' $TORCH_PIN
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
import torch, torchvision, torch_fidelity, cleanfid, snakemake  # noqa: F401  fail here, not mid-DAG
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, ok")
PY
echo "$want" > "$stamp"
