"""The evaluate stage: every metric of one run, written to ``metrics.json``.

One Inception pass over the run's samples feeds FID, KID, precision/recall, Inception Score (when the genuine
weights are available) and PRDC; the real set's features are computed once per dataset (:func:`real_features`).
clean-FID needs its own pass (PIL bicubic resize) and runs on at most ``clean_fid.max_images`` images.
Tokens give codebook utilisation (real vs generated) and, with the model, token calibration on held-out maps.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from varup.base.utils import atomic_write_json, read_json, sha256_file, write_provenance
from varup.data.subsets import balanced_subset
from varup.metrics.fidelity import fidelity_with_settings

log = logging.getLogger("varup.evaluate")

UINT8_PROTOCOL = "round(x*255+0.5) clamp [0,255] (official demo truncates)"


@torch.no_grad()
def token_calibration(model, vae, cache, max_rows: int, n_bins: int, device: torch.device, batch_size: int = 64) -> dict:
    """ECE / NLL of the teacher-forced next-scale predictions on held-out token maps (class-conditional, no CFG)."""
    from varup.metrics.calibration import TokenCalibration
    from varup.models.vqvae import split_tokens

    cal = TokenCalibration(n_bins=n_bins)
    keep = balanced_subset(cache.labels, max_rows)
    sid = model.lvl_1L[0].to(device)
    for a in range(0, len(keep), batch_size):
        idx = keep[a:a + batch_size]
        tok = torch.from_numpy(np.asarray(cache.tokens[idx]).astype(np.int64)).to(device)
        lab = torch.from_numpy(cache.labels[idx].astype(np.int64)).to(device)
        x = vae.quantize.idxBl_to_var_input(split_tokens(tok, vae.patch_nums))
        logits = model(lab, x)
        B, L, V = logits.shape
        cal.update(logits.reshape(-1, V), tok.reshape(-1), sid.repeat(B))
    out = cal.compute()
    out["rows"] = int(len(keep))
    return out


def evaluate_run(*, samples, real_features_path, inception_json, model, tokenizer, tokens, params: dict, out,
                 real_clean_features_path=None, device: str = "auto") -> dict:
    from varup.base.runtime import resolve_device
    from varup.metrics.codebook import codebook_stats
    from varup.metrics.diversity import mean_pairwise_ssim
    from varup.metrics.features import extract_features, load_features
    from varup.metrics.fidelity import clean_fid_features, clean_fid_from_features
    from varup.metrics.inception import load_inception
    from varup.models.checkpoint import load_model
    from varup.models.vqvae import load_vqvae
    from varup.tokenizer.tokens import TokenCache

    t0 = time.time()
    dev = resolve_device(device)
    info = read_json(inception_json)
    with np.load(samples) as z:
        images, labels, gen_tokens = z["images"], z["labels"], z["tokens"]
        sample_params = str(z["params"]) if "params" in z.files else None
    log.info("evaluating %d samples from %s", len(images), samples)

    # fidelity: one Inception pass over the samples
    ext = load_inception(inception_json, dev)
    gen = extract_features(images, ext, batch_size=params.get("batch_size", 64), desc="sample features")
    real, real_meta = load_features(real_features_path)
    fid = fidelity_with_settings(gen, real, params, info)

    res: dict = {"n_samples": int(len(images)), "fidelity": fid,
                 "inception": {k: info.get(k) for k in ("source", "sha256", "isc_available", "isc_unavailable_reason",
                                                        "fallback_reason")},
                 "protocol": {"uint8": UINT8_PROTOCOL, "sample_params": sample_params,
                              "real_split": real_meta.get("split"), "n_real": real_meta.get("n"),
                              "feature_extractor": "torch-fidelity inception-v3-compat (2048-d pool)"}}

    cf = params.get("clean_fid", {})
    if cf.get("enabled", True) and real_clean_features_path:
        gi = balanced_subset(labels, int(cf.get("max_images", 10000)))
        g_clean = clean_fid_features(images[gi], inception_json, mode="clean", device=str(dev))
        r_clean = np.load(real_clean_features_path)
        res["clean_fid"] = {"value": clean_fid_from_features(g_clean, r_clean), "n_gen": int(len(gi)),
                            "n_real": int(len(r_clean)), "mode": "clean"}
    else:
        res["clean_fid"] = {"value": None, "reason": "disabled (metrics.clean_fid.enabled = false)"}

    res["ssim"] = mean_pairwise_ssim(images, labels, max_pairs_per_class=params.get("ssim_max_pairs_per_class", 500))

    vae = load_vqvae(tokenizer).to(dev)
    val = TokenCache(tokens, "val")
    real_rows = balanced_subset(val.labels, len(gen_tokens))  # the same number of images: usage grows with n
    res["codebook"] = {
        "generated": codebook_stats(np.asarray(gen_tokens), vae.patch_nums, vae.V),
        "real": codebook_stats(np.asarray(val.tokens[real_rows]), vae.patch_nums, vae.V),
    }
    var = load_model(model).to(dev)
    cal = params.get("calibration", {})
    res["calibration"] = token_calibration(var, vae, val, cal.get("max_rows", 1000), cal.get("n_bins", 15), dev)
    res["wall_s"] = round(time.time() - t0, 2)
    atomic_write_json(out, res)
    write_provenance(out, config=params, device=str(dev), started=t0, samples_sha256=sha256_file(samples))
    log.info("FID %.3f KID %.4f P %.3f R %.3f clean-FID %s SSIM %.3f", fid["fid"], fid["kid_mean"], fid["precision"],
             fid["recall"], res["clean_fid"]["value"], res["ssim"]["mean"])
    return res


