"""The digits rehearsal's scores (config/digits.yaml, target ``digits``): a digit classifier trained on the real
training split only, the class error of each run's samples against their conditioning labels, and the real-vs-real
floor of the Inception metrics against the held-out digits.

The digit classifier is scikit-learn's multinomial logistic regression on the 64 block means of an image's grey
level (an ``R x R`` image averaged over ``R/8 x R/8`` blocks back to the digits' native 8 x 8 grid, scaled to
[0, 1]); on a real image written by :mod:`varup.data.digits` the block mean is exactly the source digit. It is
fitted on every image of the prepared ``train`` split and tested on every ``val`` image (its held-out accuracy is
recorded and shown in the table), and saved as plain arrays (``coef``, ``intercept``) in an ``.npz``: no pickle.

* :func:`run_digit_classifier` -- once per dataset -> ``digit_classifier.npz`` + ``digit_classifier.json``;
* :func:`run_digit_scores` -- per run: the class error of its samples (chance 0.9 with 10 classes) ->
  ``digit_scores.json``;
* :func:`run_digits_floor` -- once per dataset: a class-balanced real set of the sample size from the train split,
  disjoint from the metrics' reference set (:func:`varup.metrics.toyfeatures.floor_rows`), scored by Inception
  FID/KID/precision/recall against the saved reference features like a run's samples, and the classifier's class
  error on the reference set itself (the real held-out digits) -> ``digits_floor.json``.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping

import numpy as np

from varup.base.utils import atomic_npz_save, atomic_write_json, sha256_file, write_provenance
from varup.data.digits import SOURCE_SIDE, upscale_factor
from varup.metrics.toyfeatures import inception_floor_scores

log = logging.getLogger("varup.metrics.digits")


def digit_features(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, R, R, 3) (or grey (N, R, R)), R a multiple of 8 -> float64 (N, 64): the grey level
    (channel mean) averaged over ``R/8 x R/8`` blocks, divided by 255."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4:
        x = x.mean(axis=3)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"expected square images (N, R, R[, 3]), got shape {np.shape(images)}")
    f = upscale_factor(x.shape[1], "image side")
    n = len(x)
    return x.reshape(n, SOURCE_SIDE, f, SOURCE_SIDE, f).mean(axis=(2, 4)).reshape(n, -1) / 255.0


class DigitClassifier:
    """A linear classifier over :func:`digit_features`: ``predict`` = argmax of ``features @ coef.T + intercept``."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, info: Mapping[str, Any] | None = None):
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        if self.coef.ndim != 2 or self.intercept.shape != (self.coef.shape[0],):
            raise ValueError(f"coef {self.coef.shape} and intercept {self.intercept.shape} do not fit together")
        self.info = dict(info or {})

    @property
    def num_classes(self) -> int:
        return int(self.coef.shape[0])

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.argmax(digit_features(images) @ self.coef.T + self.intercept, axis=1)

    def save(self, path) -> None:
        atomic_npz_save(path, coef=self.coef, intercept=self.intercept, info=np.array(json.dumps(self.info)))

    @classmethod
    def load(cls, path) -> "DigitClassifier":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["coef"], z["intercept"], json.loads(str(z["info"])))
        except FileNotFoundError:
            raise FileNotFoundError(f"digit classifier is missing: {path} (rule digit_classifier writes it)") from None
        except KeyError as e:
            raise ValueError(f"{path}: not a digit classifier file (missing {e}); re-run rule digit_classifier") from None


