"""Mode coverage: the attribute classifier reaches a real held-out accuracy, and the coverage / KL numbers of
constructed predictions match hand computations."""
from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
import torch

from varup.data.modes import train_mode_classifier, true_mode_hist
from varup.data.toy import generate_toy_dataset, read_manifest
from varup.metrics.modes import kl, mode_coverage, run_mode_coverage
from varup.models.modeclf import attrs_to_mode, classify, load_mode_classifier
from varup.report.modes import mode_coverage_table

EPS = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    # one record per row (one seed each, one real reference): n = 1, no ± anywhere, no std in the CSV
    assert disp["n"].tolist() == [1, 1, 1] and not disp.astype(str).apply(lambda c: c.str.contains("±")).any().any()
    assert df["covered_std"].isna().all()


# ------------------------------------------------------------------------------ toy-feature metrics (torch-fidelity)
def _val_images(d):
    from PIL import Image

    rows = read_manifest(d / "toy", "val")
    return (np.stack([np.asarray(Image.open(d / "toy" / r["path"]).convert("RGB")) for r in rows]),
            np.array([r["label"] for r in rows]))


def test_toy_extractor_features_are_the_classifiers_own_penultimate_layer(trained):
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    from varup.metrics.toyfeatures import FEATURE_EXTRACTOR, FEATURE_LAYER, UInt8Images

    d, _ = trained
    imgs, _ = _val_images(d)
    fe = create_feature_extractor(FEATURE_EXTRACTOR, [FEATURE_LAYER], cuda=False,
                                  feature_extractor_weights_path=str(d / "cls.pt"), verbose=False)

    def extracted(batch_size):
        return get_featuresdict_from_dataset(UInt8Images(imgs), fe, batch_size=batch_size, cuda=False,
                                             save_cpu_ram=True, verbose=False)[FEATURE_LAYER]

    model = load_mode_classifier(d / "cls.pt")
    with torch.no_grad():
        own = model.embed(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().float())
        logits = [head(own) for head in model.heads]  # the classifier's forward = heads(embed)
    feats = extracted(64)
    assert feats.shape == (64, model.feature_dim) == (64, 128) and feats.dtype == torch.float64
    assert torch.equal(feats, own.double())  # one batch, same memory layout: bit for bit
    torch.testing.assert_close(extracted(7), own.double(), rtol=1e-5, atol=1e-5)  # other batch shapes: float32 ulps
    pred = np.stack([lg.argmax(1).numpy() for lg in logits], 1)
    assert np.array_equal(attrs_to_mode(pred, model.sizes), classify(model, imgs)["mode"])


def test_toy_fd_kid_pr_through_calculate_metrics(trained, monkeypatch):
    import torch_fidelity.metrics as tfm
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from varup.metrics.toyfeatures import toy_feature_metrics

    d, _ = trained
    imgs, labels = _val_images(d)
    calls = []
    real_calc = tfm.calculate_metrics_one_feature_extractor
    monkeypatch.setattr(tfm, "calculate_metrics_one_feature_extractor",
                        lambda **kw: calls.append(kw["feature_extractor"]) or real_calc(**kw))
    same = toy_feature_metrics(imgs, imgs, d / "cls.pt", kid_subset_size=32)
    assert calls == ["varup-mode-classifier"]  # torch-fidelity's own path, with our extractor
    assert abs(same["fd"]) < 1e-4 and same["precision"] == same["recall"] == 1.0
    a, b = imgs[labels == 0], imgs[labels == 1]  # circles vs squares
    diff = toy_feature_metrics(a, b, d / "cls.pt", kid_subset_size=16)
    assert diff["fd"] > 10.0 and diff["kid_subset_size"] == 16
    # KID's unbiased estimator is not 0 for a set against ITSELF (k(x, x) enters the cross term), but small beside
    # that of different sets (the poly kernel is unnormalised: these features have norms ~25)
    assert diff["kid_mean"] > 5 * abs(same["kid_mean"])
    assert diff["n_gen"] == diff["n_real"] == 16
    # the FD is the Fréchet distance of the classifier's own penultimate features
    model = load_mode_classifier(d / "cls.pt")
    with torch.no_grad():
        fa, fb = (model.embed(torch.from_numpy(x).permute(0, 3, 1, 2).float()).double() for x in (a, b))
    want = fid_statistics_to_metric(fid_features_to_statistics(fa), fid_features_to_statistics(fb), False)
    assert diff["fd"] == pytest.approx(float(want["frechet_inception_distance"]), rel=1e-6)
    with pytest.raises(ValueError, match="at least 4"):
        toy_feature_metrics(a[:3], b, d / "cls.pt")


