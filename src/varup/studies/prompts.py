"""The companion study's prompt experiments (shared/papers/mc-dropout-var-study.md) for both generator families.

The study runs three experiments on text prompts: a DropPath sweep on one prompt ("Belgian shepherd"), semantic
entanglement with "A", "A or B", "A or B or C" prompts ("Arctic fox or teddy ..."), and prompt descriptiveness
(a simple vs a detailed caption), each with FID, IS, CMMD and the mean MC-Dropout σ. Here each runs for

* ``text``: the text-conditioned VAR (VAR-CLIP layout, :mod:`varup.models.textvar`) on the prompt's embedding;
* ``var``: the class-conditional VAR, where a prompt that names only classes ("a circle or a square") is the
  equal mix of their class embeddings (as :mod:`varup.studies.uncertainty`'s entanglement); other prompts are not
  applicable to it and are skipped (the tables show "—").

Per prompt set: ``n_images`` images (seeds as :mod:`varup.studies.uncertainty`: batch b samples with
``derive_seed(seed, 'sample', b)``), generated with DropPath on -- the sweep's sets at their rate, the entanglement
and descriptiveness sets at ``uncertainty.set_droppath_rate`` (the study's 0.05), masks drawn as
``uncertainty.droppath_masks`` says -- and σ at the set's rate, the mean over ``sigma_seeds`` of the pixel-wise std
over T MC-Dropout passes (:func:`varup.studies.uncertainty.sigma_map`), under each reading of
``uncertainty.sigma_reading`` (``mean_sigma``: dropout, ``mean_sigma_samples``: samples). Scoring (:func:`score_prompt_sets`) compares each set with the real images the prompt describes
(toy: the images whose mode the prompt allows, :func:`varup.data.captions.caption_modes`; other datasets: the
classes it names, else all) in a reference pool of the train split (:func:`prompt_reference`): FID/KID
(Inception), CMMD (:mod:`varup.metrics.cmmd`: CLIP ViT-L/14@336 on a cluster; offline the same estimator on the
toy mode classifier's penultimate features, labelled *toy-CMMD*), and on toy datasets the modes the prompt allows,
those covered, and the share of samples inside them (*in-prompt*).

Files: ``<run>/prompts/sets.json`` + one ``<set>.npz`` per set (images, tokens) + ``sigma.npz`` (σ maps);
``<run>/prompts/scores.json`` (sets.json with ``scores`` filled); ``{dataset}/prompt_reference.npz``.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from varup.base.seeding import derive_seed, make_generator
from varup.base.text import words_of
from varup.sampling.sampler import TextCondition, condition_kwargs, mc_dropout, sample

log = logging.getLogger("varup.studies.prompts")

STUDIES = ("droppath", "entanglement", "descriptiveness")
FAMILIES = ("var", "text")
STOPWORDS = {"a", "an", "the", "or", "photo", "of", "picture"}


# ------------------------------------------------------------------------------------------- prompts
def classes_named(prompt: str, class_names: Sequence[str]) -> list[int]:
    """Every class a prompt names, whatever else it says ("a photo of a brown dog with floppy ears" -> [dog])."""
    text = " " + " ".join(words_of(prompt)) + " "
    named = []
    for i, name in sorted(enumerate(class_names), key=lambda x: -len(x[1])):  # longest names first
        phrase = " " + " ".join(words_of(name.replace("_", " "))) + " "
        if phrase in text:
            named.append(i)
            text = text.replace(phrase, " ")
    return sorted(named)


def class_mix_of(prompt: str, class_names: Sequence[str]) -> list[int] | None:
    """The classes a prompt names, when it names nothing else (``"a circle or a square"`` -> [0, 1]); None when it
    names no class or also other words (a detail a class-conditional model cannot take)."""
    text = " " + " ".join(words_of(prompt)) + " "
    named, rest = [], text
    for i, name in sorted(enumerate(class_names), key=lambda x: -len(x[1])):  # longest names first
        phrase = " " + " ".join(words_of(name.replace("_", " "))) + " "
        if phrase in rest:
            named.append(i)
            rest = rest.replace(phrase, " ")
    if not named or any(w not in STOPWORDS for w in rest.split()):
        return None
    return sorted(named)


def n_concepts(prompt: str) -> int:
    """Concepts of an entanglement prompt: its ' or '-separated parts."""
    return len(re.split(r"\s+or\s+", prompt.strip()))


def prompt_sets(params: Mapping[str, Any]) -> list[dict]:
    """The study's sets: (study, prompt, DropPath rate of the set). The entanglement and descriptiveness sets are
    generated, and their σ computed, at ``set_droppath_rate`` (``uncertainty.set_droppath_rate``, the study's 0.05:
    its tables share the sweep's 0.05 row), so a prompt of the sweep at that rate is the same set."""
    fixed = float(params["set_droppath_rate"])
    sets = [{"study": "droppath", "prompt": params["droppath"]["prompt"], "rate": float(r)}
            for r in params["droppath"]["rates"]]
    sets += [{"study": "entanglement", "prompt": p, "rate": fixed, "concepts": n_concepts(p)}
             for p in params["entanglement"]]
    sets += [{"study": "descriptiveness", "prompt": p, "rate": fixed, "level": i}
             for i, p in enumerate(params["descriptiveness"])]
    names: dict[tuple, str] = {}  # one image set per distinct (prompt, rate): "a circle" serves several studies
    for s in sets:
        s["set"] = names.setdefault((s["prompt"], s["rate"]), f"set{len(names):02d}.npz")
    return sets


def condition_of(family: str, prompt: str, var, encoder=None, null: torch.Tensor | None = None,
                 class_names: Sequence[str] = ()):
    """What :func:`varup.sampling.sampler.condition_kwargs` takes for a prompt, or None when the family cannot take it."""
    if family == "text":
        with torch.no_grad():
            return TextCondition(encoder.encode([prompt])[0].float(), null)
    mix = class_mix_of(prompt, class_names)
    if mix is None:
        return None
    from varup.studies.uncertainty import entangled_weights

    return mix[0] if len(mix) == 1 else entangled_weights(var.num_classes, mix)


# ------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(var, vae, condition, n: int, *, seed: int, batch_size: int, rate: float | None, cfg: float,
             top_k: int, top_p: float, masks: str = "per_call") -> dict[str, np.ndarray]:
    """``n`` images of one condition: uint8 NHWC images and the token maps (L per image); with a ``rate``, DropPath
    on (masks drawn as ``masks`` says: :func:`varup.sampling.sampler.mc_dropout`)."""
    from varup.data.folder import to_uint8

    dev = var.lvl_1L.device
    images, tokens = [], []
    for b, s in enumerate(range(0, n, batch_size)):
        B = min(batch_size, n - s)
        ctx = (mc_dropout(var, rate, B, make_generator(derive_seed(seed, "droppath", b), dev), masks=masks)
               if rate else contextlib.nullcontext())
        with ctx:
            o = sample(var, vae, **condition_kwargs(var, condition, B), cfg=cfg, top_k=min(int(top_k), var.V),
                       top_p=top_p, generator=make_generator(derive_seed(seed, "sample", b), dev))
        images.append(to_uint8(o.images.float().cpu()))
        tokens.append(torch.cat(o.tokens, 1).cpu().numpy())
    return {"images": np.concatenate(images), "tokens": np.concatenate(tokens)}


