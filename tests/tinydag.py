"""The tiny toy DAG the end-to-end tests share: its config, Snakemake through the repository's Snakefile, and a
dry run's plan read back as (rule, wildcards). The finished DAG itself is the session fixture `finished`
(tests/conftest.py): built once per test session and read by every test that needs a finished run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VARUP_TEST_CACHE", REPO / ".cache" / "test"))


def tiny_config(results: Path) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["resources_dir"] = str(CACHE / "resources")  # Inception weights are fetched/converted once per machine
    ds = cfg["datasets"]["shapes"]
    ds["generator"].update(n_train_per_class=32, n_val_per_class=12)
    ds["tokenizer_gate"] = {"max_class_error": 1.0}  # wired and measured; a 40-step tokenizer cannot keep the class
    tok = cfg["tokenizers"]["toy_vq"]
    tok["train"].update(steps=40, batch_size=16, log_every=10, ckpt_every=20, dead_code_every=10)
    cfg["model"]["depths"] = [1]
    cfg["train"].update(steps=24, batch_size=16, log_every=4, ckpt_every=8, warmup_steps=4)
    cfg["sample"].update(n_per_class=6, batch_size=12)
    cfg["sample"]["qualitative"] = {"cfg": 3.0, "n_per_class": 3}
    cfg["metrics"].update(real_max_images=32, ssim_max_pairs_per_class=20)  # >= 7 per class for the mixes
    cfg["metrics"]["clean_fid"] = {"enabled": True, "max_images": 12}
    cfg["metrics"]["calibration"] = {"n_bins": 10, "max_rows": 24}
    cfg["experiments"]["ood"].update(max_images=16)
    cfg["experiments"]["ood"]["source"]["generator"].update(n_val_per_class=4)
    cfg["experiments"]["ood"]["corruptions"].update(names=["gaussian_noise", "pixelate"], severities=[1, 3],
                                                    max_images=4)
    cfg["experiments"]["downstream"].update(depth=1, n_images=2, n_samples=2)
    cfg["uncertainty"].update(T=4, classes=[0, 1], sample_seeds=[0], sweep_rates=[0.1, 0.3], sweep_n_per_class=4,
                              entanglement_mixes=[[0], [0, 1]], entanglement_n=8)
    cfg["uncertainty"]["mode_classifier"] = {"epochs": 15, "seed": 0}
    tiny_claim_study(cfg)
    return cfg


def tiny_claim_study(cfg: dict) -> None:
    """The claim study (not part of `all`) at the tiny size: its long-tailed dataset small, 2 arms x 2 seeds."""
    lt = cfg["datasets"]["shapes_lt"]
    lt["generator"].update(n_train_per_class=32, n_val_per_class=12)
    lt["tokenizer_gate"] = {"max_class_error": 1.0}
    cs = cfg["experiments"]["claim_study"]
    cs.update(depth=1, seeds=[0, 1], steps=24, snapshots=[12], temperatures=[0.8, 1.0, 1.3], top_p=[0.8],
              cfg=[1.0, 2.0], guided_top_p=None, n_per_class=8, batch_size=32, primary="sum_k8",
              rare_share=0.05, curve_settings=[{"temperature": 0.8, "top_p": 0.8, "cfg": 1.0}])  # 32 per class: rarest 1/32
    cs["arms"] = {a: cs["arms"][a] for a in ("baseline", "sum_k8")}


def smk(workdir: Path, cfgfile: Path, *args, timeout=1800, snakefile: Path | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Snakemake on ``workdir`` with the repository's Snakefile (or ``snakefile``, e.g. an edited copy's)."""
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile or REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(cfgfile), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def planned_jobs(dry_run_out: str) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job in a dry run's plan."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        w = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        wc = dict(kv.split("=", 1) for kv in w.group(1).split(", ")) if w else {}
        jobs.append((m.group(1), wc))
    return jobs


def finish_tiny_dag(work: Path) -> tuple[Path, dict, Path]:
    """Run the whole tiny DAG in ``work``: (work, config, config file)."""
    cfg = tiny_config(work / "results")
    cfgfile = work / "tiny.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    r = smk(work, cfgfile, "--cores", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return work, cfg, cfgfile
