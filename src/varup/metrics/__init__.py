"""Evaluation metrics: Inception weights with provenance, features, FID/KID/PR/IS/PRDC/clean-FID, SSIM diversity,
codebook usage, token calibration, and FD/KID/PR in the toy mode classifier's feature space (toyfeatures).

Names are imported lazily, so ``from varup.metrics.codebook import ...`` does not load torch-fidelity.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_inception": "inception", "load_inception": "inception", "InceptionExtractor": "inception",
    "extract_features": "features", "save_features": "features", "load_features": "features",
    "fidelity_metrics": "fidelity", "clean_fid_score": "fidelity", "prdc_metrics": "fidelity",
    "mean_pairwise_ssim": "diversity",
    "codebook_stats": "codebook",
    "TokenCalibration": "calibration",
    "toy_feature_metrics": "toyfeatures", "ModeClassifierFeatures": "toyfeatures",
}
__all__ = sorted(_EXPORTS) + ["min_set_size"]


def min_set_size(prc_neighborhood: int = 3, prdc_nearest_k: int = 5) -> int:
    """Smallest generated / real set the neighbourhood metrics accept: PRDC takes the (k+1)-th nearest neighbour
    of every point among the others (k + 2 points), torch-fidelity's PR the (k+1)-th including itself."""
    return max(2, prc_neighborhood + 1, prdc_nearest_k + 2)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