def sigma_of(var, vae, condition, *, rate: float, T: int, seeds: Sequence[int], cfg: float, top_k: int,
             top_p: float, masks: str = "per_call", reading: str = "dropout") -> tuple[float, np.ndarray, np.ndarray]:
    """(mean σ over the sampling seeds, σ map of the first seed, its mean image) of T MC-Dropout passes under a σ
    reading (:func:`varup.studies.uncertainty.mc_passes`)."""
    from varup.studies.uncertainty import mc_passes, sigma_map

    maps = [sigma_map(mc_passes(var, vae, condition, T=T, rate=rate, seed=s, cfg=cfg, top_k=top_k, top_p=top_p,
                                masks=masks, reading=reading))
            for s in seeds]
    return float(np.mean([m[1].mean() for m in maps])), maps[0][1], maps[0][0]


def run_prompt_sets(model, tokenizer, out_dir, *, family: str, params: Mapping[str, Any], class_names: Sequence[str],
                    text_encoder_weights=None, device: str = "auto", meta: Mapping[str, Any] | None = None,
                    data_dir=None, mask_dir=None) -> dict:
    """Generate every set of the study for one run and its σ; write ``sets.json``, the sets and ``sigma.npz``.
    With ``data_dir`` (or ``mask_dir``) each set also gets region σ (:func:`add_region_sigma`)."""
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_npz_save, atomic_write_json, progress, write_provenance
    from varup.models.checkpoint import load_model, load_text_encoder
    from varup.models.vqvae import load_vqvae

    t0, dev = time.time(), resolve_device(device)
    out_dir = Path(out_dir)
    var, vae = load_model(model).to(dev).eval(), load_vqvae(tokenizer).to(dev).eval()
    encoder, null = None, None
    if family == "text":
        encoder = load_text_encoder(model, text_encoder_weights).to(dev).eval()
        null = _null_of(model, encoder)
    p = params
    entries, maps, done = [], {}, {}
    for s in progress(prompt_sets(p), desc=f"prompt sets ({family})", unit="set"):
        if s["set"] not in done:
            done[s["set"]] = _make_set(var, vae, condition_of(family, s["prompt"], var, encoder, null, class_names),
                                       s, out_dir, p, maps)
        entries.append({**s, "family": family, **done[s["set"]]})
    if data_dir is not None or mask_dir is not None:
        add_region_sigma(entries, maps, data_dir=data_dir, mask_dir=mask_dir)
    atomic_npz_save(out_dir / "sigma.npz", **maps)
    res = {"kind": "prompt_sets", **dict(meta or {}), "family": family, "sets": entries, "params": dict(p)}
    atomic_write_json(out_dir / "sets.json", res)
    write_provenance(out_dir / "sets.json", config=dict(p), device=str(dev), started=t0)
    return res


