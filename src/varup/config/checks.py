"""What the JSON schema cannot say: cross-references between sections, sample sizes each metric needs,
folders a job reads. Run by :func:`varup.config.schema.validate` after the schema has filled in its defaults, before
any job starts."""
from __future__ import annotations

from pathlib import Path

from varup.config.cluster import LAUNCH_KEYS, LAUNCH_RULES, MANAGED_FLAGS
from varup.config.errors import ConfigError
from varup.config.folders import folder_classes, num_classes_problem
from varup.config.keys import deep_merge, get_key
from varup.config.plan import main_datasets, main_runs, sample_settings, uncertainty_enabled
from varup.config.sizes import min_set_size


def check_cross_references(cfg: dict) -> None:
    problems = []
    for name, ds in cfg["datasets"].items():
        if ds["tokenizer"] not in cfg["tokenizers"]:
            problems.append(f"datasets/{name}/tokenizer: {ds['tokenizer']!r} is not defined under tokenizers "
                            f"(have {sorted(cfg['tokenizers'])})")
        if ds["kind"] in ("folder", "imagenet100") and "root" not in ds:
            problems.append(f"datasets/{name}/root: required for kind {ds['kind']!r}")
        if ds["kind"] == "toy" and "num_classes" in ds:
            n = len(ds["generator"]["shapes"])
            if ds["num_classes"] != n:
                problems.append(f"datasets/{name}/num_classes: {ds['num_classes']} but the generator has {n} shapes")
        if ds["tokenizer_gate"] and ds["kind"] != "toy":
            problems.append(f"datasets/{name}/tokenizer_gate: needs the toy mode classifier, so only kind 'toy' "
                            f"can have it (this dataset is {ds['kind']!r})")
    for name, tok in cfg["tokenizers"].items():
        if tok["kind"] == "train" and "vqvae" not in tok:
            problems.append(f"tokenizers/{name}/vqvae: required for kind 'train'")
    overrides = [(f"datasets/{n}/train", d.get("train") or {}) for n, d in cfg["datasets"].items()]
    for where, train in overrides + [("text/train", cfg["text"]["train"])]:  # a dataset's train is optional
        for key in LAUNCH_KEYS:
            if key in train:
                problems.append(f"{where}/{key}: set {key} at the top level (train/{key}); it sizes the "
                                f"training rule for every run")
    ex = cfg["experiments"]
    for key in ("figure4", "ood", "downstream"):
        if key in ex and ex[key]["dataset"] not in cfg["datasets"]:
            problems.append(f"experiments/{key}/dataset: {ex[key]['dataset']!r} is not defined under datasets")
    if "figure4" in ex:
        f4 = ex["figure4"]
        if int(f4["depth"]) not in cfg["model"]["depths"] and f4["cfg"]:
            problems.append(f"experiments/figure4/depth: {f4['depth']} is not in model/depths, so the cfg sweep has "
                            f"no trained runs to sample")
        for m in f4["cfg_methods"]:
            if m not in cfg["methods"]:
                problems.append(f"experiments/figure4/cfg_methods: {m!r} is not defined under methods")
        base = f4["base_method"]
        if base not in cfg["methods"]:
            problems.append(f"experiments/figure4/base_method: {base!r} is not defined under methods")
    problems += _lambda_study_problems(cfg)
    problems += _checkpoint_problems(cfg)
    problems += _model_problems(cfg)
    problems += _sample_size_problems(cfg)
    if "downstream" in ex:
        missing = [m for m in ex["downstream"]["methods"] if m not in cfg["methods"]]
        if missing:
            problems.append(f"experiments/downstream/methods: {missing} not defined under methods")
    problems += _uncertainty_problems(cfg)
    problems += _folder_problems(cfg)
    problems += cluster_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join("  " + p for p in problems))


def cluster_problems(cfg: dict) -> list[str]:
    """cluster.rules names only rules that are submitted (a row of cluster.sizes, or a training rule), gpu_model
    only where the rule has GPUs, and no slurm_extra repeats a flag snakemake-executor-plugin-slurm sets itself."""
    c, problems = cfg["cluster"], []
    submitted = set(c["sizes"]) | set(LAUNCH_RULES)
    for rule, settings in c["rules"].items():
        if rule not in submitted:
            problems.append(f"cluster/rules/{rule}: no submitted rule of the workflow has this name (a local rule, "
                            f"e.g. tables or figures, runs beside Snakemake); the submitted ones: {sorted(submitted)}")
        elif "gpu_model" in settings and rule not in LAUNCH_RULES and not c["sizes"][rule].get("gpu"):
            problems.append(f"cluster/rules/{rule}/gpu_model: {rule} asks for no GPU (cluster/sizes/{rule})")
    for where, settings in [("all", c["all"])] + [(f"rules/{r}", s) for r, s in c["rules"].items()]:
        flags = [t.split("=", 1)[0] for t in str(settings.get("slurm_extra", "")).split()]
        if bad := [f for f in flags if f in MANAGED_FLAGS]:
            problems.append(f"cluster/{where}/slurm_extra: {bad} is set by the Slurm executor plugin from the rule's "
                            f"resources (it refuses the job); use the cluster keys mem_mb, cpus_per_task, runtime, "
                            f"gpu_model, constraint, qos or partition/account instead")
    return problems


