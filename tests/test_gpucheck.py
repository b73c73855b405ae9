"""`varup gpu-check --tiny`: every section's code path on CPU, one PASS/FAIL line each, the JSON figures, and a
failing section that fails the command while the others still run."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest

from varup.bench import gpucheck
from varup.cli import main

STATUS = ("PASS", "FAIL", "SKIP")


def _lines(out: str) -> dict[str, str]:
    """{section: its status line} of gpu-check's stdout (one line per section, then the overall one)."""
    found: dict[str, list[str]] = {}
    for ln in out.splitlines():
        parts = ln.split(" ", 2)
        if len(parts) >= 2 and parts[0] in STATUS:
            found.setdefault(parts[1], []).append(ln)
    assert all(len(v) == 1 for v in found.values()), found
    return {k: v[0] for k, v in found.items()}


@pytest.mark.timeout(300)
def test_gpu_check_tiny_passes_every_section_and_writes_their_figures(tmp_path, monkeypatch, capsys):
    import varup.training.loop as loop

    wrapped = []
    real_wrap = loop.wrap_ddp
    monkeypatch.setattr(loop, "wrap_ddp", lambda m, d: wrapped.append(type(m).__name__) or real_wrap(m, d))
    out = tmp_path / "gpucheck.json"
    rc = main(["gpu-check", "--tiny", "--out", str(out), "--threads", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 0, lines
    for name in gpucheck.SECTIONS:
        assert lines[name].startswith(f"PASS {name} "), lines[name]
    assert lines["gpu-check"].startswith("PASS gpu-check 6/6")
    res = json.loads(out.read_text())
    assert res["passed"] and res["tiny"] and set(res["sections"]) == set(gpucheck.SECTIONS)
    s = res["sections"]
    assert all(s[n]["status"] == "PASS" for n in gpucheck.SECTIONS)
    assert s["ceilings"]["matmul_tflops"]["fp32"] > 0
    d16 = s["train_d16"]
    for run in ("eager", "compiled", "official_recipe"):
        r = d16[run]
        assert r["imgs_per_s_ce"] > 0 and r["imgs_per_s_full"] > 0 and r["mfu_ce"] > 0 and r["mfu_800_ce"] > 0
        assert math.isfinite(r["loss_ce_only"]) and math.isfinite(r["loss_full_objective"])
        assert r["full_objective_peak_mem_gb"] > 0 and r["ratio_full_vs_ce"] > 0
    assert d16["compiled"]["compile"] and d16["graph_breaks"] == 0 and d16["official_recipe"]["recipe"].startswith("official")
    assert set(d16["targets"].values()) <= {"met", "missed"} and len(d16["targets"]) == 4
    assert s["train_d20"]["depth"] == 2 and s["train_d20"]["full_objective_peak_mem_gb"] > 0
    assert s["sample"]["same_seed_same_tokens"] is True
    assert s["sample"]["batch_2"]["imgs_per_s"] > 0 and s["sample"]["batch_4"]["imgs_per_s"] > 0
    fams = s["ddp"]["families"]
    assert s["ddp"]["backend"] == "gloo"
    for f in ("class", "text_empty_caption", "text_learned"):
        assert fams[f]["status"] == "PASS" and math.isfinite(fams[f]["loss"])
    has_transformers = importlib.util.find_spec("transformers") is not None
    assert fams["lm_sft"]["status"] == ("PASS" if has_transformers else "SKIP")
    # the trainers really ran under DDP (a world of one rank): each VAR family's model was wrapped
    assert wrapped == ["VAR", "CaptionedVAR", "CaptionedVAR"], wrapped
    r = s["resume"]
    assert r["bit_identical"] and r["max_abs_dw"] == 0.0 and r["killed_at"] == 3 and r["same_curve_steps"]
    assert r["curve_len"]["cut"] == r["curve_len"]["whole"] == 8


def test_a_failing_section_fails_the_command_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("injected sampling failure")

    monkeypatch.setattr(gpucheck, "check_sample", broken)
    out = tmp_path / "gpucheck.json"
    rc = main(["gpu-check", "--tiny", "--sections", "ceilings,sample,resume", "--out", str(out), "--threads", "1"])
    lines = _lines(capsys.readouterr().out)
    assert rc == 1
    assert lines["sample"] == "FAIL sample RuntimeError: injected sampling failure"
    assert lines["ceilings"].startswith("PASS ceilings") and lines["resume"].startswith("PASS resume")
    assert lines["gpu-check"].startswith("FAIL gpu-check 2/3 sections (failed: sample)")
    res = json.loads(out.read_text())
    assert not res["passed"] and set(res["sections"]) == {"ceilings", "sample", "resume"}
    assert res["sections"]["sample"]["status"] == "FAIL" and "injected" in res["sections"]["sample"]["traceback"]
    assert res["sections"]["resume"]["bit_identical"] is True


def test_unknown_sections_are_refused_naming_the_choices():
    with pytest.raises(ValueError, match="unknown \\['train'\\]; choose from ceilings"):
        gpucheck.gpu_check(tiny=True, sections=["train"])
