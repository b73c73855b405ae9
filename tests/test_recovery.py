"""Recovery and configuration edge cases found by fault trials (issue 15): an unreadable checkpoint is set aside (the
previous one resumes, bit-identically), a Ctrl-C through Snakemake keeps the whole loss curve, sidecars go with their
results, the config rejects or converts what it used to accept silently, and `--report` before a run says so."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from test_train import assets, run_train, same_weights, spec  # noqa: F401  (assets: the tiny token cache fixture)
from varup.base.runtime import ResumableLog, load_training_state, previous_checkpoint, save_training_state
from varup.base.utils import remove_orphan_provenance, write_provenance
from varup.config.errors import ConfigError
from varup.config.plan import Run, run_spec
from varup.config.reporting import unfinished_report
from varup.config.schema import validate
from varup.training.loop import RunSpec

REPO = Path(__file__).resolve().parents[1]
TIMING = ("imgs_per_s", "tokens_per_s", "elapsed_s")


def default_cfg() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def curve(path: Path) -> list[dict]:
    """A published loss curve without its timing fields."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------------- 1: checkpoints
def test_checkpoint_rotation_keeps_one_previous_good_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    last = tmp_path / "ckpt" / "last.pt"
    for step in (1, 2, 3):
        save_training_state(last, model=model, optimizer=opt, step=step, config={}, extra={"run_hash": "h"})
    prev = previous_checkpoint(last)
    assert prev.name == "prev.pt"
    assert torch.load(last, weights_only=True)["step"] == 3 and torch.load(prev, weights_only=True)["step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt", "prev.pt"]  # no temporary file left


def test_both_checkpoints_unreadable_start_afresh_and_are_set_aside(tmp_path, caplog):
    last = tmp_path / "last.pt"
    last.write_bytes(b"not a checkpoint")
    previous_checkpoint(last).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="varup.base.runtime"):
        assert load_training_state(last, run_hash="h") is None
    assert not last.exists() and not previous_checkpoint(last).exists()
    assert len(list(tmp_path.glob("corrupt-*.pt"))) == 2
    msg = caplog.text
    assert f"{last} cannot be read" in msg and "previous checkpoint cannot be read either" in msg
    assert "starting afresh" in msg