def _lambda_study_problems(cfg: dict) -> list[str]:
    ls = cfg["experiments"].get("lambda_study")
    if not ls:
        return []
    out = []
    d = cfg["datasets"].get(ls["dataset"])
    if d is None:
        return [f"experiments/lambda_study/dataset: {ls['dataset']!r} is not defined under datasets"]
    if d["kind"] != "toy":
        out.append(f"experiments/lambda_study/dataset: {ls['dataset']!r} is not a toy dataset; the study scores mode "
                   f"coverage, which needs known modes (on real data use experiments/figure4)")
    if ls["baseline"] not in ls["points"]:
        out.append(f"experiments/lambda_study/baseline: {ls['baseline']!r} is not one of the points "
                   f"{sorted(ls['points'])}")
    if ls.get("depth") and int(ls["depth"]) not in cfg["model"]["depths"]:
        out.append(f"experiments/lambda_study/depth: {ls['depth']} is not in model/depths")
    return out


def _checkpoint_problems(cfg: dict) -> list[str]:
    """A checkpoint is written only after a finite-loss check: ckpt_every must be a multiple of the check interval.
    Train keys have no schema defaults (a run's specification holds only the keys a config sets): unset, they are
    the trainer's (varup.training.loop.OptimConfig, which checks the same when a run starts)."""
    out = []
    where_train = [("train", cfg["train"])] + [(f"datasets/{n}/train", deep_merge(cfg["train"], d.get("train")))
                                               for n, d in cfg["datasets"].items() if d.get("train")]
    if cfg["text"]["train"]:  # the text runs' optimiser: their dataset's train with text.train over it
        ds = cfg["datasets"].get(cfg["text"].get("dataset") or next(iter(cfg["datasets"])), {})
        where_train.append(("text/train", deep_merge(deep_merge(cfg["train"], ds.get("train")), cfg["text"]["train"])))
    for where, t in where_train:
        every, check = t.get("ckpt_every", 200), t.get("nonfinite_check_every", 1)
        if every % check:
            out.append(f"{where}/ckpt_every: {every} is not a multiple of {where}/nonfinite_check_every ({check})")
    return out


def heads_problem(cfg: dict, depth: int, why: str = "") -> str | None:
    """Why ``model/heads`` cannot split the width of a VAR of ``depth`` blocks (``model/width_per_depth`` x depth:
    varup.config.plan.model_settings), or None; null heads (as many as blocks) always can."""
    m = cfg["model"]
    width, heads = m["width_per_depth"] * int(depth), m["heads"]
    if heads is None or width % heads == 0:
        return None
    return (f"model/heads: {heads} does not divide the width {width} of depth {depth}{why} (model/width_per_depth "
            f"{m['width_per_depth']} x {depth}); choose heads that divide it, or null (one head per block)")


def _model_problems(cfg: dict) -> list[str]:
    """``model/heads`` against the width of every depth the image arm trains (the text arm's: varup.config.textplan)."""
    ex = cfg["experiments"]
    depths = {int(d): "" for d in cfg["model"]["depths"]}
    for key in ("figure4", "lambda_study", "downstream"):
        if ex.get(key, {}).get("depth") is not None:
            depths.setdefault(int(ex[key]["depth"]), f" (experiments/{key}/depth)")
    return [p for d, why in sorted(depths.items()) if (p := heads_problem(cfg, d, why))]


def classes_of(ds: dict) -> int | None:
    """A dataset's number of classes when the config says it (toy: its shapes), else None (the data's own)."""
    return len(ds["generator"]["shapes"]) if ds["kind"] == "toy" else ds.get("num_classes")


def metric_set_size(cfg: dict) -> int:
    """The fewest images a scored set may hold: what metrics/prc_neighborhood and metrics/prdc_nearest_k need
    (varup.config.sizes.min_set_size; FID, KID and CMMD need 2, fewer)."""
    m = cfg["metrics"]
    return min_set_size(m["prc_neighborhood"], m["prdc_nearest_k"])


def _sample_size_problems(cfg: dict) -> list[str]:
    """Each run's sample set (``sample/n_per_class``, top level or a dataset's) is scored by the per-class SSIM
    diversity (pairs of one class's images: 2 per class) and by precision/recall and PRDC (metric_set_size images,
    counted over the classes where the config gives them); the real set likewise (metrics/real_max_images)."""
    need, m, out = metric_set_size(cfg), cfg["metrics"], []
    why = (f"metrics/prc_neighborhood ({m['prc_neighborhood']}) and metrics/prdc_nearest_k ({m['prdc_nearest_k']}) "
           f"need {need}")
    for name, ds in ((n, cfg["datasets"][n]) for n in main_datasets(cfg)):  # a study's own dataset samples its own
        n = sample_settings(cfg, name)["n_per_class"]
        own = "n_per_class" in (ds.get("sample") or {})  # the dataset's override, else the top level's
        key = f"datasets/{name}/sample/n_per_class" if own else "sample/n_per_class"
        k = classes_of(ds)
        if n < 2:
            out.append(f"{key}: {n} image per class (datasets/{name}); the SSIM diversity compares pairs of images of "
                       f"a class, so it needs at least 2")
        elif k is not None and n * k < need:
            out.append(f"{key}: {n} x {k} classes = {n * k} images per sample set of datasets/{name}; {why}")
    if m["real_max_images"] < need:
        out.append(f"metrics/real_max_images: {m['real_max_images']} real images; {why}")
    if m["clean_fid"]["enabled"] and m["clean_fid"]["max_images"] < 2:
        out.append("metrics/clean_fid/max_images: 1 image has no covariance; clean-FID needs at least 2")
    return list(dict.fromkeys(out))


