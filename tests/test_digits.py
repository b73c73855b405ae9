"""The digits rehearsal (target `digits`, config/digits.yaml): scikit-learn's digits written as an image folder, the
digit classifier's class error, and a reduced digits DAG through the Snakefile to its table."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from tinydag import CACHE, REPO, smk
from varup.data.digits import stratified_split, to_rgb, write_digits_folder
from varup.metrics.digits import DigitClassifier, class_error, digit_features


def test_the_prepare_step_writes_every_digit_once_at_the_resolution_split_per_class(tmp_path):
    src = load_digits()
    n = np.bincount(src.target)
    rec = write_digits_folder(tmp_path / "digits", resolution=16, val_fraction=0.2)
    want_val = [int(k * 0.2 + 0.5) for k in n]  # round half up, per class
    for split, want in (("val", want_val), ("train", [int(k) - v for k, v in zip(n, want_val)])):
        got = [len(list((tmp_path / "digits" / split / str(c)).glob("*.png"))) for c in range(10)]
        assert got == want == rec["counts"][split], split
    files = {split: {p.name for p in (tmp_path / "digits" / split).rglob("*.png")} for split in ("train", "val")}
    assert not files["train"] & files["val"] and len(files["train"] | files["val"]) == len(src.target) == 1797
    # an image is its digit, each pixel a 2 x 2 block of round(v * 255 / 16), grey in all three channels
    i = 1000
    split = "val" if f"{i:04d}.png" in files["val"] else "train"
    im = np.asarray(Image.open(tmp_path / "digits" / split / str(src.target[i]) / f"{i:04d}.png"))
    assert im.shape == (16, 16, 3) and im.dtype == np.uint8
    assert (im[..., 0] == im[..., 2]).all() and (im[::2, ::2, 0] == np.rint(src.images[i] * 255 / 16)).all()
    assert (im[1::2, 1::2] == im[::2, ::2]).all()
    # seeded: the same split again; a resolution that is not a multiple of 8 is refused, naming the key
    assert (stratified_split(src.target, 0.2) == stratified_split(src.target, 0.2)).all()
    with pytest.raises(ValueError, match="resolution: 20 px.*multiple of 8"):
        to_rgb(src.images[:1], 20)


def test_class_error_of_a_known_classifier_on_known_images():
    """Ten 'digits', each one lit 8 x 8 cell; a classifier that reads the lit cell. 4 of 20 samples are lit as the
    next digit: class error 0.2, all of it in classes 0-3."""
    coef = np.zeros((10, 64))
    coef[np.arange(10), np.arange(10)] = 10.0
    clf = DigitClassifier(coef, np.zeros(10))
    labels = np.tile(np.arange(10), 2)
    lit = labels.copy()
    lit[10:14] = (labels[10:14] + 1) % 10
    cells = np.zeros((20, 8, 8))
    cells.reshape(20, 64)[np.arange(20), lit] = 16
    images = to_rgb(cells, 32)
    assert np.allclose(digit_features(images)[np.arange(20), lit], 1.0) and digit_features(images).sum() == 20
    res = class_error(clf.predict(images), labels, clf.num_classes)
    assert res["class_error"] == pytest.approx(0.2) and res["n"] == 20 and res["chance"] == pytest.approx(0.9)
    assert res["per_class_error"] == [0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert res["predicted_histogram"] == [1, 2, 2, 2, 3, 2, 2, 2, 2, 2]


def reduced_digits_config(results) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "digits.yaml").read_text())
    cfg["results_dir"] = str(results)
    cfg["resources_dir"] = str(CACHE / "resources")  # Inception weights: fetched/converted once per machine
    cfg["datasets"]["digits"]["max_per_class"] = 30  # 300 train + 300 held-out digits
    cfg["tokenizers"]["digits_vq"]["train"].update(steps=8, batch_size=8, log_every=4, ckpt_every=8,
                                                   dead_code_every=4, warmup_steps=2)
    cfg["seeds"] = [0]
    cfg["train"].update(steps=8, batch_size=8, log_every=4, ckpt_every=8, warmup_steps=2)
    cfg["sample"].update(n_per_class=2, batch_size=20)
    cfg["metrics"].update(real_max_images=20, prc_neighborhood=3, prdc_nearest_k=3, ssim_max_pairs_per_class=2)
    cfg["metrics"]["clean_fid"] = {"enabled": False}
    cfg["metrics"]["calibration"] = {"n_bins": 10, "max_rows": 20}
    return cfg


def test_a_reduced_digits_dag_builds_the_digits_table(tmp_path):
    cfgfile = tmp_path / "digits.yaml"
    cfgfile.write_text(yaml.safe_dump(reduced_digits_config(tmp_path / "results")))
    r = smk(tmp_path, cfgfile, "--cores", "2", "digits", timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    res = tmp_path / "results" / "digits"
    df = pd.read_csv(res / "tables" / "digits.csv")
    assert list(df["method"]) == ["baseline", "ours", "real vs real (floor)", "chance (uniform guess)"]
    assert (df["classifier_val_accuracy"] > 0.8).all()  # trained on the real train split, tested on held-out digits
    for col in ("class_error_mean", "fid_mean", "kid_mean", "precision_mean", "recall_mean"):
        assert all(math.isfinite(v) for v in df[col][:3]), col
    floor = json.loads((res / "digits" / "digits_floor.json").read_text())  # real digits read by the classifier
    assert floor["heldout"]["n"] == 20 and floor["heldout"]["class_error"] < 0.5 and floor["floor_set"]["n"] == 20
    assert df.set_index("method").loc["chance (uniform guess)", "class_error_mean"] == pytest.approx(0.9)
    assert 0 <= df["class_error_mean"][0] <= 1 and df["n"][0] == 1
    # the run's samples were read against their own labels: 20 of them, 2 per class
    scores = json.loads((res / "digits" / "d2" / "baseline" / "seed0" / "digit_scores.json").read_text())
    assert scores["n"] == 20 and sum(scores["predicted_histogram"]) == 20
    info = json.loads((res / "digits" / "data" / "dataset.json").read_text())
    assert info["kind"] == "folder" and info["counts"] == {"train": 300, "val": 300}
    assert "held-out accuracy" in (res / "tables" / "digits.md").read_text()


def test_a_digits_resolution_off_the_8_px_grid_stops_the_dag_naming_the_key(tmp_path):
    cfg = reduced_digits_config(tmp_path / "results")
    cfg["datasets"]["digits"]["resolution"] = 36
    cfgfile = tmp_path / "digits.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    r = smk(tmp_path, cfgfile, "-n", "digits", timeout=300)
    assert r.returncode != 0 and "datasets.digits.resolution: 36 px" in r.stdout + r.stderr, r.stderr[-3000:]
    assert "multiple of 8" in r.stdout + r.stderr
