"""The run plan of the image arm: which training runs exist (main, ablation, lambda study, scaling study, cfg sweep,
OOD, uncertainty, modes) and the complete per-job settings of each. A *run* is one training job (dataset, depth, method,
seed); its results live under ``results/{experiment}/{dataset}/d{depth}/{method}/seed{seed}/``.

Its shape is that of every arm's plan (:mod:`varup.config.textplan` for the text arm, :mod:`varup.config.lmplan` for
the LM arm): a frozen run record whose ``path`` is where the run's results live (:class:`Run`), :func:`runs` (every
training run) and :func:`run_spec` (the specification its training job records). The image arm is always on and its
problems are the configuration's own (:mod:`varup.config.checks`, run by :func:`varup.config.schema.validate`), so
it has no ``*_enabled`` or ``check_*`` of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from varup.config.cluster import LAUNCH_KEYS
from varup.config.keys import deep_merge


# ---------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    """One training run of the image arm: a class-conditional VAR trained with a method's loss."""
    dataset: str
    depth: int
    method: str
    seed: int

    @property
    def path(self) -> str:
        return f"{self.dataset}/d{self.depth}/{self.method}/seed{self.seed}"


def main_runs(cfg: dict) -> list[Run]:
    """Table 2: every dataset x depth x method x seed."""
    return [Run(ds, int(depth), method, int(seed)) for ds in main_datasets(cfg) for depth in cfg["model"]["depths"]
            for method in cfg["methods"] for seed in cfg["seeds"]]


def main_datasets(cfg: dict) -> list[str]:
    """The datasets of Table 2 and `all`: every one but a study's own (``datasets.<name>.main: false``)."""
    return [name for name, d in cfg["datasets"].items() if d.get("main", True)]


def _num(v: float) -> str:
    return f"{v:g}"


def grid_method(l1: float, l2: float) -> str:
    return f"grid_l1-{_num(l1)}_l2-{_num(l2)}"


def method_with_loss(cfg: dict, loss: dict, new_name: str) -> str:
    """The configured method whose loss is exactly ``loss`` (its runs are reused), else ``new_name``."""
    return next((m for m, spec in cfg["methods"].items() if spec == loss), new_name)


def figure4_seeds(cfg: dict) -> list[int]:
    """The training seeds of Figure 4's grid and CFG sweep: ``experiments.figure4.seeds``, else the first seed."""
    return [int(s) for s in cfg["experiments"]["figure4"].get("seeds") or cfg["seeds"][:1]]


def grid_points(cfg: dict) -> dict[tuple[float, float], str]:
    """Figure 4's lambda_2nd x lambda_se grid -> the method that trains each point: an existing method when its
    loss is identical (e.g. (0, 0) is the baseline), else a derived ``grid_l1-*_l2-*`` method."""
    f4 = cfg["experiments"].get("figure4")
    if not f4:
        return {}
    base = cfg["methods"][f4["base_method"]]
    out = {}
    for a in f4["lambda_2nd"]:
        for b in f4["lambda_se"]:
            out[(a, b)] = method_with_loss(cfg, {**base, "lambda_2nd": a, "lambda_se": b}, grid_method(a, b))
    return out


def ablation_methods(cfg: dict) -> dict[str, dict]:
    """The extra methods Figure 4's grid needs (points not already trained as a configured method)."""
    f4 = cfg["experiments"].get("figure4")
    if not f4:
        return {}
    base = cfg["methods"][f4["base_method"]]
    return {m: {**base, "lambda_2nd": a, "lambda_se": b} for (a, b), m in grid_points(cfg).items()
            if m not in cfg["methods"]}


def ablation_runs(cfg: dict) -> list[Run]:
    """The runs of Figure 4's grid points that no configured method trains."""
    f4 = cfg["experiments"].get("figure4")
    if not f4:
        return []
    return [Run(f4["dataset"], int(f4["depth"]), method, seed) for method in ablation_methods(cfg)
            for seed in figure4_seeds(cfg)]