def _uncertainty_problems(cfg: dict) -> list[str]:
    """The uncertainty study's image sets are scored by FID/KID/PR: each must hold enough images for the
    neighbourhood metrics; its classes must exist in every dataset the study runs on, and its runs be trained."""

    if not uncertainty_enabled(cfg):
        return []
    u = cfg["uncertainty"]
    m = cfg["metrics"]
    need = min_set_size(m["prc_neighborhood"], m["prdc_nearest_k"])
    problems = []
    sizes = {"uncertainty/sweep_n_per_class": u["sweep_n_per_class"] * len(u["classes"]),
             "uncertainty/entanglement_n": u["entanglement_n"]}
    for key, n in sizes.items():
        if n < need:
            problems.append(f"{key}: its image sets hold {n} images, fewer than the {need} that "
                            f"metrics/prdc_nearest_k and metrics/prc_neighborhood need")
    for name in u["mask_dirs"]:
        if name not in cfg["datasets"]:
            problems.append(f"uncertainty/mask_dirs/{name}: not a dataset defined under datasets")
    untrained = [s for s in u.get("run_seeds") or [] if s not in cfg["seeds"]]  # no run_seeds: the first seed
    if untrained:
        problems.append(f"uncertainty/run_seeds: {untrained} not in seeds {cfg['seeds']}: the studies run on trained "
                        f"runs only, so these seeds would have none (choose run_seeds among seeds)")
    return problems + _uncertainty_class_problems(cfg)


def _uncertainty_class_problems(cfg: dict) -> list[str]:
    """Every class the studies sample (uncertainty/classes/<i>, uncertainty/entanglement_mixes/<i>/<j>) must exist in
    the datasets they run on; each bad value is named by its own key."""
    u = cfg["uncertainty"]
    where = [(f"uncertainty/classes/{i}", c) for i, c in enumerate(u["classes"])]
    where += [(f"uncertainty/entanglement_mixes/{i}/{j}", c) for i, mix in enumerate(u["entanglement_mixes"])
              for j, c in enumerate(mix)]
    problems = []
    for name in sorted({r.dataset for r in main_runs(cfg)}):
        n_cls = cfg["datasets"][name].get("num_classes")  # none given: the classes are the data's
        problems += [f"{key}: class {c} is out of range for datasets/{name} ({n_cls} classes: 0 to {n_cls - 1})"
                     for key, c in where if n_cls is not None and c >= n_cls]
    return problems


def _folder_problems(cfg: dict) -> list[str]:
    """``num_classes`` of a folder dataset against its folder, when the folder can be read now (else the prepare job
    checks it)."""
    out = []
    for name, ds in cfg["datasets"].items():
        if ds["kind"] != "folder" or "num_classes" not in ds or "root" not in ds:
            continue
        root = Path(str(ds["root"])).expanduser()
        if root.is_dir():
            problem = num_classes_problem(f"datasets/{name}/num_classes", ds["num_classes"], root, folder_classes(root))
            out += [problem] if problem else []
    return out


#: sub-folders that a folder given by a config key must hold: ImageNet-100 is built from an ImageNet-1k root
REQUIRED_SUBDIRS = {"imagenet100": ("train", "val")}


def dir_problem(cfg: dict, key: str) -> str | None:
    """Why the folder at dotted ``key`` cannot be read (None: it can, or the key is not set)."""
    val = get_key(cfg, key)
    if val is None:
        return None
    p = Path(val).expanduser()
    hint = " (the config's placeholder: fill in the path marked REQUIRED)" if str(val).startswith("/path/to/") else ""
    if not p.is_dir():
        return f"{key}: {val} is not an existing folder{hint}"
    parts = key.split(".")
    kind = get_key(cfg, ".".join(parts[:-1] + ["kind"])) if parts[-1] == "root" else None
    missing = [s for s in REQUIRED_SUBDIRS.get(kind, ()) if not (p / s).is_dir()]
    return f"{key}: {val} has no {' or '.join(f'{s}/' for s in missing)} (kind {kind})" if missing else None


def check_dirs(cfg: dict, keys) -> None:
    """Raise ConfigError naming every key of ``keys`` whose folder cannot be read (see :func:`dir_problem`)."""
    problems = [m for k in keys if (m := dir_problem(cfg, k))]
    if problems:
        raise ConfigError("a configured folder that this job reads is missing:\n" + "\n".join("  " + m for m in problems))
