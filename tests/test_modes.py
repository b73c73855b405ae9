"""Mode coverage: the attribute classifier reaches a real held-out accuracy, and the coverage / KL numbers of
constructed predictions match hand computations."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch

from varup.data.toy import generate_toy_dataset, read_manifest
from varup.modes import (attrs_to_mode, classify, kl, load_mode_classifier, mode_coverage, mode_coverage_table,
                         run_mode_coverage, train_mode_classifier, true_mode_hist)

EPS = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    generate_toy_dataset(d / "toy", n_train_per_class=64, n_val_per_class=16, progress=False)
    t0 = time.time()
    res = train_mode_classifier(d / "toy", d / "cls.pt", epochs=30, seed=0, device="cpu")
    res["wall_s"] = time.time() - t0
    print(f"mode classifier (256 train images, 30 epochs): val {res['val_accuracy']} in {res['wall_s']:.1f} s")
    return d, res


def test_global_mode_index_follows_the_toy_order():
    sizes = (4, 4, 2, 2)
    attrs = np.array(list(itertools.product(*(range(n) for n in sizes))))
    assert np.array_equal(attrs_to_mode(attrs, sizes), np.arange(64))  # product(shapes, colours, sizes, backgrounds)


def test_classifier_reaches_high_held_out_accuracy(trained):
    d, res = trained
    acc = res["val_accuracy"]
    assert res["n_train"] == 256 and res["n_val"] == 64
    assert acc["mode"] >= 0.9, acc  # all four attributes right on held-out images
    assert min(acc[a] for a in ("colour", "size", "background")) >= 0.95, acc
    obj = torch.load(d / "cls.pt", weights_only=True)
    assert set(obj) >= {"model", "config", "val_accuracy"} and obj["val_accuracy"] == acc
    model = load_mode_classifier(d / "cls.pt")
    rows = read_manifest(d / "toy", "val")
    from PIL import Image

    imgs = np.stack([np.asarray(Image.open(d / "toy" / r["path"]).convert("RGB")) for r in rows])
    pred = classify(model, imgs)
    truth = np.array([r["mode"] for r in rows])
    assert pred["mode"].shape == (64,) and pred["mode"].dtype == np.int64
    assert float((pred["mode"] == truth).mean()) == pytest.approx(acc["mode"])  # the saved model is the evaluated one
    assert np.array_equal(pred["mode"], pred["shape"] * 16 + pred["colour"] * 4 + pred["size"] * 2 + pred["background"])
    # another resolution is resized to the classifier's
    big = np.repeat(np.repeat(imgs, 2, axis=1), 2, axis=2)
    assert float((classify(model, big)["mode"] == truth).mean()) >= 0.85


def test_classifier_training_is_seeded(trained, tmp_path):
    d, res = trained
    again = train_mode_classifier(d / "toy", tmp_path / "again.pt", epochs=1, seed=1)
    twice = train_mode_classifier(d / "toy", tmp_path / "twice.pt", epochs=1, seed=1)
    a, b = (torch.load(p, weights_only=True)["model"] for p in (tmp_path / "again.pt", tmp_path / "twice.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a) and again["val_accuracy"] == twice["val_accuracy"]


def test_true_mode_histogram_is_uniform(trained):
    d, _ = trained
    h = true_mode_hist(d / "toy")
    assert h.shape == (64,) and np.allclose(h, 1 / 64)


def _smoothed(p):
    return (np.asarray(p, float) + EPS) / (1 + len(p) * EPS)


def test_mode_coverage_of_uniform_and_collapsed_generators():
    labels = np.repeat(np.arange(4), 32)  # 32 samples per class, 128 in all
    uniform = np.concatenate([c * 16 + np.tile(np.arange(16), 2) for c in range(4)])  # every mode twice
    u = mode_coverage(uniform, labels, 64, 16)
    assert u["overall"]["covered"] == 64 and u["overall"]["covered_share"] == 64
    assert u["overall"]["kl_gen_true"] == pytest.approx(0, abs=1e-12)
    assert u["overall"]["kl_true_gen"] == pytest.approx(0, abs=1e-12)
    assert u["class_error"] == 0 and all(p["covered"] == 16 for p in u["per_class"])
    assert u["overall"]["expected_covered_true"] == pytest.approx(64 * (1 - (63 / 64) ** 128))

    collapsed = labels * 16 + 3  # one mode per class
    c = mode_coverage(collapsed, labels, 64, 16)
    assert c["overall"]["covered"] == 4 and c["overall"]["covered_share"] == 4
    # by hand: generated 1/4 on 4 modes, true 1/64 everywhere (both eps-smoothed)
    g_on, g_off, t = (0.25 + EPS) / (1 + 64 * EPS), EPS / (1 + 64 * EPS), (1 / 64 + EPS) / (1 + 64 * EPS)
    kl_gt = 4 * g_on * math.log(g_on / t) + 60 * g_off * math.log(g_off / t)
    kl_tg = 4 * t * math.log(t / g_on) + 60 * t * math.log(t / g_off)
    assert c["overall"]["kl_gen_true"] == pytest.approx(kl_gt, rel=1e-9)
    assert c["overall"]["kl_true_gen"] == pytest.approx(kl_tg, rel=1e-9)
    assert kl_gt == pytest.approx(math.log(16), abs=1e-3)  # ≈ log(64/4) without smoothing
    assert kl_tg == pytest.approx(60 / 64 * math.log((1 / 64) / 1e-6) - 4 / 64 * math.log(16), abs=1e-3)
    for p in c["per_class"]:  # within a class: 1 of 16 modes, KL = log 16
        assert p["covered"] == 1 and p["class_error"] == 0
        g1, g0, t1 = (1 + EPS) / (1 + 16 * EPS), EPS / (1 + 16 * EPS), (1 / 16 + EPS) / (1 + 16 * EPS)
        assert p["kl_gen_true"] == pytest.approx(g1 * math.log(g1 / t1) + 15 * g0 * math.log(g0 / t1), rel=1e-9)
    assert c["per_class_mean"]["covered"] == 1

    # class fidelity: every class-0 sample shows shape 1 (the modes of class 1), 3 of class 1's show shape 2
    wrong = uniform.copy()
    wrong[:32] = 16 + np.tile(np.arange(16), 2)
    wrong[32:35] = 32
    w = mode_coverage(wrong, labels, 64, 16)
    assert w["class_error"] == pytest.approx(35 / 128)
    assert w["per_class"][0]["class_error"] == 1.0 and w["per_class"][1]["class_error"] == pytest.approx(3 / 32)
    # within class 0 the non-shape attributes still cover all 16 modes (modes 16..31 -> mode_in_class 0..15);
    # overall the 16 modes of class 0 are empty
    assert w["per_class"][0]["covered"] == 16 and w["overall"]["covered"] == 48


def test_share_threshold_and_custom_true_histogram():
    # 2 classes x 2 modes; true shares 0.4, 0.1, 0.25, 0.25
    true = np.array([0.4, 0.1, 0.25, 0.25])
    pred = np.array([0] * 5 + [1] * 1 + [2] * 2 + [3] * 12)  # shares .25 .05 .10 .60
    labels = np.array([0] * 6 + [1] * 14)
    r = mode_coverage(pred, labels, 4, 2, true)
    assert r["overall"]["covered"] == 4
    # >= half the true share: .25 >= .2 yes, .05 >= .05 yes, .10 >= .125 no, .60 yes
    assert r["overall"]["covered_share"] == 3
    gen = np.array([5, 1, 2, 12]) / 20
    assert r["overall"]["kl_gen_true"] == pytest.approx(kl(gen, true)) and kl(gen, true) > 0
    p, q = _smoothed(gen), _smoothed(true)
    assert r["overall"]["kl_true_gen"] == pytest.approx(float(np.sum(q * np.log(q / p))), rel=1e-12)
    # class 1 within-class: true (.5, .5), generated (2/14, 12/14)
    p1, q1 = _smoothed([2 / 14, 12 / 14]), _smoothed([0.5, 0.5])
    assert r["per_class"][1]["kl_gen_true"] == pytest.approx(float(np.sum(p1 * np.log(p1 / q1))), rel=1e-9)
    with pytest.raises(ValueError, match="probability vector"):
        mode_coverage(pred, labels, 4, 2, np.array([0.5, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="outside"):
        mode_coverage(np.array([4]), np.array([0]), 4, 2)


def test_run_mode_coverage_and_table(trained, tmp_path):
    d, _ = trained
    from PIL import Image

    rows = read_manifest(d / "toy", "val")
    imgs = np.stack([np.asarray(Image.open(d / "toy" / r["path"]).convert("RGB")) for r in rows])
    labels = np.array([r["label"] for r in rows])
    np.savez(tmp_path / "real.npz", images=imgs, labels=labels)
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(4)])  # mode_in_class 0 of each class
    np.savez(tmp_path / "collapsed.npz", images=imgs[np.repeat(first, 16)], labels=np.repeat(np.arange(4), 16))
    recs = []
    for name, method in (("real", "ours"), ("collapsed", "baseline")):
        recs.append(run_mode_coverage(d / "cls.pt", tmp_path / f"{name}.npz", d / "toy", tmp_path / f"{name}.json",
                                      meta={"dataset": "shapes", "depth": 2, "method": method, "seed": 0}))
    real, col = recs
    assert col["coverage"]["overall"]["covered"] <= 4 and col["coverage"]["per_class_mean"]["covered"] <= 1
    assert real["coverage"]["overall"]["covered"] >= 56  # 64 distinct modes, classifier >= 0.9 accurate
    assert real["reference_real"]["n"] == 64 and real["reference_real"]["classifier_accuracy"]["mode"] >= 0.9
    df, disp = mode_coverage_table(recs)
    assert list(df.method) == ["ours", "baseline", "real (val)"]
    assert df.iloc[1].covered_mean == col["coverage"]["overall"]["covered"]
    assert df.iloc[1].kl_gen_true_mean == pytest.approx(col["coverage"]["overall"]["kl_gen_true"])
    assert "modes covered" in disp.columns
