"""The toy generator learns its data: a reduced toy config (the default data, a 1,000-step tokenizer, 600 VAR steps,
one seed; about 3 minutes on 2 cores) run through the real DAG up to one run's mode coverage. The trained VAR's samples must show the
conditioned shape far more often than chance, and the tokenizer gate must have measured a tokenizer that keeps the
class. A trainer that ignores the class, a broken teacher-forcing input or a tokenizer that blurs shapes away fails
these thresholds (chance is a class error of 0.75 with 4 classes)."""
from __future__ import annotations

import json

import pytest
import yaml

from tinydag import REPO, smk

pytestmark = pytest.mark.slow

CHANCE = 0.75


def reduced_config(results) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    # data and gate as in the default; the tokenizer gets half the default's steps (1,000: a class error of 0.035 on
    # its reconstructions, within the gate's 0.1; 600 steps on half the images gave 0.23 and failed it); the VAR gets
    # 600 steps and one seed
    cfg["tokenizers"]["toy_vq"]["train"]["steps"] = 1000
    cfg["train"].update(steps=600, ckpt_every=300)
    cfg["seeds"] = [0]
    cfg["sample"]["n_per_class"] = 24
    cfg["serial_threads"] = cfg["threads"] = 2
    return cfg


def test_reduced_toy_generator_beats_chance_by_a_wide_margin(tmp_path):
    cfg = reduced_config(tmp_path / "results")
    f = tmp_path / "reduced.yaml"
    f.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "results" / "toy" / "shapes"
    target = run / "d2" / "baseline" / "seed0" / "mode_coverage.json"
    r = smk(tmp_path, f, "--cores", "2", str(target))
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    gate = json.loads((run / "tokenizer" / "gate.json").read_text())
    assert gate["passed"] and gate["class_error"] <= cfg["datasets"]["shapes"]["tokenizer_gate"]["max_class_error"]
    cov = json.loads(target.read_text())["coverage"]
    print(f"reduced toy: gate class error {gate['class_error']:.3f}, sample class error {cov['class_error']:.3f}, "
          f"modes covered {cov['overall']['covered']} (i.i.d. ceiling {cov['overall']['expected_covered_true']:.1f})")
    assert cov["n"] == 96
    assert cov["class_error"] <= 0.35, cov["class_error"]  # less than half of chance (0.75)
    assert cov["overall"]["covered"] >= 0.6 * cov["overall"]["expected_covered_true"]
