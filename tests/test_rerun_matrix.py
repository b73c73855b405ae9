"""The rerun matrix: an edit re-runs exactly the rules whose results it can change.

On the shared finished tiny DAG (tests/conftest.py), a copy of the repository gets one statement appended to one
module, and a dry run through the copy's Snakefile plans what would re-run. The code fingerprints (varup.base.codehash)
follow imports, so this is what the stage layering buys: the sampler never re-trains, the report code re-runs only the
report, a loss edit never re-trains the tokenizer. The README's re-run section states the same matrix.
A last case checks the remedy the README gives for an edit that changes no result (`snakemake --touch`)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tinydag import REPO, planned_jobs, smk

pytestmark = pytest.mark.slow

#: rules of the tiny DAG that use the tokenizer's output or train/sample/score models
SAMPLES_ON = {"sample_shard", "merge_samples", "sample_qualitative", "evaluate", "toy_metrics", "mode_coverage",
              "mc_dropout", "uncertainty_sets", "score_uncertainty_sets", "downstream", "tables", "figures", "all"}
TRAIN_ON = SAMPLES_ON | {"train", "ood_eval", "corruption_eval"}
TOKENIZER_ON = TRAIN_ON | {"tokenizer_train", "tokenizer_gate", "encode", "encode_ood", "encode_corrupt", "references",
                                "toy_metrics_floor"}

#: module edited (under src/varup) -> the rules that must re-run, exactly
MATRIX = {
    "sampling/sampler.py": SAMPLES_ON,
    "report/tables.py": {"tables", "all"},
    "report/figures.py": {"figures", "all"},
    "metrics/calibration.py": {"evaluate", "tables", "all"},
    "training/losses.py": TRAIN_ON,
    "models/vqvae.py": TOKENIZER_ON,
    "config/plan.py": {"tables", "figures", "all"},  # specs reach the stages as parameters, never as code
}
#: never re-run by any edit above: the data, the Inception weights, the classifier and the real set's features
UPSTREAM = {"data_toy", "data_ood", "corrupt_data", "inception_weights", "mode_classifier", "real_features"}


@pytest.fixture(scope="module")
def copy(finished, tmp_path_factory):
    """A copy of the repository whose Snakefile puts its own src/ first on the path."""
    repo = tmp_path_factory.mktemp("matrix") / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("config", "profiles", "workflow", "src", "envs"):
        shutil.copytree(REPO / name, repo / name, ignore=skip)
    shutil.copy(REPO / "Snakefile", repo / "Snakefile")
    return repo


def replanned(finished, repo: Path, module: str, *args) -> set[str]:
    """The rules a dry run plans after one statement is appended to ``module`` (restored afterwards)."""
    work, _, cfgfile = finished
    f = repo / "src" / "varup" / module
    original = f.read_text()
    f.write_text(original + "\nEDITED_BY_THE_RERUN_MATRIX = 1\n")
    try:
        r = smk(work, cfgfile, "-n", *args, snakefile=repo / "Snakefile", cwd=work)
    finally:
        f.write_text(original)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return {rule for rule, _ in planned_jobs(r.stdout)}


def test_the_copy_plans_nothing_without_an_edit(finished, copy):
    work, _, cfgfile = finished
    r = smk(work, cfgfile, "-n", snakefile=copy / "Snakefile", cwd=work)
    assert r.returncode == 0 and "Nothing to be done" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


@pytest.mark.parametrize("module", sorted(MATRIX))
def test_an_edit_reruns_exactly_the_rules_whose_results_it_can_change(finished, copy, module):
    rules = replanned(finished, copy, module)
    assert rules == MATRIX[module], f"{module}: re-runs {sorted(rules)}; expected {sorted(MATRIX[module])}"
    assert not rules & UPSTREAM


def test_after_an_edit_that_changes_no_result_touch_marks_the_results_current(finished, copy):
    """The README's remedy for a pure move or a comment-like edit: `snakemake --touch` records the new fingerprints
    without running anything, and the next dry run has nothing to do."""
    work, _, cfgfile = finished
    f = copy / "src" / "varup" / "report" / "tables.py"
    original = f.read_text()
    f.write_text(original + "\nEDITED_BY_THE_RERUN_MATRIX = 1\n")
    try:
        touched = smk(work, cfgfile, "--touch", "--cores", "1", snakefile=copy / "Snakefile", cwd=work)
        after = smk(work, cfgfile, "-n", snakefile=copy / "Snakefile", cwd=work)
    finally:
        f.write_text(original)
        smk(work, cfgfile, "--touch", "--cores", "1", cwd=work)  # the shared run's metadata back to the repository's code
    assert touched.returncode == 0, (touched.stdout + touched.stderr)[-3000:]
    assert "Nothing to be done" in after.stdout + after.stderr, (after.stdout + after.stderr)[-3000:]