def test_prev_without_last_is_removed_not_resumed(tmp_path):
    """A deleted last.pt means 'start afresh' (or a finished run): the older prev.pt must not be resumed."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    last = tmp_path / "last.pt"
    for step in (1, 2):
        save_training_state(last, model=model, optimizer=opt, step=step, config={}, extra={"run_hash": "h"})
    last.unlink()
    assert load_training_state(last, run_hash="h") is None and not previous_checkpoint(last).exists()


def test_truncated_last_checkpoint_resumes_from_prev_bit_identically(assets, tmp_path, caplog):  # noqa: F811
    s = spec(steps=12, ckpt_every=4)
    ref = tmp_path / "ref"
    run_train(assets, ref, s)
    run = tmp_path / "run"
    assert run_train(assets, run, s, stop_after=10) == {"stopped_at": 10}  # checkpoints at 4, 8 and 10
    ckpt = run / "train" / "ckpt"
    assert torch.load(ckpt / "prev.pt", weights_only=True)["step"] == 8
    truncate(ckpt / "last.pt")
    with caplog.at_level(logging.WARNING, logger="varup.base.runtime"):
        summary = run_train(assets, run, s)
    assert summary["resumed_from"] == 8
    aside = list(ckpt.glob("corrupt-*.pt"))
    assert len(aside) == 1
    assert f"{ckpt / 'last.pt'} cannot be read" in caplog.text and f"set aside as {aside[0].name}" in caplog.text
    assert "resuming from the previous checkpoint prev.pt at step 8" in caplog.text
    assert same_weights(ref / "model.pt", run / "model.pt")
    assert curve(run / "train" / "metrics.jsonl") == curve(ref / "train" / "metrics.jsonl")


def test_unreadable_checkpoint_without_prev_starts_afresh(assets, tmp_path, caplog):  # noqa: F811
    ckpt = tmp_path / "train" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"\x00" * 100)
    with caplog.at_level(logging.WARNING, logger="varup.base.runtime"):
        summary = run_train(assets, tmp_path, spec(steps=4))
    assert summary["resumed_from"] == 0 and (tmp_path / "model.pt").exists()
    assert "there is no previous checkpoint (prev.pt): starting afresh" in caplog.text
    assert list(ckpt.glob("corrupt-*.pt"))


def _tokenizer_run(tmp_path: Path, dead_code_every: int = 0, reseed_from: str = "latent", **kw):
    from varup.tokenizer.train import train_tokenizer

    vq = dict(vocab_size=32, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 4, 8),
              share_quant_resi=4, norm_groups=8, using_sa=False, using_mid_sa=False)
    tc = dict(steps=8, batch_size=4, warmup_steps=2, log_every=2, ckpt_every=2, dead_code_every=dead_code_every,
              dead_code_threshold=0.9, dead_code_until=1.0, reseed_from=reseed_from)
    imgs = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return train_tokenizer(vq, tc, lambda idx: imgs[torch.as_tensor(idx)], len(imgs), out_model=tmp_path / "vqvae.pt",
                           work_dir=tmp_path, device="cpu", **kw)


def test_tokenizer_sets_a_truncated_checkpoint_aside_and_resumes_from_prev(tmp_path, caplog):
    assert _tokenizer_run(tmp_path, stop_after=5) == {"stopped_at": 5}  # checkpoints at 2, 4 and 5
    ckpt = tmp_path / "ckpt"
    truncate(ckpt / "last.pt")
    with caplog.at_level(logging.WARNING, logger="varup.base.runtime"):
        _tokenizer_run(tmp_path)
    assert "resuming from the previous checkpoint prev.pt at step 4" in caplog.text
    assert (tmp_path / "vqvae.pt").exists() and [json.loads(x)["step"] for x in
                                                 (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    assert not (ckpt / "last.pt").exists() and not (ckpt / "prev.pt").exists()  # a finished run keeps the model only


@pytest.mark.parametrize("reseed_from", ["latent", "scales"])
def test_an_interrupted_tokenizer_that_reseeds_codes_resumes_bit_identically(tmp_path, reseed_from):
    """The dead-code generator's state travels in the checkpoint (it used to be seeded afresh on resume)."""
    from varup.models.vqvae import load_vqvae

    kw = {"dead_code_every": 1, "reseed_from": reseed_from}
    _tokenizer_run(tmp_path / "ref", **kw)
    assert _tokenizer_run(tmp_path / "cut", stop_after=3, **kw) == {"stopped_at": 3}
    _tokenizer_run(tmp_path / "cut", **kw)
    log = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert sum(rec["reseeded"] for rec in log) > 0  # the generator was drawn from, before and after the cut
    ref, cut = (load_vqvae(tmp_path / d / "vqvae.pt").state_dict() for d in ("ref", "cut"))
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)


