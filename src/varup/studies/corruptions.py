"""Table 3's mCE: robustness of a trained model to ImageNet-C corruptions of held-out images.

Every image of the corrupted set (:mod:`varup.data.corruptions`, tokenized by ``varup encode`` as split
``corrupt``) is scored under teacher forcing: the model predicts each scale's tokens from the (corrupted) image's
coarser scales, and

* token error E = 1 - top-1 accuracy of those next-scale predictions, over all L tokens of all images of a set
  (every token weighs the same, as in the training loss);
* NLL = the mean -log p (nats) of the true tokens over the same tokens.

:func:`run_corruption_eval` writes one run's error table; the report forms CE and mCE from the tables of a run and
its reference run (:func:`varup.report.mce.mce`).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

log = logging.getLogger("varup.studies.corruptions")

CLASS_MODES = ("label", "null")


def token_errors(var, vae, tokens, labels, *, class_mode: str = "label", batch_size: int = 64,
                 device="cpu") -> dict:
    """Teacher-forced next-scale predictions of token maps ``tokens`` (N, L) under ``var``: per image the number
    of wrong top-1 predictions ``wrong`` (N,) and the summed NLL ``nll`` (N,) in nats, over its L tokens
    (:func:`varup.studies.ood.image_nll`). ``class_mode``: 'label' conditions on ``labels`` (N,), 'null' on the
    unconditional class. No CFG."""
    from varup.studies.ood import image_nll

    if class_mode not in CLASS_MODES:
        raise ValueError(f"class_mode must be one of {CLASS_MODES}, got {class_mode!r}")
    r = image_nll(var, vae, tokens, labels, batch_size=batch_size, device=device, class_mode=class_mode)
    return {"wrong": r["wrong"], "nll": r["nll_total"], "L": int(var.L)}


def _set_rows(data_dir, n_rows: int) -> list[dict]:
    """The set index of a corrupted directory (dataset.json corruptions.sets), checked against the token rows."""
    from pathlib import Path

    from varup.base.utils import read_json

    f = Path(data_dir) / "dataset.json"
    sets = read_json(f).get("corruptions", {}).get("sets")
    if not sets:
        raise ValueError(f"{f}: no corruptions.sets: not a corrupted set written by `varup corrupt-images`")
    if sets[-1]["stop"] != n_rows:
        raise ValueError(f"{f} lists {sets[-1]['stop']} images but the token cache's split 'corrupt' has {n_rows} "
                         f"rows: re-run the encode_corrupt rule")
    return sets


def run_corruption_eval(model: str | os.PathLike, tokenizer: str | os.PathLike, tokens_dir: str | os.PathLike,
                        data_dir: str | os.PathLike, out_json: str | os.PathLike, *, class_mode: str = "label",
                        batch_size: int = 64, device: str = "cpu") -> dict:
    """One run's token error and NLL on every set of a corrupted directory (``data_dir``, split ``corrupt`` of
    ``tokens_dir``). Writes ``out_json`` atomically ({sets: [{corruption, severity, n_images, n_tokens,
    token_error, nll_per_token}], clean: {...}, class_mode, protocol}) and returns the same dict."""
    from varup.base.utils import atomic_write_json, progress, write_provenance
    from varup.models.generators import load_generator
    from varup.tokenizer.tokens import TokenCache

    t0 = time.time()
    var, vae, dev = load_generator(model, tokenizer, device)
    cache = TokenCache(tokens_dir, "corrupt")
    cache.check_made_by(vae)
    sets = _set_rows(data_dir, len(cache))
    rows = []
    for s in progress(sets, desc="corruption sets", unit="set"):
        r = token_errors(var, vae, cache.tokens[s["start"]:s["stop"]], cache.labels[s["start"]:s["stop"]],
                         class_mode=class_mode, batch_size=batch_size, device=dev)
        n_tok = r["L"] * len(r["wrong"])
        rows.append({"corruption": s["corruption"], "severity": int(s["severity"]), "n_images": len(r["wrong"]),
                     "n_tokens": n_tok, "token_error": float(r["wrong"].sum() / n_tok),
                     "nll_per_token": float(r["nll"].sum() / n_tok)})
    clean = [r for r in rows if r["severity"] == 0]
    out = {"sets": [r for r in rows if r["severity"] > 0], "clean": clean[0] if clean else None,
           "class_mode": class_mode, "model": str(model), "tokens": str(tokens_dir), "data": str(data_dir),
           "protocol": ("teacher-forced next-scale prediction of each corrupted image's token map (its own coarser "
                        "scales as context), conditioned on " + {"label": "the image's class",
                                                                 "null": "the null (unconditional) class"}[class_mode]
                        + "; token_error = 1 - top-1 accuracy and nll_per_token = mean -log p (nats), over all "
                        "tokens of the set's images; CE/mCE against the reference model are formed by the report"),
           "wall_s": round(time.time() - t0, 2)}
    atomic_write_json(out_json, out)
    write_provenance(out_json, config={"class_mode": class_mode, "model": str(model)}, device=str(dev), started=t0)
    errs = [r["token_error"] for r in out["sets"]]
    log.info("corruptions: mean token error %.4f over %d sets (clean %.4f)", float(np.mean(errs)) if errs else
             float("nan"), len(errs), out["clean"]["token_error"] if out["clean"] else float("nan"))
    return out