def fit_digit_classifier(images: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> DigitClassifier:
    """scikit-learn's LogisticRegression (lbfgs, multinomial, C = 1) on :func:`digit_features` of ``images``."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels)
    clf = LogisticRegression(max_iter=5000, random_state=seed).fit(digit_features(images), labels)
    if not np.array_equal(clf.classes_, np.arange(len(clf.classes_))):
        raise ValueError(f"training labels must be 0..K-1 with every class present, got classes {clf.classes_}")
    return DigitClassifier(clf.coef_, clf.intercept_, {"model": "sklearn LogisticRegression (lbfgs, C=1)",
                                                       "features": "8x8 block means of the grey level / 255"})


def class_error(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Share of ``predicted`` that differ from the conditioning ``labels``, per class too (None for a class with no
    item), the predicted-class histogram, and chance (``1 - 1/num_classes``, a uniform guess)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need equal, non-empty 1-d predictions and labels, got {predicted.shape} and {labels.shape}")
    wrong = predicted != labels
    per = [float(wrong[labels == c].mean()) if (labels == c).any() else None for c in range(num_classes)]
    return {"class_error": float(wrong.mean()), "per_class_error": per, "n": int(len(labels)),
            "predicted_histogram": np.bincount(predicted, minlength=num_classes).tolist(),
            "chance": 1.0 - 1.0 / num_classes}


def _split_images(data_dir, split: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    from varup.data.subsets import real_images

    return real_images(data_dir, split, resolution, None)


def run_digit_classifier(data_dir, out_npz, out_json, *, resolution: int, seed: int = 0) -> dict:
    """Fit the digit classifier on the whole ``train`` split of a prepared digits dataset, test it on the whole
    ``val`` split; save it (``out_npz``) and its record (``out_json``: held-out accuracy, per-class errors, sizes)."""
    t0 = time.time()
    x_tr, y_tr = _split_images(data_dir, "train", resolution)
    x_va, y_va = _split_images(data_dir, "val", resolution)
    clf = fit_digit_classifier(x_tr, y_tr, seed=seed)
    held = class_error(clf.predict(x_va), y_va, clf.num_classes)
    train_err = class_error(clf.predict(x_tr), y_tr, clf.num_classes)["class_error"]
    clf.info.update(val_accuracy=1.0 - held["class_error"], n_train=int(len(y_tr)), n_val=int(len(y_va)))
    clf.save(out_npz)
    write_provenance(out_npz, config={"resolution": resolution, "seed": seed}, seed=seed, started=t0)
    rec = {"kind": "digit_classifier", **clf.info, "train_accuracy": 1.0 - train_err, "heldout": held,
           "classifier_sha256": sha256_file(out_npz), "resolution": int(resolution), "seed": int(seed)}
    atomic_write_json(out_json, rec)
    write_provenance(out_json, config={"resolution": resolution, "seed": seed}, seed=seed, started=t0)
    log.info("digit classifier: held-out accuracy %.4f on %d val digits (train accuracy %.4f on %d)",
             rec["val_accuracy"], len(y_va), rec["train_accuracy"], len(y_tr))
    return rec


def run_digit_scores(classifier, samples_npz, out_json, *, meta: Mapping[str, Any] | None = None) -> dict:
    """One run's samples (``images``, ``labels`` of ``samples_npz``) read by the digit classifier: class error
    against the conditioning labels -> ``out_json``."""
    t0 = time.time()
    clf = DigitClassifier.load(classifier)
    with np.load(samples_npz) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    res = {"kind": "digit_scores", **dict(meta or {}), **class_error(clf.predict(images), labels, clf.num_classes),
           "classifier_val_accuracy": clf.info.get("val_accuracy"), "classifier_sha256": sha256_file(classifier),
           "samples_sha256": sha256_file(samples_npz)}
    atomic_write_json(out_json, res)
    write_provenance(out_json, config=dict(meta or {}), started=t0)
    log.info("digit class error %.4f on %d samples (chance %.2f)", res["class_error"], res["n"], res["chance"])
    return res


def run_digits_floor(classifier, data_dir, inception_json, real_features_path, out_json, *,
                     params: Mapping[str, Any], dataset: str | None = None, device: str = "cpu") -> dict:
    """The real-vs-real floor of one digits dataset (module docstring). ``params``: ``split`` and ``max_images``
    (the reference set, as rule real_features), ``floor_split``, ``n_per_class`` (a run's), ``resolution`` and the
    metric settings of :func:`varup.metrics.fidelity.fidelity_with_settings`."""
    from varup.data.subsets import load_rows
    from varup.metrics.toyfeatures import floor_rows

    t0 = time.time()
    split, res_px = params.get("split", "val"), int(params["resolution"])
    ref_rows, ref_keep, fl_rows, fl_keep = floor_rows(
        data_dir, reference_split=split, floor_split=params.get("floor_split", "train"),
        n_per_class=int(params["n_per_class"]), max_images=params.get("max_images"))
    real, real_labels = load_rows(data_dir, ref_rows, ref_keep, res_px)
    floor, _ = load_rows(data_dir, fl_rows, fl_keep, res_px)
    clf = DigitClassifier.load(classifier)
    ref = {"split": split, "n": int(len(ref_keep)), "indices": ref_keep.tolist()}
    res = {"kind": "digits_floor", "dataset": dataset,
           "inception": inception_floor_scores(floor, inception_json, real_features_path, ref, params, device),
           "heldout": class_error(clf.predict(real), real_labels, clf.num_classes),
           "floor_set": {"split": params.get("floor_split", "train"), "n": int(len(fl_keep)),
                         "n_per_class": int(params["n_per_class"]), "indices": fl_keep.tolist()},
           "reference": ref, "classifier_val_accuracy": clf.info.get("val_accuracy")}
    atomic_write_json(out_json, res)
    write_provenance(out_json, config=dict(params), started=t0)
    log.info("digits floor (%d %s vs %d %s images): FID %.2f; class error of the real reference digits %.4f",
             len(fl_keep), res["floor_set"]["split"], ref["n"], split, res["inception"]["fid"],
             res["heldout"]["class_error"])
    return res


__all__ = ["digit_features", "DigitClassifier", "fit_digit_classifier", "class_error", "run_digit_classifier",
           "run_digit_scores", "run_digits_floor"]
