"""Code fingerprints (varup.base.codehash): an edit changes the fingerprint of exactly the stages whose code it touches,
and every rule that runs the library records its stage's fingerprint as a parameter."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from varup.base.codehash import code_of, stage_modules

REPO = Path(__file__).resolve().parents[1]
#: rules that run the library but are not fingerprinted: their output is downloaded bytes named by URL + sha256
#: (both parameters); a downloader edit re-running them would re-download and re-run the whole DAG for no change
DOWNLOADS = {"fetch_weights", "fetch_archive"}


@pytest.fixture()
def pkg(tmp_path) -> Path:
    """A copy of the varup package to edit."""
    shutil.copytree(REPO / "src" / "varup", tmp_path / "varup", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "varup"


def fingerprints(pkg: Path, stages=("data-toy", "tables", "train", "lambda-study", "varup.bench.suite")) -> dict[str, str]:
    return {s: code_of(s, pkg) for s in stages}


def edit(f: Path, old: str, new: str) -> None:
    text = f.read_text()
    assert text.count(old) >= 1, old
    f.write_text(text.replace(old, new, 1))


def test_a_module_edit_changes_the_stages_that_import_it_and_no_other(pkg):
    assert "varup.data.toy" in stage_modules("data-toy", pkg)
    assert "varup.data.toy" not in stage_modules("lambda-study", pkg)
    before = fingerprints(pkg)
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in before.values()) and fingerprints(pkg) == before
    (pkg / "data" / "toy.py").write_text((pkg / "data" / "toy.py").read_text() + "\nEDITED = 1\n")
    after = fingerprints(pkg)
    assert after["data-toy"] != before["data-toy"] and after["lambda-study"] == before["lambda-study"]
    for s in before:  # changed exactly where the module is part of the stage's code
        assert (after[s] != before[s]) == ("varup.data.toy" in stage_modules(s, pkg)), s


def test_comments_docstrings_and_formatting_change_nothing(pkg):
    before = fingerprints(pkg)
    f = pkg / "data" / "toy.py"
    f.write_text("# a new comment\n\n" + f.read_text().replace('"""', '"""An edited docstring. ', 1) + "\n\n# end\n")
    assert fingerprints(pkg) == before


def test_a_cli_edit_changes_only_its_subcommand(pkg):
    before = fingerprints(pkg)
    edit(pkg / "cli.py", "def cmd_tables(a) -> None:\n", "def cmd_tables(a) -> None:\n    edited = 1  # noqa\n")
    after = fingerprints(pkg)
    assert after["tables"] != before["tables"]
    assert {s: v for s, v in after.items() if s != "tables"} == {s: v for s, v in before.items() if s != "tables"}
    edit(pkg / "cli.py", 'p = cmd("lambda-study", cmd_lambda_study,', 'p = cmd("lambda-study", cmd_lambda_study,  #\n')
    assert fingerprints(pkg) == after  # formatting only
    with pytest.raises(KeyError, match="no subcommand 'nope'"):
        code_of("nope", pkg)


def test_a_package_data_file_counts_for_the_module_that_names_it(pkg):
    before = code_of("prepare", pkg)
    (pkg / "data" / "imagenet100.txt").write_text((pkg / "data" / "imagenet100.txt").read_text() + "n00000000\n")
    assert code_of("prepare", pkg) != before and code_of("lambda-study", pkg) == code_of("lambda-study", REPO / "src" / "varup")


def rule_blocks() -> dict[str, str]:
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    return {m.group(1) or m.group(2): b for b in re.split(r"\n(?=rule \w+:|use rule )", text)
            if (m := re.match(r"rule (\w+):|use rule \w+ as (\w+) with:", b))}


def test_every_rule_that_runs_the_library_records_its_code():
    blocks = rule_blocks()
    parents = {c: p for b in blocks.values() if (m := re.match(r"use rule (\w+) as (\w+)", b)) for p, c in [m.groups()]}
    checked = set()
    for name, body in blocks.items():
        shell = blocks[parents.get(name, name)]
        m = re.search(r'"(?:varup|\{params\.launch\}) ([a-z][a-z-]*) |"python -m (varup[.\w]+) ', shell)
        if not m or name in DOWNLOADS or (name in parents and "    params:" not in body):
            continue  # no library call, a download, or a use-rule that inherits its parent's params
        stage = m.group(1) or m.group(2)
        assert f'code=code_of("{stage}")' in body, f"rule {name} runs `{stage}` but has no params code=code_of(\"{stage}\")"
        checked.add(name)
    assert {"train", "sample_shard", "sample_cfg_shard", "evaluate", "bench", "tables", "inception_weights"} <= checked


def test_a_frontier_edit_re_scores_the_claim_study_but_never_resamples_it(pkg):
    """The claim study's comparison statistics live apart from its sampling: editing them changes the summary's
    fingerprint (and the ledger's), not the per-run grids' (16 runs resampled for a change they cannot see)."""
    stages = ("claim-grid", "claim-study", "tables")
    before = fingerprints(pkg, stages)
    (pkg / "base" / "frontier.py").write_text((pkg / "base" / "frontier.py").read_text() + "\nEDITED = 1\n")
    after = fingerprints(pkg, stages)
    assert after["claim-grid"] == before["claim-grid"]
    assert after["claim-study"] != before["claim-study"] and after["tables"] != before["tables"]


def test_the_trainer_s_code_holds_no_planning_module(pkg):
    """The run's specification reaches the trainer as a parameter, so a planning edit (a new grid key, a study's
    runs) changes only the specs it changes: the trainer's fingerprint holds no varup.config module. The memory plan
    of a config lived beside the trainer's micro-batch choice and pulled varup.config.plan into every training run."""
    assert not [m for m in stage_modules("train", pkg) if m.startswith("varup.config")]
    before = fingerprints(pkg, ("train", "plan-memory"))
    (pkg / "config" / "plan.py").write_text((pkg / "config" / "plan.py").read_text() + "\nEDITED = 1\n")
    after = fingerprints(pkg, ("train", "plan-memory"))
    assert after["train"] == before["train"] and after["plan-memory"] != before["plan-memory"]
