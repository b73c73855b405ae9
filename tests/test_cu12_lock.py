"""The second lock, requirements-cu12.lock (VARUP_CUDA=12 bash scripts/setup.sh): a torch/torchvision pair whose
wheels are built for CUDA 12, for a cluster whose driver is older than the main lock's CUDA 13, and otherwise the
main lock's pins; setup.sh and lock.sh select it by VARUP_CUDA and refuse any other value."""
from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
#: what the CUDA build of torch brings (differs between the locks by construction)
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line.strip())
            assert m, f"{name}: not an exact pin: {line!r}"
            out[canonicalize_name(m[1])] = m[2]
    return out


def test_the_cu12_lock_pins_a_cuda_12_torch_pair_that_pyproject_accepts():
    cu12, main = pins("requirements-cu12.lock"), pins("requirements.lock")
    assert (cu12["torch"], cu12["torchvision"]) == ("2.10.0", "0.25.0")
    nvidia = {n: v for n, v in cu12.items() if n.startswith("nvidia-")}
    assert nvidia and all(n.endswith("-cu12") for n in nvidia), sorted(nvidia)  # no CUDA 13 wheel
    assert cu12["nvidia-cuda-runtime-cu12"].startswith("12.8.") and cu12["cuda-bindings"].startswith("12.")
    assert main["nvidia-cuda-runtime"].startswith("13.")  # the main lock is the CUDA 13 one
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for r in map(Requirement, project["dependencies"]):
        if r.name in ("torch", "torchvision"):
            assert r.specifier.contains(cu12[r.name]), f"pyproject.toml's {r} refuses the cu12 lock's pin"


def test_the_cu12_lock_holds_the_main_locks_pins_apart_from_the_torch_build():
    cu12, main = pins("requirements-cu12.lock"), pins("requirements.lock")
    rest = {n for n in main.keys() | cu12.keys() if not TORCH_FAMILY.match(n)}
    # setuptools: the main lock's torch requires it (pinned there); torch 2.10 does not, so the venv keeps its own
    differ = sorted(f"{n}: {main.get(n)} vs {cu12.get(n)}" for n in rest - {"setuptools"} if main.get(n) != cu12.get(n))
    assert differ == []
    assert "setuptools" in cu12


def run(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_setup_installs_the_cu12_lock_when_asked_and_refuses_an_unknown_cuda(tmp_path):
    venv = tmp_path / "venv"
    # PYTHON=false: setup.sh says which lock it installs, then fails at the venv (nothing is downloaded)
    r = run("setup.sh", {"VARUP_CUDA": "12", "PYTHON": "false", "VARUP_VENV": str(venv)})
    assert r.returncode != 0 and "pins from requirements-cu12.lock" in r.stdout
    r = run("setup.sh", {"VARUP_CUDA": "13", "PYTHON": "false", "VARUP_VENV": str(venv)})
    assert r.returncode != 0 and "pins from requirements.lock" in r.stdout
    for script in ("setup.sh", "lock.sh"):
        r = run(script, {"VARUP_CUDA": "11", "PYTHON": "false", "VARUP_VENV": str(venv)})
        assert r.returncode == 2 and "VARUP_CUDA=11" in r.stderr and "requirements-cu12.lock" in r.stderr, r.stderr
    assert not venv.exists()