def test_toy_floor_sets_are_disjoint_from_the_reference(trained, tmp_path):
    from varup.data.subsets import real_subset
    from varup.metrics.toyfeatures import floor_rows, run_toy_floor, run_toy_metrics

    d, _ = trained
    for floor_split in ("val", "train"):  # the same split as the reference, then another one
        ref_rows, ref_idx, fl_rows, fl_idx = floor_rows(d / "toy", reference_split="val", floor_split=floor_split,
                                                        n_per_class=4, max_images=32)
        assert np.array_equal(ref_idx, real_subset(d / "toy", "val", 32)[1])  # the metrics' reference set
        assert len(fl_idx) == 16 and np.bincount([fl_rows[i]["label"] for i in fl_idx]).tolist() == [4] * 4
        if floor_split == "val":
            assert not set(fl_idx.tolist()) & set(ref_idx.tolist())
        assert not {fl_rows[i]["path"] for i in fl_idx} & {ref_rows[i]["path"] for i in ref_idx}
    with pytest.raises(ValueError, match="fewer than the 9"):  # 16 val images per class, 8 taken by the reference
        floor_rows(d / "toy", reference_split="val", floor_split="val", n_per_class=9, max_images=32)

    params = {"split": "val", "max_images": 32, "resolution": 32, "floor_split": "val", "n_per_class": 4,
              "kid_subset_size": 16}
    f = run_toy_floor(d / "cls.pt", d / "toy", tmp_path / "floor.json", params=params, dataset="shapes")
    assert not set(f["floor_set"]["indices"]) & set(f["reference"]["indices"])
    assert f["floor_set"]["n"] == 16 and f["reference"]["n"] == 32 and f["inception"] is None
    assert f["feature_space"]["dim"] == 128 and f["toy"]["fd"] >= 0
    imgs, labels = _val_images(d)
    np.savez(tmp_path / "samples.npz", images=imgs[labels == 0][:16], labels=np.zeros(16, int))
    r = run_toy_metrics(d / "cls.pt", tmp_path / "samples.npz", d / "toy", tmp_path / "run.json", params=params,
                        meta={"dataset": "shapes", "depth": 2, "method": "ours", "seed": 0})
    assert r["toy"]["n_gen"] == 16 and r["reference"] == {k: f["reference"][k] for k in ("split", "n", "indices")}
    assert r["feature_space"] == f["feature_space"] and json.loads((tmp_path / "run.json").read_text())["seed"] == 0


def test_tokenizer_ceiling_scores_the_floor_sets_reconstructions(trained, tmp_path):
    """The ceiling row is the floor set passed through the tokenizer and scored like samples: computed directly here;
    an untrained tokenizer (its decoder outputs a near-constant image) is far from the floor."""
    from helpers import tiny_vqvae
    from varup.data.subsets import load_rows
    from varup.metrics.toyfeatures import floor_rows, run_toy_floor, toy_feature_metrics
    from varup.tokenizer.gate import reconstruct_uint8

    d, _ = trained
    torch.manual_seed(0)
    vae = tiny_vqvae(patch_nums=(1, 2, 4, 8))  # 32 px
    torch.save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, tmp_path / "vqvae.pt")
    params = {"split": "val", "max_images": 32, "resolution": 32, "floor_split": "train", "n_per_class": 4,
              "kid_subset_size": 16}
    f = run_toy_floor(d / "cls.pt", d / "toy", tmp_path / "floor.json", params=params, dataset="shapes",
                      tokenizer=tmp_path / "vqvae.pt")
    rec = f["reconstruction"]
    assert rec["n"] == 16 and rec["tokenizer"] == str(tmp_path / "vqvae.pt")
    ref_rows, ref_keep, fl_rows, fl_keep = floor_rows(d / "toy", reference_split="val", floor_split="train",
                                                      n_per_class=4, max_images=32)
    real, _ = load_rows(d / "toy", ref_rows, ref_keep, 32)
    floor, _ = load_rows(d / "toy", fl_rows, fl_keep, 32)
    x = torch.from_numpy(floor).permute(0, 3, 1, 2).float() / 127.5 - 1
    want = toy_feature_metrics(reconstruct_uint8(vae.eval(), x), real, d / "cls.pt", kid_subset_size=16)
    assert rec["toy"]["fd"] == pytest.approx(want["fd"], rel=1e-6)
    assert rec["toy"]["fd"] > 2 * f["toy"]["fd"] and rec["toy"]["recall"] < f["toy"]["recall"]
    assert json.loads((tmp_path / "floor.json").read_text())["reconstruction"]["toy"]["fd"] == rec["toy"]["fd"]
    without = run_toy_floor(d / "cls.pt", d / "toy", tmp_path / "floor2.json", params=params, dataset="shapes")
    assert without["reconstruction"] is None and without["toy"] == f["toy"]
