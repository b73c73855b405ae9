"""The house rules, held by maintained tools where one exists: import-linter keeps the stage layers
(pyproject.toml [tool.importlinter]), ruff keeps pyflakes and import order clean, snakefmt keeps the workflow
formatted. What no tool checks here is checked by reading the syntax trees: functions short enough to read at once,
no private name imported across modules, package __init__ files that import nothing (an __init__ that imports its
modules would put all of them into the code fingerprint of any one)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "varup"
BIN = Path(sys.executable).parent
MAX_FUNCTION_LINES = 80


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it is in the [test] extra (bash scripts/setup.sh)")
    return str(path)


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_linter_contracts_are_kept():
    r = run(tool("lint-imports"))
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
    kept = r.stdout.count(" KEPT")
    assert kept >= 5, r.stdout[-3000:]  # layers, report, planning without torch, checkpoint loading, LM/sampler


def test_ruff_is_clean():
    r = run(tool("ruff"), "check", "src", "tests", "scripts")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_snakefmt_leaves_the_workflow_as_it_is():
    r = run(tool("snakefmt"), "--check", "Snakefile", "workflow/rules")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def test_every_function_reads_at_once():
    long = [f"{p.relative_to(SRC)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p, tree in modules() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_private_name_is_imported_across_modules():
    found = [f"{p.relative_to(SRC)}:{n.lineno} from {n.module} import {a.name}"
             for p, tree in modules() for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("varup")
             for a in n.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_package_init_files_import_nothing():
    found = [f"{p.relative_to(SRC)}:{n.lineno}" for p, tree in modules() if p.name == "__init__.py"
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert found == [], "an __init__ that imports its modules puts all of them into every fingerprint: " + str(found)


def test_the_layering_holds_in_a_deliberately_broken_copy(tmp_path):
    """The contracts can fail: a report module that imports the trainer breaks them."""
    pkg = tmp_path / "src"
    shutil.copytree(REPO / "src", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (pkg / "varup" / "report" / "broken.py").write_text("from varup.training.loop import train  # noqa: F401\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    r = subprocess.run([tool("lint-imports")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(pkg), "PATH": str(BIN)})
    assert r.returncode != 0 and "varup.report.broken -> varup.training.loop" in r.stdout, r.stdout[-3000:]