def _make_set(var, vae, cond, s: Mapping[str, Any], out_dir: Path, p: Mapping[str, Any], maps: dict) -> dict:
    """Generate and save one set, and its σ (into ``maps``); what its entries record."""
    from varup.base.utils import atomic_npz_save

    if cond is None:
        return {"applicable": False}
    from varup.studies.uncertainty import readings_of, sigma_key

    kw = dict(cfg=p["cfg"], top_k=p["top_k"], top_p=p["top_p"], masks=p["droppath_masks"])
    g = generate(var, vae, cond, p["n_images"], seed=p["seed"], batch_size=p["batch_size"], rate=s["rate"], **kw)
    atomic_npz_save(out_dir / s["set"], images=g["images"], tokens=g["tokens"])
    out: dict[str, Any] = {"applicable": True, "n_images": int(len(g["images"]))}
    for r in readings_of(p["sigma_reading"]):  # the σ maps of the first reading, the others' means
        sigma, sigma_map, mean = sigma_of(var, vae, cond, rate=s["rate"], T=p["T"], seeds=p["sigma_seeds"],
                                          reading=r, **kw)
        out[sigma_key(r)] = sigma
        if s["set"][:-4] + "_sigma" not in maps:
            maps[s["set"][:-4] + "_sigma"], maps[s["set"][:-4] + "_mean"] = sigma_map, mean
    return out


def add_region_sigma(entries: list[dict], maps: dict, *, data_dir=None, mask_dir=None) -> None:
    """Region σ of every applicable set (the study's object vs background σ), in place: ``entry['region']`` holds
    the mean σ inside / outside the object of the set's MC mean image (the first sigma seed's, saved in
    ``sigma.npz`` as ``<set>_mean``; its mask as ``<set>_mask``), or ``available: False`` and the reason. Masks:
    ``mask_dir/<set>.png`` when a folder is given (e.g. made with SAM; grey > 127 = object), else on a toy dataset
    the object segmented in the mean image (:func:`varup.studies.uncertainty.object_mask`), else none."""
    from varup.studies.uncertainty import has_object_masks, object_mask, read_mask, region_sigma

    toy, reason = has_object_masks(data_dir) if data_dir is not None else (False, "no dataset given")
    for e in entries:
        if not e.get("applicable"):
            continue
        stem = e["set"][:-4]
        sigma, mean = maps[stem + "_sigma"], maps[stem + "_mean"]
        if mask_dir is not None and (Path(mask_dir) / f"{stem}.png").is_file():
            mask, how = read_mask(Path(mask_dir) / f"{stem}.png", sigma.shape), f"mask {Path(mask_dir) / stem}.png"
        elif toy:
            mask, how = object_mask(mean), "Otsu threshold on chroma (max-min RGB) of the MC mean image"
        else:
            why = f"no mask {Path(mask_dir) / stem}.png" if mask_dir is not None else reason
            e["region"] = {"available": False, "reason": f"{why} (text.prompts.mask_dir: README, prompt study)"}
            continue
        maps[stem + "_mask"] = mask
        e["region"] = {"available": True, **region_sigma(sigma, mask), "segmentation": how}


