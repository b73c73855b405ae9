"""The study sets' fidelity job (rule ``score_uncertainty_sets``): FID/KID/IS of each DropPath-rate or class-mix
image set of the uncertainty study, against the real features (of the mixed classes, for a mix)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from varup.base.utils import atomic_write_json, read_json, write_provenance
from varup.metrics.fidelity import fidelity_with_settings


def score_sets(sets_json, out_json, *, real_features_path, inception_json, params: dict, device: str = "auto") -> dict:
    """Fill ``fidelity`` of every image set listed in a study's JSON (DropPath sweep rates or entanglement mixes):
    one Inception pass per set, scored against the real features — for a class mix, only the real images of the
    mixed classes."""
    from varup.base.runtime import resolve_device
    from varup.config.sizes import min_set_size
    from varup.metrics.features import extract_features, load_features
    from varup.metrics.inception import load_inception

    t0 = time.time()
    rec = read_json(sets_json)
    entries = rec.get("rates") or rec.get("mixes") or []
    info = read_json(inception_json)
    ext = load_inception(inception_json, resolve_device(device))
    real, meta = load_features(real_features_path)
    real_labels = np.asarray(meta["labels"])
    need = min_set_size(params.get("prc_neighborhood", 3), params.get("prdc_nearest_k", 5))
    for e in entries:
        ref = real
        if "mix" in e:  # against the real images of the mixed classes
            keep = np.isin(real_labels, e["mix"])
            ref = {k: (v[keep] if v is not None else None) for k, v in real.items()}
        if len(ref["pool"]) < need:  # before the Inception pass of the set
            raise ValueError(f"{sets_json}: set {e['set']!r} is scored against {len(ref['pool'])} real images of "
                             f"classes {e.get('mix')}, fewer than {need}; raise metrics/real_max_images")
        with np.load(Path(sets_json).parent / e["set"]) as z:
            images = z["images"]
        gen = extract_features(images, ext, batch_size=params.get("batch_size", 64), desc=e["set"])
        e["fidelity"] = fidelity_with_settings(gen, ref, params, info)
        e["fidelity"]["n_real"] = int(len(ref["pool"]))
    rec["inception"] = {k: info.get(k) for k in ("source", "sha256", "isc_available", "isc_unavailable_reason")}
    atomic_write_json(out_json, rec)
    write_provenance(out_json, config=params, started=t0)
    return rec
