"""``python -m varup <stage> ...`` — the command line the Snakemake rules call (one stage per command).

Every command takes ``--log FILE`` (appended; progress bars go to stderr) and ``--threads N``. Structured
settings arrive as JSON strings (``--params``), already validated against src/varup/config/schema.yaml by the Snakefile.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("varup.cli")


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}: {s[:200]}") from None


def _settings(section: str, key: str, plan_keys: dict[str, str] | None = None):
    """An argparse type: a JSON argument checked by the rules of its config section (``section``: a ``$defs`` name
    or a section's path in src/varup/config/schema.yaml; :func:`varup.config.schema.check_settings`), so a
    hand-written command is refused at once, naming the key, where a config with that value would be."""
    def parse(s: str):
        from varup.config.errors import ConfigError
        from varup.config.schema import check_settings

        try:
            return check_settings(_json(s), section, key, plan_keys)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = f"{key} JSON"
    return parse


#: keys the plan adds to lm.train / lm.base.train for one job (varup.config.lmplan.lm_run_spec, pretrain_spec)
RUN_SEED = {"seed": "seed"}
SFT_PLAN_KEYS = {"seed": "seed", "loss": "loss"}


# ---------------------------------------------------------------------------------------- data
def cmd_data_toy(a) -> None:
    from varup.data.toy import generate_toy_dataset

    p = dict(a.params)
    meta = generate_toy_dataset(a.out, resolution=a.resolution, **p)
    log.info("toy dataset: %s images in %s", meta["counts"], a.out)


def cmd_fetch(a) -> None:
    from varup.base.checkpoint import read_checkpoint
    from varup.base.download import fetch_file

    def validate(path):  # an HTML error page or a truncated file must not be trusted on first use
        read_checkpoint(path)

    r = fetch_file(a.url, a.out, a.sha256 or None, config_key=a.key, validate=validate)
    log.info("fetched %s (sha256 %s, %s)", r["path"], r["sha256"], "pinned" if r["pinned"] else "trusted on first use")


def cmd_fetch_archive(a) -> None:
    from varup.base.utils import atomic_write_json
    from varup.data.prepare import fetch_archive

    r = fetch_archive(a.url, Path(a.out).parent, sha256=a.sha256 or None, name=a.name, config_key=a.key)
    atomic_write_json(a.out, {"url": a.url, **{k: str(v) if isinstance(v, Path) else v for k, v in r.items()}})


def cmd_prepare(a) -> None:
    from varup.data import prepare as P

    if a.kind == "afhq":
        src = json.loads(Path(a.source).read_text())  # the fetch_archive record
        P.prepare_afhq(src["extracted_dir"], a.out, resolution=a.resolution, verify=a.verify,
                       source={"url": src.get("url"), "archive_sha256": src.get("sha256")})
    elif a.kind == "imagenet100":
        P.prepare_imagenet100(a.source, a.out, resolution=a.resolution, verify=a.verify, max_per_class=a.max_per_class)
    else:
        P.prepare_folder(a.source, a.out, resolution=a.resolution, val_fraction=a.val_fraction, verify=a.verify)


def cmd_prepare_ood(a) -> None:
    from varup.data.prepare import prepare_ood

    prepare_ood(a.source, a.out, resolution=a.resolution)


def cmd_corrupt_images(a) -> None:
    from varup.data.corruptions import write_corrupted_set

    p = dict(a.params)
    write_corrupted_set(a.data, a.out, resolution=a.resolution, names=p["names"], severities=p["severities"],
                        max_images=p["max_images"], seed=p["seed"], mid_reso=dict(a.preprocess).get("mid_reso", 1.0),
                        split=a.split, workers=a.workers)


# ------------------------------------------------------------------------------------ tokenizer
def cmd_tokenizer_train(a) -> None:
    import torch

    from varup.data.folder import open_split
    from varup.tokenizer.train import train_tokenizer

    ds = open_split(a.data, "train", a.resolution, a.preprocess)
    val = open_split(a.data, "val", a.resolution, a.preprocess)

    def get_batch(idx):
        return torch.stack([ds[int(i)][0] for i in idx])

    n_val = min(len(val), 256)
    val_images = torch.stack([val[i][0] for i in range(n_val)])
    s = train_tokenizer(a.vqvae, a.train, get_batch, len(ds), out_model=a.out, work_dir=a.work, device=a.device,
                        val_images=val_images, stop_before_limit_s=a.stop_before_limit_s)
    log.info("tokenizer done: %s", {k: v for k, v in s.items() if k != "config"})


def cmd_tokenizer_gate(a) -> None:
    from varup.tokenizer.gate import run_tokenizer_gate

    run_tokenizer_gate(a.tokenizer, a.classifier, a.data, a.out, resolution=a.resolution, preprocess=a.preprocess,
                       split=a.split, max_class_error=a.max_class_error, config_key=a.key, device=a.device)


def cmd_encode(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.base.utils import sha256_file
    from varup.data.folder import open_split
    from varup.models.vqvae import load_vqvae
    from varup.tokenizer.tokens import encode_dataset, write_meta

    dev = resolve_device(a.device)
    vae = load_vqvae(a.tokenizer)
    splits, class_names = {}, None
    for spec in a.splits:
        source, split = spec.split(":", 1) if ":" in spec else (spec, spec)  # e.g. val:ood stores val as 'ood'
        # each image is decoded once (by --workers processes) and its variants (the mirror) made from that tensor;
        # a dataset opened with hflip=True would flip at random (p = 0.5), not mirror every image
        data = open_split(a.data, source, a.resolution, a.preprocess)
        class_names = data.class_names
        splits[split] = encode_dataset(vae, data, a.out, split, variants=a.variants if split == "train" else [{}],
                                       batch_size=a.batch_size, device=dev, num_workers=a.workers)
    info = json.loads((Path(a.data) / "dataset.json").read_text())
    write_meta(a.out, vae, splits, class_names, tokenizer_sha256=sha256_file(a.tokenizer), source=str(a.data),
               imagenet1k_index=info.get("imagenet1k_index"))


def cmd_references(a) -> None:
    import numpy as np
    import torch

    from varup.base.utils import atomic_torch_save, atomic_write_json, write_provenance
    from varup.models.vqvae import load_vqvae
    from varup.tokenizer.tokens import TokenCache
    from varup.training.references import build_references, reference_stats

    t0 = time.time()
    vae = load_vqvae(a.tokenizer)
    cache = TokenCache(a.tokens, "train")
    tokens = torch.from_numpy(np.asarray(cache.tokens).astype(np.int64))
    refs = build_references(vae.quantize.embedding.weight.detach(), tokens, vae.patch_nums,
                            num_clusters=a.num_clusters, cluster_seed=a.seed, tau=a.tau, support_k=a.support_k)
    atomic_torch_save(refs, a.out)
    stats = reference_stats(refs)
    if a.stats:
        atomic_write_json(a.stats, stats)
    write_provenance(a.out, config=vars_json(a), seed=a.seed, started=t0, tau=float(refs["tau"]),
                     dataset_s_star=refs["dataset_s_star"].tolist(),
                     semantic_s_star_mean=float(refs["semantic_s_star"].mean()))
    for name in ("semantic", "semantic_k"):
        st = stats[name]
        log.info("references: %s tau %.4g, s* median %.4g (q10 %.4g, q90 %.4g), effective support median %.1f of %d "
                 "codes", name, st["tau"], st["s_star"]["median"], st["s_star"]["q10"], st["s_star"]["q90"],
                 st["effective_support"]["median"], stats["vocab_size"])
    log.info("references: dataset s* per scale %s", [round(x, 4) for x in refs["dataset_s_star"].tolist()])


# ---------------------------------------------------------------------------------------- train
def cmd_train(a) -> None:
    from varup.training.loop import RunSpec, train

    spec = RunSpec(**a.spec)
    train(spec, tokens_dir=a.tokens, tokenizer=a.tokenizer, references=a.refs, out_model=a.out, work_dir=a.work,
          device=a.device, warm_start_path=a.warm_start, stop_before_limit_s=a.stop_before_limit_s,
          captions=a.captions, text_encoder_weights=a.text_encoder_weights)


# --------------------------------------------------------------------------------------- text arm + prompts
def cmd_captions(a) -> None:
    from varup.data.captions import build_caption_table

    meta = build_caption_table(a.data, a.out, a.spec, split=a.split)
    log.info("caption table: %d captions for %d images (%s)", len(meta["captions"]), meta["n_images"], meta["source"])


def cmd_clip_weights(a) -> None:
    from varup.models.clip import fetch_clip_weights

    path = fetch_clip_weights(a.name, a.out_dir, url=a.url, sha256=a.sha256)
    log.info("CLIP weights %s: %s", a.name, path)


def cmd_varclip_weights(a) -> None:
    from varup.models.textvar import fetch_varclip

    r = fetch_varclip(a.url, a.out, a.sha256 or None)
    log.info("VAR-CLIP released checkpoint %s (sha256 %s, %s)", r["path"], r["sha256"],
             "pinned" if r["pinned"] else "recorded on first use")


def cmd_varclip_model(a) -> None:
    from varup.models.checkpoint import released_model_file

    released_model_file(a.checkpoint, a.out, null_condition=a.null_condition, act=a.act, arch=a.arch, depth=a.depth,
                        source=a.source)


def cmd_prompt_sets(a) -> None:
    from varup.base.utils import read_json
    from varup.studies.prompts import run_prompt_sets

    names = read_json(os.path.join(a.data, "dataset.json"))["classes"]
    run_prompt_sets(a.model, a.tokenizer, os.path.dirname(a.out), family=a.family, params=a.params, class_names=names,
                    text_encoder_weights=a.text_encoder_weights, device=a.device, meta=_run_of_model(a.model),
                    data_dir=a.data, mask_dir=a.mask_dir)


def cmd_prompt_reference(a) -> None:
    from varup.studies.prompts import prompt_reference

    prompt_reference(a.data, a.out, a.inception, per_group=a.per_group, cmmd_kind=a.cmmd, classifier=a.classifier,
                     clip_weights=a.clip_weights, device=a.device)


def cmd_prompt_scores(a) -> None:
    from varup.studies.prompts import score_prompt_sets

    score_prompt_sets(a.sets, a.out, reference=a.reference, data_dir=a.data, inception_json=a.inception,
                      params=a.params, classifier=a.classifier, clip_weights=a.clip_weights, device=a.device)


# ---------------------------------------------------------------------------------------- LM arm
def cmd_lm_corpus(a) -> None:
    if a.kind == "toy":
        from varup.lm.grammar import make_corpus

        p = {k: a.params[k] for k in ("seed", "n_train", "eval_per_prompt", "n_pretrain") if k in a.params}
        s = make_corpus(a.out, template=a.template, **{"seed": 0, "n_train": 2000, "eval_per_prompt": 32,
                                                       "n_pretrain": 4000, **p})
    else:
        from varup.lm.dolly import prepare_dolly

        s = prepare_dolly(a.source, a.out, n_eval=a.params.get("n_eval", 500), seed=a.params.get("seed", 0),
                          template=a.template, categories=a.params.get("categories"),
                          reader=a.params.get("reader", "datasets"))
    log.info("lm corpus (%s): %d train, %d held-out records in %s", a.kind, s["n_train"], s["n_eval"], a.out)


def cmd_lm_dolly(a) -> None:
    from varup.base.download import fetch_file
    from varup.lm.dolly import read_dolly

    def validate(path):  # every line a dolly record: an HTML error page or a cut file is not trusted on first use
        log.info("%s: %d records", path, len(read_dolly(path)))

    r = fetch_file(a.url, a.out, a.sha256 or None, config_key=a.key, validate=validate)
    log.info("fetched %s (sha256 %s, %s)", r["path"], r["sha256"], "pinned" if r["pinned"] else "trusted on first use")


def cmd_lm_fetch(a) -> None:
    from varup.lm.hub import fetch_hub_model

    rec = fetch_hub_model(a.repo, a.out_dir, files=a.files, revision=a.revision, endpoint=a.endpoint,
                          sha256=a.sha256, config_key=a.key)
    log.info("fetched %d files of %s@%s into %s", len(rec["files"]), a.repo, a.revision, a.out_dir)


def cmd_lm_pretrain(a) -> None:
    from varup.lm.stages import pretrain_toy

    pretrain_toy(a.corpus, a.out, a.work, model_cfg=a.model, train_cfg=a.train, template=a.template, device=a.device,
                 stop_before_limit_s=a.stop_before_limit_s)


def cmd_lm_refs(a) -> None:
    from varup.lm.stages import write_lm_references

    write_lm_references(a.base, a.corpus, a.out, max_length=a.train.get("max_length", 64),
                        loss_tokens=a.train.get("loss_tokens", "response"), device=a.device, **a.params)


def cmd_lm_sft(a) -> None:
    from varup.lm.stages import sft

    sft(a.base, a.corpus, a.refs, a.out, a.work, train_cfg=a.train, device=a.device, dtype=a.dtype,
        stop_before_limit_s=a.stop_before_limit_s)


def cmd_lm_generate(a) -> None:
    from varup.lm.generate import generate

    generate(a.model, a.eval, a.out, decode=a.decode, seed=a.seed, device=a.device, dtype=a.dtype)


def cmd_lm_score(a) -> None:
    from varup.lm.score import score_generations

    score_generations(a.generations, a.eval, a.featurizer, a.out, score=a.score, toy=a.toy,
                      featurizer_label=a.label, device=a.device)


def add_fetch_args(p) -> None:
    """The arguments of a single-file download: where from, its sha256 (or empty: pinned on first use), where to."""
    p.add_argument("--url", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--key", default=None, help="the config key that pins the sha256 (named in messages)")
    p.add_argument("--out", required=True)


def add_lm_commands(cmd) -> None:
    """The LM arm (varup.lm): the paper's Table 6."""
    p = cmd("lm-corpus", cmd_lm_corpus, "write the LM arm's corpus: the toy grammar or dolly-15k's split")
    p.add_argument("--kind", choices=("toy", "dolly"), required=True)
    p.add_argument("--source", default=None, help="dolly: the fetched databricks-dolly-15k.jsonl")
    p.add_argument("--params", type=_settings("lm/corpus", "lm/corpus"), default={}, help="lm.corpus settings (JSON)")
    p.add_argument("--template", required=True, help="prompt template (a name of varup.lm.dolly.TEMPLATES or a format)")
    p.add_argument("--out", required=True)

    p = cmd("lm-dolly", cmd_lm_dolly, "fetch databricks-dolly-15k (sha256-checked, or pinned on first use)")
    add_fetch_args(p)

    p = cmd("lm-fetch", cmd_lm_fetch, "fetch a hub model's files (sha256-checked, or pinned on first use)")
    p.add_argument("--repo", required=True)
    p.add_argument("--files", type=_json, required=True, help="JSON list of file names")
    p.add_argument("--revision", default="main")
    p.add_argument("--endpoint", default="https://huggingface.co")
    p.add_argument("--sha256", type=_json, default={}, help="JSON {file: sha256}")
    p.add_argument("--key", default=None, help="the config key that pins the hashes (named in messages)")
    p.add_argument("--out-dir", required=True)

    p = cmd("lm-pretrain", cmd_lm_pretrain, "pre-train the toy base LM (or featurizer) on the grammar's text")
    for k in ("corpus", "out", "work", "template"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--model", type=_settings("lm_toy_model", "lm/base/model"), default={},
                   help="Qwen2Config keys (JSON)")
    p.add_argument("--train", type=_settings("lm_train", "lm/base/train", RUN_SEED), default={},
                   help="LMTrainConfig keys (JSON)")
    p.add_argument("--stop-before-limit-s", type=float, default=None)

    p = cmd("lm-refs", cmd_lm_refs, "the objective's references from a base LM's embedding matrix")
    for k in ("base", "corpus", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_settings("lm/references", "lm/references"), default={},
                   help="lm.references (JSON)")
    p.add_argument("--train", type=_settings("lm_train", "lm/train"), default={},
                   help="lm.train (max_length, loss_tokens) (JSON)")

    p = cmd("lm-sft", cmd_lm_sft, "fine-tune a base LM with CE or the objective (resumable)")
    for k in ("base", "corpus", "out", "work"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--refs", default=None, help="the references file (needed when a λ is > 0)")
    p.add_argument("--train", type=_settings("lm_train", "lm/train", SFT_PLAN_KEYS), required=True,
                   help="LMTrainConfig keys with the method's loss (JSON)")
    p.add_argument("--dtype", default="float32", help="the weights' dtype as loaded")
    p.add_argument("--stop-before-limit-s", type=float, default=None)

    p = cmd("lm-generate", cmd_lm_generate, "sample responses for the held-out prompts")
    for k in ("model", "eval", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--decode", type=_settings("lm_decode", "lm/generate"), default={}, help="lm.generate (JSON)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--dtype", default="float32")

    p = cmd("lm-score", cmd_lm_score, "MAUVE, Self-BLEU and (toy) mode coverage of one generation set")
    for k in ("generations", "eval", "featurizer", "out", "label"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--score", type=_settings("lm_score", "lm/score"), default={}, help="lm.score (JSON)")
    p.add_argument("--toy", action="store_true", help="score the toy grammar's modes")


def add_prompt_commands(cmd) -> None:
    """The text-conditioned arm and the companion study's prompt experiments (varup.studies.prompts)."""
    p = cmd("captions", cmd_captions, "write a dataset's caption table (varup.data.captions)")
    p.add_argument("--data", required=True)
    p.add_argument("--spec", type=_json, default={"kind": "toy"}, help="captions settings (JSON)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True)

    p = cmd("clip-weights", cmd_clip_weights, "fetch OpenAI CLIP weights (sha256-checked)")
    p.add_argument("--name", required=True, help="ViT-L-14 (VAR-CLIP's text encoder) | ViT-L-14-336 (CMMD)")
    p.add_argument("--url", default=None)
    p.add_argument("--sha256", default=None)
    p.add_argument("--out-dir", required=True)

    p = cmd("varclip-weights", cmd_varclip_weights, "fetch VAR-CLIP's released checkpoint (sha256, strict load)")
    p.add_argument("--url", required=True)
    p.add_argument("--sha256", default="", help="empty: pinned on first download")
    p.add_argument("--out", required=True)

    p = cmd("varclip-model", cmd_varclip_model, "VAR-CLIP's released checkpoint as a varup model file (strict load)")
    p.add_argument("--checkpoint", required=True, help="ar-ckpt-last.pth (['trainer']['var_wo_ddp']) or a state dict")
    p.add_argument("--out", required=True)
    p.add_argument("--null-condition", choices=("empty_caption", "learned"), required=True)
    p.add_argument("--act", choices=("quick_gelu", "gelu"), required=True, help="CLIP text tower's activation")
    p.add_argument("--arch", default="ViT-L-14")
    p.add_argument("--depth", type=int, default=None, help="the depth the workflow expects")
    p.add_argument("--source", default=None, help="the URL it came from (recorded)")

    p = cmd("prompt-sets", cmd_prompt_sets, "generate a run's prompt-study image sets and MC-Dropout σ")
    for k in ("model", "tokenizer", "data", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--family", choices=("var", "text"), required=True)
    p.add_argument("--params", type=_json, required=True)
    p.add_argument("--text-encoder-weights", default=None)
    p.add_argument("--mask-dir", default=None, help="object masks of the sets' mean images (<set>.png; region σ)")

    p = cmd("prompt-reference", cmd_prompt_reference, "Inception and CMMD features of the prompt study's real pool")
    for k in ("data", "inception", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--per-group", type=int, required=True, help="images per mode (toy) or class")
    p.add_argument("--cmmd", choices=("toy", "clip"), required=True)
    p.add_argument("--classifier", default=None)
    p.add_argument("--clip-weights", default=None)

    p = cmd("prompt-scores", cmd_prompt_scores, "score a run's prompt sets: FID/KID, CMMD, modes")
    for k in ("sets", "reference", "data", "inception", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True)
    p.add_argument("--classifier", default=None)
    p.add_argument("--clip-weights", default=None)


# --------------------------------------------------------------------------------------- sample
def cmd_sample(a) -> None:
    import numpy as np

    from varup.base.runtime import resolve_device
    from varup.base.utils import atomic_npz_save, write_provenance
    from varup.models.checkpoint import load_model
    from varup.models.vqvae import load_vqvae
    from varup.sampling.sampler import sample_shard

    t0 = time.time()
    dev = resolve_device(a.device)
    var = load_model(a.model).to(dev)
    vae = load_vqvae(a.tokenizer).to(dev)
    p = a.params
    out = sample_shard(var, vae, n_per_class=p["n_per_class"], batch_size=p["batch_size"], seed=a.seed,
                       shard=a.shard, num_shards=a.num_shards, cfg=p["cfg"], top_k=p["top_k"], top_p=p["top_p"],
                       more_smooth=p.get("more_smooth", False), device=dev, desc=f"sample shard {a.shard}",
                       precision=p.get("precision", "auto"))
    atomic_npz_save(a.out, **out, params=np.array(json.dumps(p)))
    write_provenance(a.out, config=p, seed=a.seed, device=str(dev), started=t0, shard=a.shard, num_shards=a.num_shards)


def cmd_merge_samples(a) -> None:
    import numpy as np

    from varup.base.utils import atomic_npz_save
    from varup.sampling.sampler import merge_shards

    merged = merge_shards(a.shards)
    with np.load(a.shards[0]) as z:
        params = z["params"]
    atomic_npz_save(a.out, **merged, params=params)
    log.info("merged %d shards: %d images", len(a.shards), len(merged["labels"]))


# -------------------------------------------------------------------------------------- metrics
def cmd_inception(a) -> None:
    from varup.metrics.inception import prepare_inception

    kw = {k: v for k, v in (("url", a.url), ("sha256", a.sha256)) if v}
    info = prepare_inception(a.out_dir, allow_fallback=a.allow_fallback, **kw)
    log.info("inception weights: %s", info)


def cmd_real_features(a) -> None:
    from varup.metrics.reference import real_features

    real_features(a.data, a.split, a.resolution, a.inception, a.out, max_images=a.max_images,
                  clean_out=a.clean_out, clean_max_images=a.clean_max_images, batch_size=a.batch_size, device=a.device)


def cmd_evaluate(a) -> None:
    from varup.metrics.evaluate import evaluate_run

    evaluate_run(samples=a.samples, real_features_path=a.real_features, inception_json=a.inception, model=a.model,
                 tokenizer=a.tokenizer, tokens=a.tokens, params=a.params, out=a.out,
                 real_clean_features_path=a.real_clean_features, device=a.device)


def cmd_ood(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.studies.ood import run_ood

    r = run_ood(a.model, a.tokenizer, a.id_tokens, a.ood_tokens, a.out, max_images=a.max_images,
                class_mode=a.class_mode, device=str(resolve_device(a.device)))
    log.info("OOD AUROC %.4f (ID NLL/token %.4f, OOD NLL/token %.4f)", r["auroc"], r["id"]["mean_nll_per_token"],
             r["ood"]["mean_nll_per_token"])


def cmd_corruption_eval(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.studies.corruptions import run_corruption_eval

    run_corruption_eval(a.model, a.tokenizer, a.tokens, a.data, a.out, class_mode=a.class_mode,
                        device=str(resolve_device(a.device)))


def cmd_downstream(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.studies.editing import run_downstream

    models = dict(m.split("=", 1) for m in a.models)
    p = dict(a.params)
    kw = {k: p[k] for k in ("n_images", "n_samples", "tasks", "outpaint_box", "inpaint_box", "seed", "cfg") if k in p}
    run_downstream(models, a.tokenizer, a.tokens, None, a.out_dir, dataset_name=a.name,
                   device=str(resolve_device(a.device)), **kw)


def _run_meta(run: str) -> dict:
    dataset, depth, method, seed = run.split("/")
    return {"dataset": dataset, "depth": int(depth), "method": method, "seed": int(seed)}


def _run_of_model(path: str) -> dict:
    """dataset/depth/method/seed from results/<exp>/<dataset>/d<depth>/<method>/seed<seed>/model.pt."""
    p = Path(path).parent
    return {"dataset": p.parents[2].name, "depth": int(p.parents[1].name.rsplit("d", 1)[1]), "method": p.parent.name,
            "seed": int(p.name[4:])}  # d<depth>, or text_d<depth> for a text-conditioned run


def cmd_mc_dropout(a) -> None:
    from varup.studies.uncertainty import run_mc_dropout

    p = a.params
    run_mc_dropout(a.model, a.tokenizer, a.data, a.out, a.out_npz, classes=p["classes"], seeds=p["seeds"], T=p["T"],
                   rate=p["rate"], cfg=p["cfg"], top_k=p["top_k"], top_p=p["top_p"], more_smooth=p["more_smooth"],
                   device=a.device, meta=_run_of_model(a.model), mask_dir=p.get("mask_dir"), masks=p["droppath_masks"],
                   sigma_reading=p["sigma_reading"])


def cmd_uncertainty_sets(a) -> None:
    from varup.studies.uncertainty import run_entanglement_sets, run_sweep_sets

    p = a.params
    common = dict(cfg=p["cfg"], top_k=p["top_k"], top_p=p["top_p"], more_smooth=p["more_smooth"], T=p["T"],
                  batch_size=p["batch_size"], device=a.device, meta=_run_of_model(a.model), masks=p["droppath_masks"],
                  sigma_reading=p["sigma_reading"])
    run_sweep_sets(a.model, a.tokenizer, a.sweep_dir, rates=p["rates"], n_per_class=p["n_per_class"], seed=a.seed,
                   sigma_pairs=[(c, s) for c in p["classes"] for s in p["sigma_seeds"]], **common)
    run_entanglement_sets(a.model, a.tokenizer, a.mix_dir, mixes=p["mixes"], n=p["n_mix"], seed=a.seed,
                          sigma_seeds=p["sigma_seeds"], rate=p["set_droppath_rate"], **common)


def cmd_score_sets(a) -> None:
    from varup.metrics.sets import score_sets

    if len(a.sets) != len(a.out):
        raise SystemExit("score-sets: give one --out per --sets file")
    for src, dst in zip(a.sets, a.out):
        score_sets(src, dst, real_features_path=a.real_features, inception_json=a.inception, params=a.params,
                   device=a.device)


def cmd_mode_classifier(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.data.modes import train_mode_classifier

    r = train_mode_classifier(a.data, a.out, epochs=a.epochs, seed=a.seed, device=str(resolve_device(a.device)))
    log.info("mode classifier: held-out accuracy %s", r.get("val_accuracy", r))


def cmd_mode_coverage(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.metrics.modes import run_mode_coverage

    run_mode_coverage(a.classifier, a.samples, a.data, a.out, meta=_run_meta(a.run), device=str(resolve_device(a.device)))


def cmd_toy_metrics(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.metrics.toyfeatures import run_toy_metrics

    run_toy_metrics(a.classifier, a.samples, a.data, a.out, params=a.params, meta=_run_meta(a.run),
                    device=str(resolve_device(a.device)))


def cmd_toy_metrics_floor(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.metrics.toyfeatures import run_toy_floor

    run_toy_floor(a.classifier, a.data, a.out, params=a.params, dataset=a.dataset,
                  inception_json=a.inception if a.floor_inception else None,
                  real_features_path=a.real_features if a.floor_inception else None,
                  tokenizer=a.tokenizer,
                  device=str(resolve_device(a.device)))


def cmd_digits_images(a) -> None:
    from varup.data.digits import write_digits_folder

    write_digits_folder(a.out, resolution=a.resolution, val_fraction=a.val_fraction, max_per_class=a.max_per_class)


def cmd_digit_classifier(a) -> None:
    from varup.metrics.digits import run_digit_classifier

    run_digit_classifier(a.data, a.out, a.record, resolution=a.resolution)


def cmd_digit_scores(a) -> None:
    from varup.metrics.digits import run_digit_scores

    run_digit_scores(a.classifier, a.samples, a.out, meta=_run_meta(a.run))


def cmd_digits_floor(a) -> None:
    from varup.base.runtime import resolve_device
    from varup.metrics.digits import run_digits_floor

    run_digits_floor(a.classifier, a.data, a.inception, a.real_features, a.out, params=a.params, dataset=a.dataset,
                     device=str(resolve_device(a.device)))


def cmd_digits_table(a) -> None:
    from varup.report.digits import digits_table

    digits_table(a.config, a.results, a.out)


def cmd_tables(a) -> None:
    from varup.report.tables import make_tables

    make_tables(a.config, a.results, a.out, only=a.only)


def cmd_lambda_study(a) -> None:
    from varup.studies.lambdastudy import run_lambda_study

    res = run_lambda_study(a.entries, a.out, baseline=a.baseline, confidence=a.confidence, losses=a.losses)
    log.info("lambda study: %s", res["verdict"])


def cmd_claim_grid(a) -> None:
    from varup.studies.claimgrid import run_claim_grid

    p = a.params
    run_claim_grid(a.model, a.tokenizer, a.classifier, a.data, a.out, settings=p["settings"], default=p["default"],
                   snapshots=[(int(s), path) for s, path in p["snapshots"]], sampling=p["sampling"],
                   rare_share=p["rare_share"], memorisation_quantile=p["memorisation_quantile"],
                   metric_params=p["metrics"], curve_settings=p["curve_settings"], device=a.device,
                   meta=_run_meta(a.run))


def cmd_claim_study(a) -> None:
    from varup.studies.claimstudy import run_claim_study

    run_claim_study(a.entries, a.out, **a.params)


def cmd_figures(a) -> None:
    from varup.report.figures import make_figures

    if a.only == "lm":
        from varup.report.figures import lm_figures

        lm_figures(a.config, a.results, a.out)
        return
    if a.only == "prompts":
        from varup.report.figures import prompt_figures

        prompt_figures(a.config, a.results, a.out)
        return
    make_figures(a.config, a.results, a.out, device=a.device)


# ------------------------------------------------------------------------------------------ main
def vars_json(a) -> dict:
    return {k: v for k, v in vars(a).items() if k not in ("func",) and isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def add_stop_arg(p) -> None:
    """The Slurm time-limit margin of a training command (varup.base.runtime.SlurmClock)."""
    p.add_argument("--stop-before-limit-s", type=float, default=600.0,
                   help="inside a Slurm job: checkpoint and exit (status 75) this long before its time limit; 0: never")


def add_data_commands(cmd) -> None:
    """Data: the toy generator, downloads and the preparation of real and OOD image sets."""
    p = cmd("data-toy", cmd_data_toy, "generate the toy shapes dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--params", type=_json, default={}, help="generator settings (JSON)")

    p = cmd("fetch", cmd_fetch, "download one weights file (sha256-checked, or pinned on first use)")
    add_fetch_args(p)

    p = cmd("fetch-archive", cmd_fetch_archive, "download and unpack a dataset archive (sha256-checked)")
    p.add_argument("--url", required=True)
    p.add_argument("--sha256", default="")
    p.add_argument("--name", default=None, help="archive file name (default: from the URL)")
    p.add_argument("--key", default=None)
    p.add_argument("--out", required=True, help="the record (JSON) written beside the archive")

    p = cmd("prepare", cmd_prepare, "prepare a real dataset directory (manifest + dataset.json)")
    p.add_argument("--kind", choices=["afhq", "imagenet100", "folder"], required=True)
    p.add_argument("--source", required=True, help="afhq: the fetch record; imagenet100 / folder: the root")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--verify", action="store_true", help="decode every image now (corrupt files fail, named)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-per-class", type=int, default=None)

    p = cmd("prepare-ood", cmd_prepare_ood, "prepare the out-of-distribution image set (Table 3)")
    p.add_argument("--source", type=_json, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True)

    p = cmd("corrupt-images", cmd_corrupt_images, "ImageNet-C corruptions of a dataset's held-out images (Table 3 mCE)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--preprocess", type=_json, default={})
    p.add_argument("--params", type=_json, required=True,
                   help="names, severities, max_images, seed (JSON; experiments.ood.corruptions)")
    p.add_argument("--workers", type=int, default=1, help="processes (one (corruption, severity) set per task)")
    p.add_argument("--out", required=True)


def add_tokenizer_commands(cmd) -> None:
    """The tokenizer and what is computed once per tokenizer: its gate, the token cache, the loss references."""
    p = cmd("tokenizer-train", cmd_tokenizer_train, "train a multi-scale VQVAE from scratch")
    p.add_argument("--data", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--preprocess", type=_json, default={})
    p.add_argument("--vqvae", type=_json, required=True)
    p.add_argument("--train", type=_json, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    add_stop_arg(p)

    p = cmd("tokenizer-gate", cmd_tokenizer_gate, "fail when the toy mode classifier cannot tell the class of the "
            "tokenizer's reconstructions of held-out images")
    for k in ("tokenizer", "classifier", "data", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--preprocess", type=_json, default={})
    p.add_argument("--split", default="val")
    p.add_argument("--max-class-error", type=float, required=True)
    p.add_argument("--key", default="tokenizer_gate", help="the config key of the bound (named in the error)")

    p = cmd("encode", cmd_encode, "encode a dataset into the token cache (once per image and variant)")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--preprocess", type=_json, default={})
    p.add_argument("--variants", type=_json, default=[{}])
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="SPLIT or SOURCE:STORED (e.g. val:ood)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (0: this process)")
    p.add_argument("--out", required=True)

    p = cmd("references", cmd_references, "precompute the loss references (clusters, semantic and dataset s*)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--num-clusters", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--support-k", type=float, default=8.0, help="median effective support of the semantic_k reference")
    p.add_argument("--stats", default=None, help="also write the references' s* statistics (JSON) here")
    p.add_argument("--out", required=True)


def add_generator_commands(cmd) -> None:
    """Training and sampling a VAR run."""
    p = cmd("train", cmd_train, "train one VAR run")
    p.add_argument("--spec", type=_json, required=True, help="run specification (JSON, varup.training.loop.RunSpec)")
    p.add_argument("--tokens", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--refs", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--warm-start", default=None, help="official var_d{depth}.pth (when train.warm_start is set)")
    p.add_argument("--captions", default=None, help="the dataset's caption table directory (text-conditioned runs)")
    p.add_argument("--text-encoder-weights", default=None, help="CLIP weights (text.encoder.kind clip)")
    add_stop_arg(p)

    p = cmd("sample", cmd_sample, "sample one shard of a run's evaluation set")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--params", type=_json, required=True, help="sample settings (JSON)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--out", required=True)

    p = cmd("merge-samples", cmd_merge_samples, "merge sample shards in global batch order")
    p.add_argument("--out", required=True)
    p.add_argument("shards", nargs="+")


def add_metric_commands(cmd) -> None:
    """Scoring a run: Inception features and metrics, likelihoods and OOD, the editing figures."""
    p = cmd("inception", cmd_inception, "fetch (or build) Inception weights for the metrics")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--url", default=None)
    p.add_argument("--sha256", default=None)
    p.add_argument("--no-fallback", dest="allow_fallback", action="store_false")

    p = cmd("real-features", cmd_real_features, "Inception features of a real image split (computed once)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--inception", required=True)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.add_argument("--clean-out", default=None, help="also write clean-fid features of the real set here")
    p.add_argument("--clean-max-images", type=int, default=None)

    p = cmd("evaluate", cmd_evaluate, "every metric of one run")
    for k in ("samples", "real-features", "inception", "model", "tokenizer", "tokens", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--real-clean-features", default=None, help="clean-fid features of the real set (enables clean-FID)")
    p.add_argument("--params", type=_json, required=True, help="metrics settings (JSON)")

    p = cmd("ood", cmd_ood, "token-likelihood NLL and OOD AUROC of one run (Table 3)")
    for k in ("model", "tokenizer", "id-tokens", "ood-tokens", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--class-mode", choices=["null", "max"], default="null")

    p = cmd("corruption-eval", cmd_corruption_eval, "token error and NLL of one run on every corrupted set (Table 3)")
    for k in ("model", "tokenizer", "tokens", "data", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--class-mode", choices=["label", "null"], default="label")

    p = cmd("downstream", cmd_downstream, "out-painting, in-painting and class-conditional editing figures")
    p.add_argument("--models", nargs="+", required=True, help="NAME=MODEL_PATH, one per method (column group)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", required=True, help="figure name stem: downstream_<name>_<task>")


def add_study_commands(cmd) -> None:
    """The uncertainty, mode-coverage and λ studies."""
    p = cmd("mc-dropout", cmd_mc_dropout, "MC-dropout sigma maps and region sigma of one run")
    for k in ("model", "tokenizer", "data", "out", "out-npz"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True)

    p = cmd("uncertainty-sets", cmd_uncertainty_sets, "DropPath-sweep and class-entanglement image sets of one run")
    for k in ("model", "tokenizer", "sweep-dir", "mix-dir"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True)
    p.add_argument("--seed", type=int, required=True)

    p = cmd("score-sets", cmd_score_sets, "FID/KID/PR of the image sets listed in study JSON files")
    p.add_argument("--sets", nargs="+", required=True)
    p.add_argument("--out", nargs="+", required=True)
    p.add_argument("--real-features", required=True)
    p.add_argument("--inception", required=True)
    p.add_argument("--params", type=_json, default={})

    p = cmd("mode-classifier", cmd_mode_classifier, "train the toy mode classifier (shape, colour, size, background)")
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = cmd("mode-coverage", cmd_mode_coverage, "modes covered by a run's samples, KL to the true mode histogram")
    for k in ("classifier", "samples", "data", "run", "out"):
        p.add_argument(f"--{k}", required=True)

    p = cmd("toy-metrics", cmd_toy_metrics, "FD/KID/PR of a run's samples in the toy mode classifier's feature space")
    for k in ("classifier", "samples", "data", "run", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True, help="reference set and metric settings (JSON)")

    p = cmd("toy-metrics-floor", cmd_toy_metrics_floor,
            "real-vs-real floor of the toy-feature (and Inception) metrics: a disjoint real set of the sample size")
    for k in ("classifier", "data", "dataset", "inception", "real-features", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True, help="reference / floor sets and metric settings (JSON)")
    p.add_argument("--tokenizer", default=None,
                   help="also score the tokenizer's reconstructions of the floor set (the tokenizer's ceiling)")
    p.add_argument("--no-inception", dest="floor_inception", action="store_false",
                   help="skip the Inception FID/KID/PR of the floor (its one Inception pass)")

    p = cmd("lambda-study", cmd_lambda_study, "score the λ study: means, t-intervals, paired differences, verdict")
    p.add_argument("--entries", type=_json, required=True,
                   help="JSON list of {point, seed, run, mode_coverage, toy_metrics, samples, summary, tokens_meta}")
    p.add_argument("--losses", type=_json, default={}, help="JSON {point: loss settings} (for the table)")
    p.add_argument("--baseline", default="baseline")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--out", required=True)

    p = cmd("claim-grid", cmd_claim_grid, "the claim study's scores of one run: its temperature x top-p x cfg grid and "
            "its kept snapshots at the default setting (modes, rare-mode recall, KL, memorisation, toy-P/R)")
    for k in ("model", "tokenizer", "classifier", "data", "run", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True,
                   help="JSON {settings, default, snapshots: [[step, path]], sampling, rare_share, "
                        "memorisation_quantile, metrics}")

    p = cmd("claim-study", cmd_claim_study, "the claim study's frontiers, corrected p-values, power and curves")
    p.add_argument("--entries", type=_json, required=True, help="JSON list of {arm, seed, grid}")
    p.add_argument("--params", type=_json, required=True,
                   help="JSON {baseline, primary, quality, diversity, confidence, correction, planning_sd, setting}")
    p.add_argument("--out", required=True)


def add_report_commands(cmd) -> None:
    """Tables and figures (they only read result files)."""
    p = cmd("tables", cmd_tables, "regenerate every table")
    p.add_argument("--config", type=_json, required=True, help="the validated config (JSON)")
    p.add_argument("--results", required=True, help="results/<experiment>")
    p.add_argument("--only", default=None, help="build only this table (lambda_study: the target of that name)")
    p.add_argument("--out", required=True)

    p = cmd("figures", cmd_figures, "regenerate every figure")
    p.add_argument("--config", type=_json, required=True, help="the validated config (JSON)")
    p.add_argument("--results", required=True)
    p.add_argument("--only", default=None, choices=("prompts", "lm"), help="only the prompt study's / the LM arm's figure")
    p.add_argument("--out", required=True)


def add_digits_commands(cmd) -> None:
    """The digits rehearsal (target ``digits``): scikit-learn's digits as an image folder, the digit classifier, the
    samples' class error, the real-vs-real floor and the table."""
    p = cmd("digits-images", cmd_digits_images, "write scikit-learn's digits as an image folder (train/val/<digit>/)")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True, help="px, a multiple of 8 (nearest-neighbour upscaling)")
    p.add_argument("--val-fraction", type=float, required=True, help="held-out share per class (stratified, seeded)")
    p.add_argument("--max-per-class", type=int, default=None, help="keep the first N digits per class and split")

    p = cmd("digit-classifier", cmd_digit_classifier, "fit the digit classifier on the train split, test it on val")
    for k in ("data", "out", "record"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--resolution", type=int, required=True)

    p = cmd("digit-scores", cmd_digit_scores, "class error of a run's samples read by the digit classifier")
    for k in ("classifier", "samples", "run", "out"):
        p.add_argument(f"--{k}", required=True)

    p = cmd("digits-floor", cmd_digits_floor, "real-vs-real floor of the digits' Inception metrics and class error")
    for k in ("classifier", "data", "dataset", "inception", "real-features", "out"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--params", type=_json, required=True, help="reference / floor sets and metric settings (JSON)")

    p = cmd("digits-table", cmd_digits_table, "the digits table (tables/digits.{csv,md,tex,html})")
    p.add_argument("--config", type=_json, required=True, help="the validated config (JSON)")
    p.add_argument("--results", required=True, help="results/<experiment>")
    p.add_argument("--out", required=True)


def cmd_gpu_check(a) -> int:
    from varup.bench.gpucheck import gpu_check

    rc, _ = gpu_check(a.device, tiny=a.tiny, sections=a.sections.split(",") if a.sections else None, out=a.out)
    return rc


def cmd_plan_memory(a) -> int:
    from varup.config.schema import load_config
    from varup.training.memtable import format_plan, plan_config

    rows = plan_config(load_config(a.configfile))
    print(format_plan(rows))
    over = [r for r in rows if not r["fits"]]
    for r in over:
        print(f"{a.configfile}: run {r['run']} needs about {r['peak_gb']:.1f} GB per GPU, over cluster.gpu_mem_gb "
              f"{r['gpu_mem_gb']:g} (with its margin): set train.micro_batch (auto), train.activation_checkpointing: "
              f"true, or more train.gpus", file=sys.stderr)
    if over:  # a run that does not fit: exit status 1 (what a pre-submission check tests)
        raise SystemExit(1)
    return 0


def add_plan_commands(cmd) -> None:
    """The memory plan of a config's training runs (``varup.training.memtable``)."""
    p = cmd("plan-memory", cmd_plan_memory, "estimated peak GPU memory of every training run of a config against "
            "cluster.gpu_mem_gb; exit 1 when a run does not fit")
    p.add_argument("--configfile", required=True, help="the config file (e.g. config/paper.yaml)")


def add_bench_commands(cmd) -> None:
    """The GPU acceptance run (``varup.bench.gpucheck``): one PASS/FAIL line per section, exit 1 on a failure."""
    p = cmd("gpu-check", cmd_gpu_check, "GPU acceptance: matmul ceilings, d16 training eager/compiled, a d20 step, "
            "sampling, every family under DDP, kill and resume; one PASS/FAIL line per section")
    p.add_argument("--tiny", action="store_true", help="every section's code path on CPU with tiny models (tests)")
    p.add_argument("--out", default=None, help="write every section's record to this JSON file")
    p.add_argument("--sections", default=None, help="comma-separated subset of: ceilings, train_d16, train_d20, "
                   "sample, ddp, resume (default: all)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="varup", description="VAR uncertainty-preservation pipeline stages")
    sub = ap.add_subparsers(dest="command", required=True)

    def cmd(name, func, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--log", help="append the log to this file")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
        p.add_argument("--device", default="auto", help="auto | auto:gpu | auto:any | cpu | cuda | cuda:N (auto: CUDA "
                       "if torch sees a GPU, else the CPU, refused where GPUs were allocated; auto:gpu also refuses it "
                       "in a Slurm job; auto:any never; see varup.base.runtime.resolve_device)")
        p.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms, cuDNN "
                       "deterministic, CUBLAS_WORKSPACE_CONFIG (config `deterministic`, which the workflow passes as "
                       "VARUP_DETERMINISTIC=1; varup.base.runtime.set_deterministic)")
        return p

    add_data_commands(cmd)
    add_tokenizer_commands(cmd)
    add_generator_commands(cmd)
    add_metric_commands(cmd)
    add_study_commands(cmd)
    add_report_commands(cmd)
    add_prompt_commands(cmd)
    add_lm_commands(cmd)
    add_bench_commands(cmd)
    add_plan_commands(cmd)
    add_digits_commands(cmd)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from varup.base.utils import remove_orphan_provenance, set_threads, setup_logging

    setup_logging(a.log)
    set_threads(a.threads)
    if a.deterministic or os.environ.get("VARUP_DETERMINISTIC", "") not in ("", "0"):  # torch is imported only then
        from varup.base.runtime import deterministic_requested, set_deterministic

        set_deterministic(a.deterministic or deterministic_requested())
    remove_orphan_provenance(getattr(a, "out", None))  # a sidecar left by a failed run of this output
    t0 = time.time()
    log.info("varup %s: %s", a.command, " ".join(sys.argv[1:]) if argv is None else " ".join(argv))
    rc = a.func(a) or 0  # a command may return an exit code (gpu-check: 1 when a section failed)
    log.info("varup %s finished in %.1f s", a.command, time.time() - t0)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