def runs(cfg: dict) -> list[Run]:
    """Every training run: Table 2's, then Figure 4's grid (without duplicates)."""
    return list(dict.fromkeys((*main_runs(cfg), *ablation_runs(cfg))))


def lambda_points(cfg: dict) -> dict[str, str]:
    """The λ study's points -> the method that trains each: a configured method when its loss is identical
    (so e.g. the baseline's seeds 0 and 1 are the default run's), else a derived ``lam_<point>`` method."""
    ls = cfg["experiments"].get("lambda_study")
    if not ls:
        return {}
    return {name: method_with_loss(cfg, loss, f"lam_{name}") for name, loss in ls["points"].items()}


def lambda_methods(cfg: dict) -> dict[str, dict]:
    ls = cfg["experiments"].get("lambda_study")
    return {m: dict(ls["points"][p]) for p, m in lambda_points(cfg).items() if m not in cfg["methods"]}


def lambda_runs(cfg: dict) -> list[tuple[str, Run]]:
    """(point, run) for every point x seed of the λ study."""
    ls = cfg["experiments"].get("lambda_study")
    if not ls:
        return []
    depth = int(ls.get("depth") or cfg["model"]["depths"][0])  # no depth: the first of model.depths
    return [(p, Run(ls["dataset"], depth, m, int(s))) for p, m in lambda_points(cfg).items() for s in ls["seeds"]]


def scaling_steps(cfg: dict) -> int | None:
    """The scaling study's own training steps (``experiments.scaling.steps``); None where its runs train with their
    dataset's ``train.steps`` and so are the configured methods' own runs (Table 2's at its depths), reused."""
    sc = cfg["experiments"].get("scaling")
    if not sc or sc.get("steps") is None or sc["dataset"] not in cfg["datasets"]:
        return None
    steps = int(sc["steps"])
    return None if steps == int(train_settings(cfg, sc["dataset"])["steps"]) else steps


def scaling_method(cfg: dict, method: str) -> str:
    """The method that trains a scaling run of configured ``method``: itself, or ``<method>_steps<N>`` when the
    study trains for its own N steps (another run specification, so another folder)."""
    steps = scaling_steps(cfg)
    return method if steps is None else f"{method}_steps{steps}"


def scaling_methods(cfg: dict) -> dict[str, dict]:
    """The extra methods of the scaling study (only when it has its own steps): the configured methods' losses."""
    if scaling_steps(cfg) is None:
        return {}
    return {scaling_method(cfg, m): dict(cfg["methods"][m]) for m in cfg["experiments"]["scaling"]["methods"]}


def scaling_runs(cfg: dict) -> list[tuple[str, Run]]:
    """(configured method, run) for every depth x method x seed of the scaling study (``experiments.scaling``;
    no depths: model.depths; no seeds: the config's seeds)."""
    sc = cfg["experiments"].get("scaling")
    if not sc:
        return []
    depths = [int(d) for d in sc.get("depths") or cfg["model"]["depths"]]
    seeds = [int(s) for s in sc.get("seeds") or cfg["seeds"]]
    return [(m, Run(sc["dataset"], d, scaling_method(cfg, m), s)) for d in depths for m in sc["methods"] for s in seeds]


def scaling_problems(cfg: dict) -> list[str]:
    """What stops the scaling study, each naming its key."""
    sc = cfg["experiments"].get("scaling")
    if not sc:
        return []
    out = []
    if sc["dataset"] not in cfg["datasets"]:
        out.append(f"experiments/scaling/dataset: {sc['dataset']!r} is not defined under datasets")
    out += [f"experiments/scaling/methods: {m!r} is not defined under methods" for m in sc["methods"]
            if m not in cfg["methods"]]
    if sc["baseline"] not in sc["methods"]:
        out.append(f"experiments/scaling/baseline: {sc['baseline']!r} is not one of experiments/scaling/methods "
                   f"{sc['methods']}")
    depths = sc.get("depths") or cfg["model"]["depths"]
    need = 4 if sc.get("form") == "offset" else 2
    if len(set(depths)) < need:
        out.append(f"experiments/scaling/depths: {depths} (or model/depths when it is not set): form "
                   f"{sc.get('form', 'power')} needs at least {need} depths")
    return out