def test_a_log_line_cut_short_by_a_crash_is_dropped_on_resume(tmp_path, caplog):
    live = tmp_path / "ckpt" / "metrics.jsonl"
    live.parent.mkdir()
    live.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n{"step": 6, "lo')
    with caplog.at_level(logging.WARNING, logger="varup.base.runtime"):
        ResumableLog(live, tmp_path / "metrics.jsonl").resume_at(6)
    assert [json.loads(x)["step"] for x in live.read_text().splitlines()] == [2, 4]
    assert "not complete JSON records" in caplog.text


# ------------------------------------------------------------------------------- 2-5: configuration
def test_uncertainty_run_seeds_outside_seeds_are_rejected():
    cfg = default_cfg()
    cfg["uncertainty"]["run_seeds"] = [5]
    with pytest.raises(ConfigError, match=r"uncertainty/run_seeds: \[5\] not in seeds \[0, 1\]"):
        validate(cfg)
    cfg = default_cfg()
    cfg["uncertainty"]["run_seeds"] = [1]
    validate(cfg)


def test_out_of_range_classes_are_named_by_their_own_key():
    cfg = default_cfg()
    cfg["uncertainty"]["entanglement_mixes"] = [[0, 1], [9, 2]]
    cfg["uncertainty"]["classes"] = [0, 4]
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "uncertainty/entanglement_mixes/1/0: class 9 is out of range for datasets/shapes (4 classes" in msg
    assert "uncertainty/classes/1: class 4 is out of range" in msg
    assert "uncertainty/classes:" not in msg


def test_text_values_are_converted_where_the_schema_wants_numbers():
    cfg = default_cfg()
    cfg["train"].update(steps="10", lr="1e-3", compile="false")
    cfg["model"]["depths"] = ["2"]
    cfg["bench"] = {"depth": "null"}
    validate(cfg)
    assert cfg["train"]["steps"] == 10 and cfg["train"]["lr"] == 1e-3 and cfg["train"]["compile"] is False
    assert cfg["model"]["depths"] == [2] and cfg["bench"]["depth"] is None
    assert cfg["experiment"] == "toy"  # text where the schema wants text stays text
    cfg = default_cfg()
    cfg["train"]["steps"] = "ten"
    with pytest.raises(ConfigError, match=r"train/steps: 'ten' is not of type 'integer' \(a `--config` value"):
        validate(cfg)


def snakemake(work: Path, *args, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), *args],
                          cwd=work, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_nested_config_override_reaches_the_rules_as_numbers(tmp_path):
    r = snakemake(tmp_path, "results/toy/shapes/d2/ours/seed0/model.pt", "-n", "-p", "--config",
                  "train={steps: 10, lr: 0.002}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert '"steps": 10,' in out and '"lr": 0.002' in out and '"steps": "10"' not in out


def _folder(root: Path, classes) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_num_classes_of_a_folder_dataset_is_checked_against_the_folder(tmp_path):
    from varup.data.prepare import prepare_folder

    root = _folder(tmp_path / "pets", ["cat", "dog"])
    cfg = default_cfg()
    cfg["datasets"]["pets"] = {"kind": "folder", "root": str(root), "resolution": 8, "num_classes": 5,
                               "tokenizer": "toy_vq"}
    with pytest.raises(ConfigError, match=rf"datasets/pets/num_classes: 5, but the folder {root} has 2 class folders "
                                          rf"\['cat', 'dog'\]"):
        validate(cfg)
    cfg["datasets"]["pets"]["num_classes"] = 2
    cfg["uncertainty"]["classes"] = [0, 1]
    cfg["uncertainty"]["entanglement_mixes"] = [[0, 1]]
    validate(cfg)
    cfg["datasets"]["pets"].update(root=str(tmp_path / "not_yet_mounted"), num_classes=5)
    validate(cfg)  # the folder cannot be read now: the prepare job checks it
    with pytest.raises(ConfigError, match="datasets/pets/num_classes: 5, but the folder"):
        prepare_folder(root, tmp_path / "data", resolution=8, num_classes=5,
                       num_classes_key="datasets/pets/num_classes")
    assert not (tmp_path / "data").exists()
    assert prepare_folder(root, tmp_path / "data", resolution=8, num_classes=2)["classes"] == ["cat", "dog"]


# ------------------------------------------------------------------------------------- 6: sidecars
def test_orphan_sidecars_are_removed_and_a_result_keeps_its_own(tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.json", tmp_path / "c.pt"
    a.write_text("x")
    for p in (a, b, c):
        write_provenance(p)
    assert remove_orphan_provenance(a, [b, c], None) == [tmp_path / "b.json.prov.json", tmp_path / "c.pt.prov.json"]
    assert a.exists() and [p.name for p in tmp_path.glob("*.prov.json")] == ["a.npz.prov.json"]


def _dry_run_outputs(work: Path) -> dict[str, set[str]]:
    """rule -> the output files of its jobs in a forced dry run of the default DAG."""
    r = snakemake(work, "-n", "-F")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    outs: dict[str, set[str]] = {}
    for block in r.stdout.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0].strip()
        for line in block.splitlines():
            if line.strip().startswith("output:"):
                outs.setdefault(rule, set()).update(p.strip() for p in line.split(":", 1)[1].split(","))
    return outs


def test_rules_declare_the_sidecars_and_side_files_of_their_results(tmp_path):
    outs = _dry_run_outputs(tmp_path)
    run, ds = "results/toy/shapes/d2/ours/seed0", "results/toy/shapes"
    expect = {
        "train": [f"{run}/model.pt.prov.json"],
        "tokenizer_train": [f"{ds}/tokenizer/vqvae.pt.prov.json"],
        "encode": [f"{ds}/tokens/{s}_{k}.npy" for s in ("train", "val") for k in ("labels", "source")],
        "references": [f"{ds}/refs.pt.prov.json"],
        "real_features": [f"{ds}/real_features.npz.prov.json", f"{ds}/real_clean_features.npy.prov.json"],
        "mc_dropout": [f"{run}/uncertainty/mc_dropout.json.prov.json"],
        "uncertainty_sets": [f"{run}/uncertainty/sweep/sweep.json.prov.json"],
        "score_uncertainty_sets": [f"{run}/uncertainty/entanglement_scored.json.prov.json"],
    }
    for rule, files in expect.items():
        assert set(files) <= outs[rule], (rule, sorted(outs[rule]))


# ----------------------------------------------------------------------- 7 and 6: a real Snakemake run
def _workflow_config() -> dict:
    """The toy config reduced to one tiny training run (shapes/d1/ours/seed3) on the test assets' token cache."""
    cfg = default_cfg()
    cfg.update(device="cpu", precision="fp32", seeds=[3])
    cfg["uncertainty"]["run_seeds"] = [3]
    cfg["model"].update(depths=[1], width_per_depth=32, heads=2, drop_path_rate=0.1)
    cfg["train"] = dict(steps=1500, batch_size=16, lr=3e-3, warmup_steps=2, log_every=50, ckpt_every=100)
    for key in ("lambda_study", "figure4"):
        cfg["experiments"].pop(key, None)
    return cfg


TARGET = "results/toy/shapes/d1/ours/seed3"


@pytest.fixture(scope="module")
def workflow_run(assets, tmp_path_factory):  # noqa: F811
    """A workdir whose train inputs (tokenizer, token cache, references) are the test assets, and a reference model
    of its one run trained by `varup train` without interruption."""
    work = tmp_path_factory.mktemp("ctrlc")
    res = work / "results" / "toy" / "shapes"
    (res / "tokenizer").mkdir(parents=True)
    shutil.copy(assets / "vqvae.pt", res / "tokenizer" / "vqvae.pt")
    shutil.copytree(assets / "tokens", res / "tokens")
    shutil.copy(assets / "refs.pt", res / "refs.pt")
    cfg = _workflow_config()
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    s = RunSpec(**run_spec(validate(yaml.safe_load(yaml.safe_dump(cfg))), Run("shapes", 1, "ours", 3)))
    ref = work / "reference"
    subprocess.run([sys.executable, "-m", "varup", "train", "--threads", "1", "--device", "cpu", "--spec",
                    json.dumps(asdict(s)), "--tokens", str(res / "tokens"), "--tokenizer",
                    str(res / "tokenizer" / "vqvae.pt"), "--refs", str(res / "refs.pt"), "--out", str(ref / "model.pt"),
                    "--work", str(ref / "train")],
                   check=True, capture_output=True, env={**os.environ, "VARUP_NO_PROGRESS": "1"})
    return work, ref


def _snakemake_train(work: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "snakemake", f"{TARGET}/model.pt", "-s", str(REPO / "Snakefile"), "-d", str(work),
            "--configfile", str(work / "tiny.yaml"), "--cores", "1", *extra, "--allowed-rules", "train"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ctrl_c_through_snakemake_keeps_the_whole_loss_curve(workflow_run):
    """Ctrl-C (SIGINT to Snakemake's process group) after a few checkpoints: Snakemake deletes the declared
    metrics.jsonl, the live log beside the checkpoint keeps its lines, and the rerun publishes the whole curve and
    the uninterrupted run's weights."""
    work, ref = workflow_run
    run, env = work / TARGET, {**os.environ, "VARUP_NO_PROGRESS": "1"}
    live = run / "train" / "ckpt" / "metrics.jsonl"
    # --retries 0: the trainer also gets the SIGINT and exits 75; when Snakemake sees that exit before its own
    # SIGINT, the default profile's retry would resume the job (seen in CI) instead of stopping
    proc = subprocess.Popen(_snakemake_train(work, "--retries", "0"), cwd=work, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while _lines(live) < 6:  # 300 steps logged, checkpoints at 100, 200 and 300
        assert proc.poll() is None, f"snakemake ended (rc {proc.returncode}): {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < 240, "training did not log 6 lines within 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    assert not (run / "model.pt").exists() and not (run / "train" / "metrics.jsonl").exists(), out[-3000:]
    # the trainer got the SIGINT too: it checkpointed after its current step and exited 75 (Snakemake shows its log)
    assert "received SIGINT" in out and "checkpoint written; exiting with status 75" in out, out[-3000:]
    at = torch.load(run / "train" / "ckpt" / "last.pt", weights_only=True)["step"]
    kept = [json.loads(x)["step"] for x in live.read_text().splitlines()]
    assert kept[:6] == [50, 100, 150, 200, 250, 300] and 300 <= at < 1500
    r = subprocess.run(_snakemake_train(work), cwd=work, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log_text = (work / "results" / "toy" / "logs" / "train" / "shapes_d1_ours_seed3.log").read_text()
    assert f"resumed from results/toy/shapes/d1/ours/seed3/train/ckpt/last.pt at step {at}" in log_text, log_text
    steps = [row["step"] for row in curve(run / "train" / "metrics.jsonl")]
    assert steps == list(range(50, 1501, 50))
    assert curve(run / "train" / "metrics.jsonl") == curve(ref / "train" / "metrics.jsonl")
    assert same_weights(ref / "model.pt", run / "model.pt")
    assert (run / "model.pt.prov.json").exists()


def test_a_failed_rerun_leaves_no_sidecar_without_its_result(workflow_run):
    """The model's provenance is a declared output: a failing forced rerun removes it with model.pt."""
    work, _ = workflow_run
    run, refs = work / TARGET, work / "results" / "toy" / "shapes" / "refs.pt"
    if not (run / "model.pt").exists():
        pytest.skip("needs the finished run of test_ctrl_c_through_snakemake_keeps_the_whole_loss_curve")
    good = refs.read_bytes()
    refs.write_bytes(b"broken")  # the rerun fails when it loads the references
    try:
        r = subprocess.run(_snakemake_train(work, "--forcerun", "train"), cwd=work, capture_output=True, text=True,
                           timeout=300, env={**os.environ, "VARUP_NO_PROGRESS": "1"})
    finally:
        refs.write_bytes(good)
    assert r.returncode != 0, (r.stdout + r.stderr)[-3000:]
    assert not (run / "model.pt").exists() and not (run / "model.pt.prov.json").exists()


# ----------------------------------------------------------------------------------- 7: the figure
def test_training_curves_note_and_log_the_gaps_of_a_log(tmp_path, caplog, monkeypatch):
    import varup.report.figures as F

    cfg = {"datasets": {"shapes": {"kind": "toy"}}, "model": {"depths": [2]}, "methods": {"ours": {}}, "seeds": [0, 1]}
    rec = {"ce": 1.0, "l2nd": 0.01, "lse": 2.0, "gshare_2nd": 1e-3, "gshare_se": 1e-2, "pred_dispersion": 0.4,
           "ref_dispersion": 0.05, "per_scale": {"ce": [1.0, 2.0]}}
    steps = {0: range(25, 1001, 25), 1: range(425, 1001, 25)}  # seed 1 lost the first part of its log
    for seed, ss in steps.items():
        p = tmp_path / "shapes" / "d2" / "ours" / f"seed{seed}" / "train" / "metrics.jsonl"
        p.parent.mkdir(parents=True)
        p.write_text("".join(json.dumps({"step": t, **rec}) + "\n" for t in ss))
    figs = []
    monkeypatch.setattr(F, "save_figure", lambda fig, out, name: figs.append(fig))
    with caplog.at_level(logging.WARNING, logger="varup.report.figures"):
        F.training_curves_figure(cfg, tmp_path, tmp_path)
    bad = tmp_path / "shapes" / "d2" / "ours" / "seed1" / "train" / "metrics.jsonl"
    assert f"{bad} has no lines for steps 25-400" in caplog.text and "seed0" not in caplog.text
    notes = [t.get_text() for t in figs[0].texts]
    assert any("shapes/d2/ours/seed1: steps 25-400" in n for n in notes), notes
    assert F.log_gaps(range(25, 1001, 25)) == [] and F.log_gaps([25, 50, 75, 200, 225]) == [(100, 175)]


# ---------------------------------------------------------------------------------- 8: the report
def test_report_before_any_run_says_so(tmp_path):
    r = snakemake(tmp_path, "--report", "report.html", timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "nothing has been run yet" in out and "snakemake --cores 2" in out, out[-3000:]
    assert "Missing metadata" not in out and not (tmp_path / "report.html").exists()
    assert unfinished_report(["a", "b"], exists=lambda f: f == "a").startswith(
        "snakemake --report: the workflow has not finished: 1 of the report's 2 tables and figures are missing "
        "(the first: b)")
    assert unfinished_report(["a"], exists=lambda f: True) is None
