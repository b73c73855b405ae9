"""The paper configuration: the complete DAG resolves (job counts per rule), and a real run of the 256 px code
path with the official-size VQVAE architecture (random weights, fetched over file:// with a checksum)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from varup.base.utils import sha256_file
from varup.config.plan import cfg_sweep, grid_points, main_runs, ood_runs, runs
from varup.config.schema import load_config

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("VARUP_TEST_CACHE", REPO / ".cache" / "test"))


def smk(workdir: Path, cfgfile: Path, *args, timeout=2400) -> subprocess.CompletedProcess:
    env = {**os.environ, "VARUP_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--configfile", str(cfgfile), *args], capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(out: str) -> dict[str, int]:
    m = re.search(r"Job stats:\n(.*?)\n\n", out, re.S)
    assert m, out[-3000:]
    return {p[0]: int(p[1]) for line in m.group(1).splitlines()[2:] if len(p := line.split()) == 2
            and p[1].isdigit() and p[0] != "total"}


def write_images(folder: Path, n: int, size=(300, 280), seed=0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = (rng.random((size[1] // 20, size[0] // 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).resize(size, Image.Resampling.BICUBIC).save(folder / f"{i:03d}.png")


@pytest.fixture()
def paper_cfg(tmp_path) -> Path:
    """config/paper.yaml with its two REQUIRED paths pointing at fixture trees."""
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    imagenet = tmp_path / "imagenet"
    for split in ("train", "val"):
        (imagenet / split / "n02869837").mkdir(parents=True)
    cfg["datasets"]["imagenet100"]["root"] = str(imagenet)
    (tmp_path / "imagenet-o").mkdir()
    cfg["experiments"]["ood"]["source"]["root"] = str(tmp_path / "imagenet-o")
    f = tmp_path / "paper.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def test_paper_dag_resolves_completely(paper_cfg, tmp_path):
    cfg = load_config(paper_cfg)
    r = smk(tmp_path / "work", paper_cfg, "-n", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    c = job_counts(r.stdout)
    n_main = 2 * 2 * 2 * 3  # datasets x depths x methods x seeds
    n_grid = len(set(grid_points(cfg).values()) - set(cfg["methods"]))  # grid points that need their own run
    n_all = n_main + n_grid  # Figure 4's grid over decades of lambda_2nd (8 x 4 points, 2 of them configured methods)
    assert len(list(main_runs(cfg))) == n_main and len(list(runs(cfg))) == n_all == 24 + 30
    shards = {"afhq": 4, "imagenet100": 16}
    sweep = cfg_sweep(cfg)
    assert len(sweep) == 2 * 5
    expected = {
        "fetch_archive": 1, "data_afhq": 1, "data_imagenet100": 1, "fetch_weights": 1, "inception_weights": 1,
        "encode": 2, "references": 2, "real_features": 2, "train": n_all,
        "sample_shard": sum(shards[r.dataset] for r in runs(cfg)), "merge_samples": n_all, "evaluate": n_all,
        "sample_qualitative": 2 * 2 * 2, "sample_cfg_shard": 10 * shards["afhq"], "merge_cfg_samples": 10,
        "evaluate_cfg": 10, "data_ood": 1, "encode_ood": 1, "ood_eval": len(ood_runs(cfg)), "downstream": 1,
        "corrupt_data": 1, "encode_corrupt": 1, "corruption_eval": len(ood_runs(cfg)),  # Table 3's mCE
        "tables": 1, "figures": 1, "all": 1,
        # uncertainty studies: the first seed's runs of both datasets, depths and methods (no toy: no mode coverage)
        "mc_dropout": 8, "uncertainty_sets": 8, "score_uncertainty_sets": 8,
    }
    assert c == expected
    # every output of the complete DAG is in the plan: Table 2/3/5/7, Figure 4, Figures 2/3, samples
    for name in ("table2", "table3", "table7", "overhead", "figure4", "uncertainty_droppath", "uncertainty_region",
                 "uncertainty_entanglement"):
        assert f"results/paper/tables/{name}.csv" in r.stdout
    for task in ("outpaint", "inpaint", "edit"):
        assert f"results/paper/figures/downstream_afhq_d16_{task}.png" in r.stdout
    # downloads are localrules, so they run on the login node
    rules_text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    local = set(re.findall(r"localrules:\s*\n((?:\s+\w+,\n)+)", rules_text))
    local = {n.strip(" ,") for block in local for n in block.split()}
    assert {"fetch_archive", "fetch_weights", "inception_weights"} <= local


def test_prefetch_target_lists_every_download(paper_cfg, tmp_path):
    r = smk(tmp_path / "work", paper_cfg, "-n", "prefetch", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # CLIP: VAR-CLIP's text encoder and CMMD's image encoder; VAR-CLIP's released generator; the LM arm: dolly-15k,
    # Qwen1.5 and the MAUVE featurizer
    assert job_counts(r.stdout) == {"fetch_archive": 1, "fetch_weights": 1, "inception_weights": 1, "clip_weights": 2,
                                    "varclip_weights": 1, "lm_dolly": 1, "lm_weights": 2, "prefetch": 1}


def test_the_required_paths_are_checked_when_the_dag_is_built(paper_cfg, tmp_path):
    """config/paper.yaml as shipped: its REQUIRED placeholders stop a dry run, naming the key, not a queued job;
    prefetch reads neither, so it plans. A missing OOD folder or an ImageNet root without train/ is named too."""
    shipped = REPO / "config" / "paper.yaml"
    r = smk(tmp_path / "work", shipped, "-n", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "datasets.imagenet100.root: /path/to/imagenet is not an existing folder" in out, out[-3000:]
    assert "REQUIRED" in out
    r = smk(tmp_path / "work", shipped, "-n", "prefetch", timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    cfg = yaml.safe_load(paper_cfg.read_text())
    os.rmdir(cfg["experiments"]["ood"]["source"]["root"])
    r = smk(tmp_path / "work", paper_cfg, "-n", timeout=300)
    assert r.returncode != 0 and "experiments.ood.source.root:" in r.stdout + r.stderr
    (tmp_path / "imagenet-o").mkdir()
    os.rmdir(tmp_path / "imagenet" / "train" / "n02869837")
    os.rmdir(tmp_path / "imagenet" / "train")
    r = smk(tmp_path / "work", paper_cfg, "-n", timeout=300)
    assert r.returncode != 0 and "datasets.imagenet100.root: " in r.stdout + r.stderr and "has no train/" in r.stdout + r.stderr


@pytest.mark.slow
def test_256px_code_path_end_to_end(tmp_path):
    """Official-size VQVAE (random weights), tiny VAR, a handful of 256 px images, the whole DAG incl. OOD and
    out-painting; asserts on the token cache (680 tokens, V = 4096) and the tables."""
    from varup.models.vqvae import VQVAE

    work = tmp_path / "work"
    torch.manual_seed(0)
    vae = VQVAE()  # vae_ch160v4096z32 architecture
    weights = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(vae.state_dict(), weights)  # a plain state dict, like the released file
    for cls in ("a", "b"):
        write_images(tmp_path / "images" / cls, 5, seed=ord(cls))
    write_images(tmp_path / "ood", 4, size=(256, 256), seed=9)
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg.update(experiment="px256", threads=1, seeds=[0], precision="fp32", results_dir=str(work / "results"),
               resources_dir=str(tmp_path / "resources"))
    cfg["datasets"] = {"folder256": {
        "kind": "folder", "root": str(tmp_path / "images"), "resolution": 256, "num_classes": 2, "val_fraction": 0.4,
        "preprocess": {"mid_reso": 1.125, "crop": "center"}, "token_variants": [{"hflip": False}],
        "tokenizer": "official", "train": {"batch_size": 3},
        "sample": {"cfg": 1.5, "n_per_class": 3, "batch_size": 6, "shards": 2}, "metrics_real_split": "train"}}
    cfg["tokenizers"]["official"].update(url=weights.as_uri(), sha256=sha256_file(weights))
    cfg["text"]["enabled"] = False  # the text arm's dataset (afhq) is not in this config
    cfg["model"]["depths"] = [1]
    cfg["model"]["width_per_depth"] = 64
    cfg["train"].update(steps=3, warmup_steps=1, log_every=1, ckpt_every=2, nonfinite_check_every=1, gpus=1)
    cfg["sample"]["qualitative"] = {"cfg": 3.0, "n_per_class": 1}
    cfg["experiments"] = {
        "ood": {"dataset": "folder256", "source": {"kind": "folder", "root": str(tmp_path / "ood")}, "max_images": 4,
                "corruptions": {"names": ["fog"], "severities": [2], "max_images": 2}},  # mCE at 256 px, cheaply
        "downstream": {"dataset": "folder256", "depth": 1, "n_images": 1, "n_samples": 1, "tasks": ["outpaint"]}}
    cfg["uncertainty"]["enabled"] = False  # 256 px decodes are slow on CPU; the studies' code runs in test_e2e
    cfg["references"]["num_clusters"] = 8
    cfg["metrics"].update(batch_size=8, real_max_images=6, prdc_nearest_k=3, prc_neighborhood=3, kid_subsets=10,
                          clean_fid={"enabled": True, "max_images": 4}, calibration={"n_bins": 10, "max_rows": 4},
                          ssim_max_pairs_per_class=3)
    cfg["metrics"]["inception"] = {"allow_fallback": True}
    # Inception weights are shared with the other tests (fetched/converted once per machine)
    cfg["resources_dir"] = str(CACHE / "resources")
    (CACHE / "resources" / "weights").mkdir(parents=True, exist_ok=True)
    target = CACHE / "resources" / "weights" / "vae_ch160v4096z32.pth"
    if target.exists() and sha256_file(target) != cfg["tokenizers"]["official"]["sha256"]:
        target.unlink()  # a previous run's random weights
        for side in target.parent.glob("vae_ch160v4096z32.pth.*"):
            side.unlink()
    f = tmp_path / "px256.yaml"
    f.write_text(yaml.safe_dump(cfg))
    r = smk(work, f, "--cores", "2")
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    res = work / "results" / "px256"
    meta = json.loads((res / "folder256" / "tokens" / "meta.json").read_text())
    assert meta["L"] == 680 and meta["vocab_size"] == 4096 and meta["patch_nums"][-1] == 16
    tok = np.load(res / "folder256" / "tokens" / "train_tokens.npy")
    assert tok.shape == (meta["splits"]["train"]["rows"], 680) and tok.max() < 4096
    with np.load(res / "folder256" / "d1" / "ours" / "seed0" / "samples.npz") as z:
        assert z["images"].shape == (6, 256, 256, 3) and z["tokens"].shape == (6, 680)
    t2 = pd.read_csv(res / "tables" / "table2.csv")
    assert sorted(t2["method"]) == ["baseline", "ours"] and np.isfinite(t2["fid_mean"]).all()
    t3 = pd.read_csv(res / "tables" / "table3.csv")
    assert t3["auroc_percent_mean"].between(0, 100).all() and (t3["id_nll_per_token_mean"] > 0).all()
    im = np.asarray(Image.open(res / "figures" / "downstream_folder256_d1_outpaint.png"))
    assert im.shape[0] > 100 and im.std() > 5