def _null_of(model, encoder) -> torch.Tensor | None:
    """The unconditional embedding a text run was trained with: the empty caption's, or None (learned)."""
    from varup.base.checkpoint import read_checkpoint

    text = read_checkpoint(model)["text"]
    if text["null_condition"] == "learned":
        return None
    with torch.no_grad():
        return encoder.encode([""])[0].float()


# ------------------------------------------------------------------------------------------- reference
def reference_rows(manifest: Sequence[Mapping[str, Any]], info: Mapping[str, Any], per_group: int,
                   seed: int = 0) -> np.ndarray:
    """A balanced reference pool: ``per_group`` images of every mode (toy) or class (others), drawn with ``seed``."""
    key = "mode" if "modes" in info else "label"
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(manifest):
        groups.setdefault(int(r[key]), []).append(i)
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.permutation(ix)[:per_group]) for _, ix in sorted(groups.items())]
    return np.concatenate(rows).astype(np.int64)


def cmmd_features(images: np.ndarray, kind: str, *, classifier=None, clip_weights=None, device="cpu") -> np.ndarray:
    """L2-normalised CMMD features: CLIP ViT-L/14@336 image embeddings (``clip``) or the toy mode classifier's
    penultimate features (``toy``; toy-CMMD, not comparable with CLIP-CMMD)."""
    if kind == "clip":
        from varup.metrics.cmmd import ClipImageEmbedder

        return ClipImageEmbedder(clip_weights, device=device).embed(images)
    from varup.models.modeclf import load_mode_classifier

    net = load_mode_classifier(classifier).to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(device)
    with torch.no_grad():
        f = torch.cat([net.embed(x[i:i + 256]) for i in range(0, len(x), 256)]).double()
    return torch.nn.functional.normalize(f, dim=1).cpu().numpy()


def prompt_reference(data_dir, out_path, inception_json, *, per_group: int, cmmd_kind: str, classifier=None,
                     clip_weights=None, batch_size: int = 64, device: str = "auto", split: str = "train") -> dict:
    """Inception and CMMD features of a balanced pool of real images, with their labels and (toy) modes."""
    from PIL import Image

    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_npz_save, read_json, write_provenance
    from varup.data.toy import read_manifest
    from varup.metrics.features import extract_features
    from varup.metrics.inception import load_inception

    t0, dev = time.time(), resolve_device(device)
    data_dir = Path(data_dir)
    info, manifest = read_json(data_dir / "dataset.json"), read_manifest(data_dir, split)
    rows = reference_rows(manifest, info, per_group)
    images = np.stack([np.asarray(Image.open(data_dir / manifest[i]["path"]).convert("RGB")) for i in rows])
    inc = extract_features(images, load_inception(inception_json, dev), batch_size=batch_size, desc="reference")
    cm = cmmd_features(images, cmmd_kind, classifier=classifier, clip_weights=clip_weights, device=dev)
    arrays = {"rows": rows, "labels": np.array([manifest[i]["label"] for i in rows], np.int64),
              "modes": np.array([manifest[i].get("mode", -1) for i in rows], np.int64), "pool": inc["pool"],
              "cmmd": cm, "cmmd_kind": np.array(cmmd_kind)}
    if inc.get("logits_unbiased") is not None:
        arrays["logits_unbiased"] = inc["logits_unbiased"]
    atomic_npz_save(out_path, **arrays)
    write_provenance(out_path, config={"per_group": per_group, "cmmd": cmmd_kind, "split": split}, device=str(dev),
                     started=t0)
    return {"n": int(len(rows)), "cmmd": cmmd_kind}


# ------------------------------------------------------------------------------------------- scoring
def reference_mask(prompt: str, ref: Mapping[str, np.ndarray], info: Mapping[str, Any]) -> np.ndarray:
    """The reference images a prompt describes (toy: by allowed mode; else by the classes it names, also within a
    detailed caption, or all)."""
    if "modes" in info:
        from varup.data.captions import caption_modes

        return np.isin(ref["modes"], caption_modes(prompt, info))
    mix = classes_named(prompt, info["classes"])
    return np.isin(ref["labels"], mix) if mix else np.ones(len(ref["labels"]), bool)


