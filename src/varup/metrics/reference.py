"""The real reference set's features, computed once per dataset (rule ``real_features``): one Inception pass over
the class-balanced real set, and clean-FID's own features of it. No tokenizer or model code: an edit of either never
re-runs this job."""
from __future__ import annotations

import time

import numpy as np

from varup.base.utils import atomic_np_save, read_json, write_provenance
from varup.data.subsets import balanced_subset, real_images


def real_features(data_dir, split: str, resolution: int, inception_json, out, *, max_images: int | None = None,
                  clean_out=None, clean_max_images: int | None = None, batch_size: int = 64,
                  device: str = "auto") -> None:
    """Inception features of (a class-balanced subset of) a real split, saved once and reused by every run; with
    ``clean_out`` also clean-fid's features of a (smaller) class-balanced subset."""
    from varup.base.runtime import resolve_device
    from varup.metrics.features import extract_features, save_features
    from varup.metrics.fidelity import clean_fid_features
    from varup.metrics.inception import load_inception

    t0 = time.time()
    dev = resolve_device(device)
    images, labels = real_images(data_dir, split, resolution, max_images)
    ext = load_inception(inception_json, dev)
    feats = extract_features(images, ext, batch_size=batch_size, desc=f"real features ({split})")
    meta = {"split": split, "n": int(len(images)), "labels": labels.tolist(), "resolution": resolution,
            "inception": read_json(inception_json), "dataset": str(data_dir)}
    save_features(out, feats, meta)
    write_provenance(out, config=meta, started=t0)
    if clean_out is not None and clean_max_images == 0:  # clean-FID disabled: an empty feature set
        atomic_np_save(clean_out, np.zeros((0, 2048)))
    elif clean_out is not None:
        keep = balanced_subset(labels, clean_max_images)
        clean = clean_fid_features(images[keep], inception_json, mode="clean", batch_size=batch_size, device=str(dev))
        atomic_np_save(clean_out, clean)
        write_provenance(clean_out, config={**meta, "labels": labels[keep].tolist(), "mode": "clean"}, started=t0)
