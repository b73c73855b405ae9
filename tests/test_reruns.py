"""What re-runs, and whose results a run may touch, through real Snakemake runs of one cheap rule (data_toy) in a
copy of the repository: a code edit re-runs the rules whose code changed (params changed: code), an edit of the
config re-runs what it changes, and a second configuration under the same experiment name is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from varup.base.codehash import code_of

REPO = Path(__file__).resolve().parents[1]
TARGET = "results/toy/shapes/data"


def small_config() -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["shapes"]["generator"].update(n_train_per_class=2, n_val_per_class=2)
    return cfg


def smk(repo: Path, work: Path, cfgfile: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(work),
                           "--configfile", str(cfgfile), *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=work)  # not the repository: Snakemake looks for profiles/default in the cwd first


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A copy of the repository (its own src/, which the workflow puts first on the path) and one real run of
    data_toy under config `tiny.yaml`."""
    root = tmp_path_factory.mktemp("reruns")
    repo = root / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("config", "profiles", "workflow", "src", "envs"):
        shutil.copytree(REPO / name, repo / name, ignore=skip)
    shutil.copy(REPO / "Snakefile", repo / "Snakefile")
    work = root / "work"
    work.mkdir()
    cfgfile = work / "tiny.yaml"
    cfgfile.write_text(yaml.safe_dump(small_config()))
    r = smk(repo, work, cfgfile, "--cores", "1", TARGET)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return repo, work, cfgfile


def test_a_run_records_its_configuration_as_the_owner_of_the_results(ran):
    _, work, _ = ran
    owner = json.loads((work / "results" / "toy" / ".varup-owner.json").read_text())
    assert owner["configfiles"] == ["tiny.yaml"] and owner["experiment"] == "toy" and len(owner["fingerprint"]) == 16


def test_nothing_reruns_without_an_edit_and_a_code_edit_reruns_its_rule(ran):
    repo, work, cfgfile = ran
    r = smk(repo, work, cfgfile, "-n", TARGET)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    pkg = repo / "src" / "varup"
    toy, before = pkg / "data" / "toy.py", code_of("data-toy", pkg)
    original = toy.read_text()
    try:
        toy.write_text(original + "\nEDITED_BY_THE_TEST = 1\n")
        r = smk(repo, work, cfgfile, "-n", TARGET)
        after = code_of("data-toy", pkg)
    finally:
        toy.write_text(original)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "rule data_toy:" in out, out[-3000:]
    # the changed parameter is the code fingerprint of data-toy, which toy.py is part of
    assert f"Params have changed since last execution: Union of exclusive params before and now across all output: " \
           f"before: '{before}' now: '{after}'" in out, out[-3000:]


def test_an_edit_of_the_owning_config_reruns_what_it_changes(ran):
    repo, work, cfgfile = ran
    original = cfgfile.read_text()
    cfg = yaml.safe_load(original)
    cfg["datasets"]["shapes"]["generator"]["seed"] = 5
    try:
        cfgfile.write_text(yaml.safe_dump(cfg))
        r = smk(repo, work, cfgfile, "-n", TARGET)
    finally:
        cfgfile.write_text(original)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Params have changed since last execution" in out and '"seed": 5' in out, out[-3000:]


def test_another_config_under_the_same_experiment_name_is_refused(ran):
    repo, work, _ = ran
    cfg = small_config()
    cfg["methods"]["ours"]["lambda_se"] = 0.5
    variant = work / "variant.yaml"
    variant.write_text(yaml.safe_dump(cfg))
    r = smk(repo, work, variant, "-n", TARGET)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "holds the results of another configuration, tiny.yaml" in out, out[-3000:]
    assert "methods.ours.lambda_se" in out and "Set `experiment:` in variant.yaml to a new name" in out
    # the same content under another file name (a renamed or copied config) is the same experiment
    (work / "copy.yaml").write_text(yaml.safe_dump(small_config()))
    assert smk(repo, work, work / "copy.yaml", "-n", TARGET).returncode == 0
    # under its own name it plans its own results, and a dry run claims nothing
    cfg["experiment"] = "toy_variant"
    variant.write_text(yaml.safe_dump(cfg))
    r = smk(repo, work, variant, "-n", "results/toy_variant/shapes/data")
    assert r.returncode == 0 and "rule data_toy:" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert not (work / "results" / "toy_variant").exists()
