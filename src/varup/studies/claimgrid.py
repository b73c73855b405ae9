"""The claim study's per-run scores (issue 25; the summary over runs is :mod:`varup.studies.claimstudy`): one
trained run sampled over the temperature x top-p x cfg grid and, at the default setting and at each curve setting,
each of its kept snapshots; every sample set read by the mode classifier (:func:`collapse_scores`: class accuracy,
and within the requested classes rare-mode recall, modes covered, KL(true || generated)), in its feature space
(toy-precision / recall) and for memorisation (:func:`memorised_share`). Every setting and snapshot is sampled with the same sampling seed (common random
numbers), so two runs' samples differ only by their models. Its own module so that an edit of the comparison
statistics re-runs the summary, never the sampling (the code fingerprints follow imports)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

log = logging.getLogger("varup.studies.claimgrid")


def rare_modes(true_hist: np.ndarray, modes_per_class: int, rare_share: float) -> np.ndarray:
    """Boolean (n_modes,): the modes whose true share of their own class is below ``rare_share``."""
    t = np.asarray(true_hist, np.float64).reshape(-1, modes_per_class)
    within = t / np.maximum(t.sum(axis=1, keepdims=True), 1e-300)
    return ((within < rare_share) & (t > 0)).ravel()


def within_class_hist(pred_modes: np.ndarray, labels: np.ndarray, true_hist: np.ndarray,
                      modes_per_class: int) -> tuple[np.ndarray, int]:
    """The generated mode distribution read within the requested classes, and how many samples it rests on: each
    class's samples that the classifier puts in that class, their mode shares within it, the classes weighted by
    their true shares (so a class drawn worse than another does not shift the mode histogram). A sample of another
    class is a quality error (class accuracy), not a mode of that class: counting it there made rare modes look
    over-produced (rare-mode recall above 1 from a few misdrawn images)."""
    pred, labels = np.asarray(pred_modes, np.int64), np.asarray(labels, np.int64)
    t = np.asarray(true_hist, np.float64).reshape(-1, modes_per_class)
    gen, n_in = np.zeros_like(t), 0
    for c in range(len(t)):
        keep = (labels == c) & (pred // modes_per_class == c)
        if keep.any():
            gen[c] = np.bincount(pred[keep] % modes_per_class, minlength=modes_per_class) / keep.sum() * t[c].sum()
            n_in += int(keep.sum())
    return gen.ravel(), n_in


def collapse_scores(pred_modes: np.ndarray, labels: np.ndarray, true_hist: np.ndarray, modes_per_class: int,
                    rare: np.ndarray) -> dict[str, float]:
    """Mode readings of one sample set, over the samples that show their requested class
    (:func:`within_class_hist`): rare-mode recall and coverage, modes covered (of all; beside the number an i.i.d.
    draw of that many samples from the true histogram would cover), KL(true || gen) in nats (smoothed as
    :func:`varup.metrics.modes.kl`); and class accuracy over all samples."""
    from varup.metrics.modes import kl

    gen, n_in = within_class_hist(pred_modes, labels, true_hist, modes_per_class)
    true = np.asarray(true_hist, np.float64)
    labels = np.asarray(labels, np.int64)
    accuracy = float((np.asarray(pred_modes, np.int64) // modes_per_class == labels).mean()) if len(labels) else 0.0
    div = kl(true, gen) if n_in else float("inf")
    return {"rare_recall": float(gen[rare].sum() / true[rare].sum()) if rare.any() else float("nan"),
            "rare_covered": float((gen[rare] > 0).mean()) if rare.any() else float("nan"),
            "covered": float((gen > 0).sum()), "expected_covered_true": float(np.sum(1.0 - (1.0 - true) ** n_in)),
            "kl_true_gen": div, "neg_kl": -div, "class_accuracy": accuracy}


def nearest_distances(feats: torch.Tensor, bank: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance of every row of ``feats`` to its nearest row of ``bank`` (chunked: no N x M matrix of a
    whole set at once)."""
    out = [torch.cdist(feats[i:i + chunk], bank).amin(dim=1) for i in range(0, len(feats), chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def memorised_share(gen_feats: torch.Tensor, train_feats: torch.Tensor, threshold: float) -> float:
    """Share of samples whose nearest training image is closer than ``threshold``."""
    return float((nearest_distances(gen_feats, train_feats) < threshold).mean())


class Scorer:
    """What scores a sample set of the study's dataset: the mode classifier, the true mode histogram, the rare modes,
    the training features and the memorisation threshold, the real reference set of toy-precision / recall."""

    def __init__(self, classifier, data_dir, *, rare_share: float, memorisation_quantile: float,
                 metric_params: Mapping[str, Any], device: torch.device):
        from varup.base.utils import read_json
        from varup.data.modes import attribute_names, load_attribute_split, true_mode_hist
        from varup.metrics.toyfeatures import toy_reference
        from varup.models.modeclf import load_mode_classifier

        data_dir = Path(data_dir)
        info = read_json(data_dir / "dataset.json")
        self.classifier_path, self.device, self.params = classifier, device, dict(metric_params)
        self.model = load_mode_classifier(classifier).to(device)
        self.per_class = len(info["modes"]) // len(info["classes"])
        self.true = true_mode_hist(data_dir, "train")
        self.rare = rare_modes(self.true, self.per_class, rare_share)
        names = attribute_names(info)
        self.train_feats = self.embed(load_attribute_split(data_dir, "train", names)[0])
        val_nn = nearest_distances(self.embed(load_attribute_split(data_dir, "val", names)[0]), self.train_feats)
        self.threshold = float(np.quantile(val_nn, memorisation_quantile))
        self.real = toy_reference(data_dir, self.params)[0]

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        from varup.models.modeclf import images_to_tensor

        x = images_to_tensor(images)
        return torch.cat([self.model.embed(x[i:i + 256].to(self.device)).float().cpu() for i in range(0, len(x), 256)])

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from varup.metrics.toyfeatures import toy_feature_metrics
        from varup.models.modeclf import classify

        pred = classify(self.model, images)["mode"]
        out = collapse_scores(pred, labels, self.true, self.per_class, self.rare)
        toy = toy_feature_metrics(images, self.real, self.classifier_path, device=str(self.device),
                                  kid_subsets=self.params["kid_subsets"], kid_subset_size=self.params["kid_subset_size"],
                                  prc_neighborhood=self.params["prc_neighborhood"])
        out.update(precision=toy["precision"], recall=toy["recall"], fd=toy["fd"],
                   memorised=memorised_share(self.embed(images), self.train_feats, self.threshold))
        return out

    def describe(self) -> dict[str, Any]:
        return {"n_modes": int(len(self.true)), "n_rare": int(self.rare.sum()),
                "rare_true_share": float(self.true[self.rare].sum()), "memorisation_threshold": self.threshold,
                "n_train": int(len(self.train_feats)), "n_real": int(len(self.real))}


def _sample(var, vae, setting: Mapping[str, float], s: Mapping[str, Any], device) -> dict:
    from varup.sampling.sampler import sample_shard

    return sample_shard(var, vae, n_per_class=s["n_per_class"], batch_size=s["batch_size"], seed=s["seed"],
                        cfg=setting["cfg"], top_k=s["top_k"], top_p=setting["top_p"],
                        temperature=setting["temperature"], device=device, desc=describe_setting(setting))


def describe_setting(setting: Mapping[str, float]) -> str:
    return f"T {setting['temperature']:g} top-p {setting['top_p']:g} cfg {setting['cfg']:g}"


def _scored(var, vae, scorer: Scorer, setting: Mapping[str, float], s: Mapping[str, Any], device) -> dict:
    out = _sample(var, vae, setting, s, device)
    return {**setting, **scorer(out["images"], out["labels"])}


def is_setting(point: Mapping[str, Any], setting: Mapping[str, float]) -> bool:
    """Whether a scored point was sampled at ``setting`` (every key of it)."""
    return all(point.get(k) == v for k, v in setting.items())


def curve_point(step: int, setting: Mapping[str, float], scores: Mapping[str, Any],
                default: Mapping[str, float]) -> dict:
    """One row of a run's curve over training: the step, the setting's label and whether it is the default."""
    return {"step": int(step), **scores, "setting": describe_setting(setting), "default": is_setting(setting, default)}


def run_claim_grid(model, tokenizer, classifier, data_dir, out_json, *, settings: Sequence[Mapping[str, float]],
                   default: Mapping[str, float], snapshots: Sequence[tuple[int, str]], sampling: Mapping[str, Any],
                   rare_share: float, memorisation_quantile: float, metric_params: Mapping[str, Any],
                   curve_settings: Sequence[Mapping[str, float]] = (), device: str = "auto",
                   meta: Mapping[str, Any] | None = None) -> dict:
    """One run of the study: its final model over the grid ``settings`` and each kept snapshot ``(step, path)`` at
    the ``default`` setting and at each of ``curve_settings`` (each setting: temperature, top_p, cfg; each a point
    of the grid, which gives the final model's rows). ``sampling``: n_per_class, batch_size, seed, top_k. Writes
    ``out_json``."""
    from varup.base.utils import atomic_write_json, write_provenance
    from varup.models.checkpoint import load_model
    from varup.models.generators import load_generator

    t0 = time.time()
    var, vae, dev = load_generator(model, tokenizer, device)
    scorer = Scorer(classifier, data_dir, rare_share=rare_share, memorisation_quantile=memorisation_quantile,
                    metric_params=metric_params, device=dev)
    grid = [_scored(var, vae, scorer, st, sampling, dev) for st in settings]
    along = [dict(default), *(c for c in curve_settings if c != default)]
    curve = []
    for step, p in snapshots:
        snap = load_model(p).to(dev).eval()
        curve += [curve_point(step, st, _scored(snap, vae, scorer, st, sampling, dev), default) for st in along]
    last = int(var_steps(model))
    curve += [curve_point(last, st, next(g for g in grid if is_setting(g, st)), default) for st in along]
    res = {"kind": "claim_grid", **dict(meta or {}), "grid": grid, "curve": curve, "default": dict(default),
           "curve_settings": along,
           "scorer": scorer.describe(), "sampling": dict(sampling)}
    atomic_write_json(out_json, res)
    write_provenance(out_json, config={"settings": list(settings), "sampling": dict(sampling)}, started=t0)
    log.info("claim grid: %d settings, %d snapshots x %d settings in %.0f s", len(grid), len(snapshots), len(along),
             time.time() - t0)
    return res


def var_steps(model) -> int:
    """The training steps a model file was trained for (its recorded run specification)."""
    from varup.base.checkpoint import read_checkpoint

    return int(read_checkpoint(model, "cpu")["run"]["optim"]["steps"])


__all__ = ["rare_modes", "within_class_hist", "collapse_scores", "nearest_distances", "memorised_share", "Scorer",
           "describe_setting", "is_setting", "curve_point", "run_claim_grid", "var_steps"]