def mode_scores(images: np.ndarray, prompt: str, info: Mapping[str, Any], classifier) -> dict:
    """Toy: the modes a prompt allows, how many the samples cover, and the share of samples inside them."""
    from varup.data.captions import caption_modes
    from varup.models.modeclf import classify, load_mode_classifier

    allowed = caption_modes(prompt, info)
    res = classify(load_mode_classifier(classifier), images)
    inside = np.isin(res["mode"], allowed)
    shapes = sorted({list(info["classes"]).index(info["modes"][m]["shape"]) for m in allowed})
    return {"modes_allowed": int(len(allowed)), "modes_covered": int(len(np.unique(res["mode"][inside]))),
            "in_prompt": float(inside.mean()), "class_in_prompt": float(np.isin(res["shape"], shapes).mean())}


def score_set(images: np.ndarray, prompt: str, ref: Mapping[str, np.ndarray], info, *, extractor, params,
              classifier=None, clip_weights=None, device="cpu") -> dict:
    """FID/KID/IS against the reference images the prompt describes, CMMD, and (toy) the mode scores."""
    from varup.config.sizes import min_set_size
    from varup.metrics.cmmd import cmmd
    from varup.metrics.features import extract_features
    from varup.metrics.fidelity import fidelity_metrics

    keep = reference_mask(prompt, ref, info)
    out: dict[str, Any] = {"n_real": int(keep.sum())}
    gen = extract_features(images, extractor, batch_size=params.get("batch_size", 64), desc=prompt[:30])
    if keep.sum() >= min_set_size(params.get("prc_neighborhood", 3), params.get("prdc_nearest_k", 5)):
        real = {"pool": ref["pool"][keep], "logits_unbiased": None}
        f = fidelity_metrics(gen, real, kid_subsets=params.get("kid_subsets", 100),
                             kid_subset_size=params.get("kid_subset_size", 1000),
                             prc_neighborhood=params.get("prc_neighborhood", 3),
                             prdc_nearest_k=params.get("prdc_nearest_k", 5))
        out.update(fid=f["fid"], kid=f["kid_mean"], isc=f.get("isc_mean"), isc_std=f.get("isc_std"))
    else:
        out["fid_unavailable"] = f"{int(keep.sum())} reference images describe this prompt"
    kind = str(ref["cmmd_kind"])
    out["cmmd"] = cmmd(cmmd_features(images, kind, classifier=classifier, clip_weights=clip_weights, device=device),
                       ref["cmmd"][keep]) if keep.any() else None
    out["cmmd_kind"] = kind
    if "modes" in info and classifier is not None:
        out.update(mode_scores(images, prompt, info, classifier))
    return out


def score_prompt_sets(sets_json, out_json, *, reference, data_dir, inception_json, params: Mapping[str, Any],
                      classifier=None, clip_weights=None, device: str = "auto") -> dict:
    """``scores.json``: ``sets.json`` with every applicable set scored (:func:`score_set`)."""
    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_write_json, progress, read_json, write_provenance
    from varup.metrics.inception import load_inception

    t0, dev = time.time(), resolve_device(device)
    rec = read_json(sets_json)
    info = read_json(Path(data_dir) / "dataset.json")
    ext = load_inception(inception_json, dev)
    with np.load(reference) as z:
        ref = {k: z[k] for k in z.files}
    done: dict[str, dict] = {}
    for e in progress(rec["sets"], desc="score prompt sets", unit="set"):
        if not e["applicable"]:
            continue
        if e["set"] not in done:
            with np.load(Path(sets_json).parent / e["set"]) as z:
                images = z["images"]
            done[e["set"]] = score_set(images, e["prompt"], ref, info, extractor=ext, params=params,
                                       classifier=classifier, clip_weights=clip_weights, device=dev)
        e["scores"] = done[e["set"]]
    atomic_write_json(out_json, rec)
    write_provenance(out_json, config=dict(params), device=str(dev), started=t0)
    return rec


__all__ = ["STUDIES", "FAMILIES", "classes_named", "class_mix_of", "n_concepts", "prompt_sets", "condition_of",
           "generate", "sigma_of", "run_prompt_sets", "add_region_sigma", "prompt_reference", "reference_rows",
           "reference_mask", "score_prompt_sets", "score_set", "mode_scores", "cmmd_features"]
