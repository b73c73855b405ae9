"""Packaging: a built wheel ships the schema and data and an installed copy validates the configs; the lock pins the
whole environment and scripts/setup.sh and envs/varup.yaml use it; the workflow parses with no varup installed; the
conda env file holds no path to the project and its post-deploy hook makes the jobs import the workflow's src/."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "varup"
LOCK = REPO / "requirements.lock"
SITE = sysconfig.get_paths()["purelib"]  # this venv's site-packages: the dependencies, without running its .pth files


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def package_data() -> list[str]:
    """Every non-Python file of src/varup, as its path in a wheel."""
    return sorted(p.relative_to(PKG.parent).as_posix() for p in PKG.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tree (no build isolation: offline, with this venv's setuptools)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    r = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(tree)])
    assert r.returncode == 0, r.stderr[-3000:]
    return next(tmp.glob("varup-*.whl"))


def test_wheel_ships_the_schema_and_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = package_data()
    assert {"varup/config/schema.yaml", "varup/report/paper_results.json", "varup/data/imagenet100.txt"} <= set(data)
    assert [f for f in data if f not in names] == []


INSTALLED_CHECK = """
import json, sys, yaml
import varup
import varup.config.schema as vs
from varup.data.prepare import read_class_list
from varup.report.tables import paper_results
for f in sys.argv[1:]:
    vs.validate(yaml.safe_load(open(f)))
print(json.dumps({"module": varup.__file__, "schema": str(vs.DEFAULT_SCHEMA), "tables": sorted(paper_results()),
                  "classes": len(read_class_list())}))
"""


def test_installed_wheel_validates_the_configs_and_reads_its_data(wheel, tmp_path):
    """A non-editable install, imported from outside the checkout, finds its schema and data in itself."""
    target = tmp_path / "site"
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)])
    assert r.returncode == 0, r.stderr[-3000:]
    configs = [str(REPO / "config" / n) for n in ("config.yaml", "paper.yaml")]
    r = run([sys.executable, "-c", INSTALLED_CHECK, *configs], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["module"].startswith(str(target)) and out["schema"] == str(target / "varup" / "config" / "schema.yaml")
    assert "table2" in out["tables"] and out["classes"] == 100


def lock_pins() -> dict[str, str]:
    """requirements.lock as {canonical name: version}; every line must be an exact name==version pin."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line.strip())
            assert m, f"not an exact pin: {line!r}"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def needed_distributions(reqs: list[str]) -> dict[str, list[Requirement]]:
    """Every distribution the requirements need here (markers evaluated, extras followed, through the installed
    distributions' metadata), each with the requirements that ask for it."""
    found, walked = {}, set()
    todo = [(Requirement(r), "") for r in reqs]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        found.setdefault(name, []).append(req)
        for ex in {""} | req.extras:
            if (name, ex) not in walked:
                walked.add((name, ex))
                todo += [(Requirement(r), ex) for r in metadata.requires(name) or []]
    return found


def test_lock_pins_everything_pyproject_needs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = needed_distributions(project["dependencies"] + project["optional-dependencies"]["test"])
    pins = lock_pins()
    assert sorted(set(needed) - set(pins)) == []
    bad = [f"{r} vs =={pins[n]}" for n, rs in needed.items() for r in rs
           if not r.specifier.contains(pins[n], prereleases=True)]
    assert bad == []
    assert {"torch", "torchvision", "numpy", "pandas", "pillow"} <= set(pins)
    assert re.search(r"^# Frozen on Linux x86_64, CPython 3\.11\.", LOCK.read_text(), re.M)


def test_setup_installs_with_the_lock():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r'^LOCK=requirements\.lock$', text, re.M)
    assert re.search(r'^want=.*"\$LOCK"', text, re.M), "the stamp must hash the lock"
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert installs and all('-c "$constraints"' in ln for ln in installs)
    # the torch pair comes from the lock (one source), never hard-coded here
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "torch==" in ln]
    assert any("grep -E '^(torch|torchvision)==' \"$LOCK\"" in ln for ln in code)


def test_conda_env_lists_the_lock_pins_and_no_path():
    env = yaml.safe_load((REPO / "envs" / "varup.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lock_lines = [ln.strip() for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert pip == lock_lines
    assert not [d for d in pip if d.startswith(("-", ".")) or "/" in d or "@" in d]
    frozen = re.search(r"CPython (\d+\.\d+)\.", LOCK.read_text())[1]
    assert f"python={frozen}" in env["dependencies"]


def test_rules_find_the_conda_env_file():
    m = re.search(r'^CONDA_ENV = "([^"]+)"$', (REPO / "workflow" / "rules" / "common.smk").read_text(), re.M)
    assert m and (REPO / "workflow" / "rules" / m[1]).resolve() == REPO / "envs" / "varup.yaml"


def bare_python(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    """This venv's interpreter without site processing: its packages importable, but not the editable varup."""
    boot = f"import sys; sys.path.append({SITE!r}); " + code
    return run([sys.executable, "-S", "-c", boot], cwd=cwd, env=env)


def test_workflow_parses_without_an_installed_varup(tmp_path):
    assert "ModuleNotFoundError" in bare_python("import varup", tmp_path).stderr
    argv = ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"), "--list-rules"]
    r = bare_python(f"sys.argv = {argv!r}; from snakemake.cli import main; main()", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"train", "tables", "all"} <= set(r.stdout.split())


def test_conda_post_deploy_hook_imports_the_workflow_src(tmp_path):
    """The post-deploy script, run in a stand-in env (a venv on PATH, as conda activation would put it), makes
    VARUP_SRC importable to every interpreter of the env and writes the `varup` command."""
    env_dir = tmp_path / "env"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)]).returncode == 0
    env_site = run([env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(env_site.stdout.strip(), "zz-deps.pth").write_text(SITE + "\n")  # the dependencies (the env's pip pins)
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VARUP_SRC")}
    base["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}"
    r = run(["bash", str(REPO / "envs" / "varup.post-deploy.sh")], cwd=tmp_path, env=base)
    assert r.returncode == 0, r.stderr
    where = [env_dir / "bin" / "python", "-c", "import varup; print(varup.__file__)"]
    assert "ModuleNotFoundError" in run(where, cwd=tmp_path, env=base).stderr
    with_src = {**base, "VARUP_SRC": str(REPO / "src")}
    assert run(where, cwd=tmp_path, env=with_src).stdout.strip() == str(PKG / "__init__.py")
    r = run([env_dir / "bin" / "varup", "--help"], cwd=tmp_path, env=with_src)
    assert r.returncode == 0 and "usage: varup" in r.stdout, r.stderr[-2000:]