def claim_method(arm: str) -> str:
    """The method folder of a claim-study arm: its own (the study trains for its own steps and keeps snapshots)."""
    return f"cs_{arm}"


def claim_methods(cfg: dict) -> dict[str, dict]:
    cs = cfg["experiments"].get("claim_study")
    return {claim_method(a): dict(loss) for a, loss in cs["arms"].items()} if cs else {}


def claim_runs(cfg: dict) -> list[tuple[str, Run]]:
    """(arm, run) for every arm x seed of the claim study (``experiments.claim_study``)."""
    cs = cfg["experiments"].get("claim_study")
    if not cs:
        return []
    depth = int(cs.get("depth") or cfg["model"]["depths"][0])
    return [(a, Run(cs["dataset"], depth, claim_method(a), int(s))) for a in cs["arms"] for s in cs["seeds"]]


def claim_snapshots(cfg: dict) -> list[int]:
    """The claim study's kept steps before the last (the last is the model itself), ascending."""
    cs = cfg["experiments"]["claim_study"]
    return sorted(int(s) for s in cs["snapshots"] if int(s) < int(cs["steps"]))


def claim_problems(cfg: dict) -> list[str]:
    """What stops the claim study, each naming its key."""
    cs = cfg["experiments"].get("claim_study")
    if not cs:
        return []
    key = "experiments/claim_study"
    ds = cfg["datasets"].get(cs["dataset"])
    if ds is None:
        return [f"{key}/dataset: {cs['dataset']!r} is not defined under datasets"]
    out = [] if ds["kind"] == "toy" else [f"{key}/dataset: {cs['dataset']!r} is a {ds['kind']} dataset; the study "
                                          "scores modes, which only a toy dataset knows"]
    out += [f"{key}/{k}: {cs[k]!r} is not one of the arms {sorted(cs['arms'])}" for k in ("baseline", "primary")
            if cs[k] not in cs["arms"]]
    reader = ds.get("mode_classifier")
    if reader and cfg["datasets"].get(reader, {}).get("kind") != "toy":
        out.append(f"datasets/{cs['dataset']}/mode_classifier: {reader!r} is not a toy dataset under datasets")
    grid = claim_settings(cfg)
    named = [("default_setting", cs["default_setting"])]
    named += [(f"curve_settings/{i}", c) for i, c in enumerate(cs["curve_settings"])]
    out += [f"{key}/{k}: {d} is not a point of the grid (temperatures x top_p x cfg, cfg above 1 only at "
            "guided_top_p)" for k, d in named if d not in grid]
    return out


def claim_settings(cfg: dict) -> list[dict]:
    """The claim study's sampling grid: temperatures x top_p x cfg, a cfg above 1 only at ``guided_top_p``."""
    cs = cfg["experiments"]["claim_study"]
    guided = cs["top_p"] if cs["guided_top_p"] is None else cs["guided_top_p"]
    return [{"temperature": t, "top_p": p, "cfg": c} for c in cs["cfg"] for p in cs["top_p"]
            if c == 1 or p in guided for t in cs["temperatures"]]


def all_methods(cfg: dict) -> dict[str, dict]:
    return {**cfg["methods"], **ablation_methods(cfg), **lambda_methods(cfg), **scaling_methods(cfg),
            **claim_methods(cfg)}


def cfg_sweep(cfg: dict) -> list[tuple[Run, float]]:
    """Figure 4's classifier-free-guidance sweep: (run, cfg) pairs sampled and scored at another CFG scale."""
    f4 = cfg["experiments"].get("figure4")
    if not f4:
        return []
    return [(Run(f4["dataset"], int(f4["depth"]), m, s), float(c))
            for m in f4["cfg_methods"] for s in figure4_seeds(cfg) for c in f4["cfg"]]


def ood_runs(cfg: dict) -> list[Run]:
    o = cfg["experiments"].get("ood")
    return [r for r in main_runs(cfg) if o and r.dataset == o["dataset"]]


def downstream_pairs(cfg: dict) -> list[tuple[str, int]]:
    d = cfg["experiments"].get("downstream")
    if not d:
        return []
    return [(d["dataset"], int(d.get("depth") or cfg["model"]["depths"][0]))]  # no depth: the first of model.depths


def train_settings(cfg: dict, dataset: str) -> dict:
    out = deep_merge(cfg["train"], cfg["datasets"][dataset].get("train"))
    out.setdefault("precision", cfg["precision"])
    return out


def sample_settings(cfg: dict, dataset: str) -> dict:
    return deep_merge(cfg["sample"], cfg["datasets"][dataset].get("sample"))


def model_settings(cfg: dict, depth: int) -> dict:
    m = cfg["model"]
    return {
        "depth": depth,
        "embed_dim": m["width_per_depth"] * depth,
        "num_heads": m["heads"] or depth,  # null: as many heads as blocks (official)
        "mlp_ratio": m["mlp_ratio"],
        "drop_path_rate": m["drop_path_rate"],
        "cond_drop_rate": m["cond_drop_rate"],
        "attn_l2_norm": m["attn_l2_norm"],
    }


def run_spec(cfg: dict, run: Run) -> dict:
    """The complete, JSON-able specification of one training job (varup.training.loop.RunSpec fields). Snakemake records
    it as a rule parameter, so editing anything in it re-runs exactly this job and what depends on it."""
    optim = {k: v for k, v in train_settings(cfg, run.dataset).items() if k not in LAUNCH_KEYS}
    if run.method in scaling_methods(cfg):  # the scaling study's own steps
        optim["steps"] = scaling_steps(cfg)
    if run.method in claim_methods(cfg):  # the claim study's own steps and kept snapshots
        optim.update(steps=int(cfg["experiments"]["claim_study"]["steps"]), snapshots=claim_snapshots(cfg))
    return {"model": model_settings(cfg, run.depth), "loss": dict(all_methods(cfg)[run.method]), "optim": optim,
            "seed": run.seed, "extra": {}}


def tokenizer_of(cfg: dict, dataset: str) -> tuple[str, dict]:
    name = cfg["datasets"][dataset]["tokenizer"]
    return name, cfg["tokenizers"][name]


def uncertainty_enabled(cfg: dict) -> bool:
    return bool(cfg["uncertainty"]["enabled"])


def uncertainty_runs(cfg: dict) -> list[Run]:
    """Runs that get the MC-dropout, DropPath-sweep and entanglement studies."""
    if not uncertainty_enabled(cfg):
        return []
    seeds = cfg["uncertainty"].get("run_seeds") or cfg["seeds"][:1]  # no run_seeds: the first seed
    return [r for r in main_runs(cfg) if r.seed in seeds]


def mode_runs(cfg: dict) -> list[Run]:
    """Runs whose samples are scored by the mode classifier (datasets that know their modes: the toy)."""
    if not uncertainty_enabled(cfg):
        return []
    return [r for r in main_runs(cfg) if cfg["datasets"][r.dataset]["kind"] == "toy"]


def toy_metrics_enabled(cfg: dict) -> bool:
    return bool(cfg["metrics"]["toy_features"]["enabled"])


def toy_runs(cfg: dict) -> list[Run]:
    """Runs scored in the toy mode classifier's feature space (``metrics.toy_features``): those of toy datasets."""
    if not toy_metrics_enabled(cfg):
        return []
    return [r for r in main_runs(cfg) if cfg["datasets"][r.dataset]["kind"] == "toy"]
