# Helpers shared by the rules: validated config, paths, run enumeration, JSON parameters.
import atexit
import json
import os
import re
import shlex
import sys
import urllib.parse
import urllib.request

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod

# The library is this workflow's own src/, whether or not (and however) varup is installed: first on sys.path of
# this process, and for the jobs on PYTHONPATH and VARUP_SRC (Snakemake drops PYTHONPATH in conda jobs; the conda
# env reads VARUP_SRC instead, see envs/varup.post-deploy.sh). So the rules always run this checkout's code.
VARUP_SRC = os.path.abspath(os.path.join(workflow.basedir, "src"))
sys.path.insert(0, VARUP_SRC)
os.environ["VARUP_SRC"] = VARUP_SRC
os.environ["PYTHONPATH"] = os.pathsep.join(
    [VARUP_SRC] + [d for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d and d != VARUP_SRC]
)
try:
    from varup.config import checks, cluster, plan, reporting, schema
except ImportError as e:
    raise WorkflowError(
        f"{e}: {sys.executable} runs Snakemake but lacks what varup.config needs (pyyaml, "
        "jsonschema); run `bash scripts/setup.sh`, or `pip install -c requirements.lock pyyaml jsonschema`"
    )

# Validated (and completed with schema defaults) before any job starts; a bad key stops here, named.
schema.validate(config)

import varup.config.ownership as own
import varup.config.runlock as runlock

# code_of("<varup subcommand>") is the fingerprint of the code that command runs: the rules that run the library
# record it as the parameter `code`, so editing that code re-runs them ("params changed") and what depends on them
# (varup.base.codehash).
from varup.base.codehash import code_of

EXP = config["experiment"]
RES = f"{config['results_dir']}/{EXP}"
RSC = config["resources_dir"]

# results/<experiment>/ belongs to one configuration: another one under the same experiment name would overwrite
# its results, so it is refused here, naming the key to change; a run that starts jobs records itself as the owner
# (varup.config.ownership). Editing the owning config file is fine: Snakemake re-runs what changed.
OWNER = own.owner_record(config, workflow.configfiles, os.getcwd())
if workflow.is_main_process:
    own.check_owner(RES, OWNER)
    if held := runlock.held_by_other(RES):  # a dry run is not refused; it says what a real run would meet
        logger.warning(f"Warning: {held}")

# One Snakemake run writes results/<experiment>/ at a time, whatever its working folder (Snakemake's own lock is per
# working folder): the run that starts jobs takes results/<experiment>/.varup-lock.json before the first one, or stops
# naming the run that holds it (varup.config.runlock). onstart runs in the main process only, never on a dry run
# and never in a job (job processes and Slurm job steps run with --no-hooks); the lock is released on success, on
# error and on Ctrl-C (onerror), and at exit whatever happened.
RUN_LOCK = {}
RES_ABS = os.path.abspath(RES)  # Snakemake is back in the folder it was started from when atexit runs


def hold_results():
    record = runlock.holder_record(os.getcwd(), [os.path.abspath(f) for f in workflow.configfiles])
    try:
        stale = runlock.acquire(RES_ABS, record)
    except runlock.LockHeld as e:
        raise WorkflowError(str(e))
    RUN_LOCK.update(record)
    atexit.register(runlock.release, RES_ABS, record)
    if stale:
        gone = runlock.describe(stale)
        logger.warning(f"Warning: took over {runlock.lock_path(RES_ABS)} from a run that is gone: {gone}")
    try:
        own.check_owner(RES, OWNER)  # again, now that no other run can claim it between the check and the claim
    except Exception:
        runlock.release(RES_ABS, record)
        raise
    own.claim(RES, OWNER)


onstart:
    hold_results()


onsuccess:
    runlock.release(RES_ABS, RUN_LOCK)


onerror:
    runlock.release(RES_ABS, RUN_LOCK)


RUNS = list(plan.runs(config))
DATASETS = list(config["datasets"])
MAIN_DATASETS = plan.main_datasets(config)  # those of Table 2 and `all` (a study's own dataset: main false)
THREADS = config["threads"]
SERIAL_THREADS = config["serial_threads"]
# --device of the jobs: GPU rules pass GPU_DEVICE, which (device auto) refuses to fall back to the CPU in a Slurm job
# or where GPUs were allocated, unless allow_cpu_fallback (varup.config.cluster.job_device, varup.base.runtime.resolve_device)
DEVICE = cluster.job_device(config, gpu_rule=False)
GPU_DEVICE = cluster.job_device(config, gpu_rule=True)
# config `deterministic` reaches every job as VARUP_DETERMINISTIC (varup.cli main: varup.base.runtime.set_deterministic)
DETERMINISTIC = "1" if config["deterministic"] else "0"
os.environ["VARUP_DETERMINISTIC"] = DETERMINISTIC


# Rules call the `varup` command. Without --sdm conda it is the one beside the interpreter running Snakemake
# (put first on PATH here, so the jobs need no activated environment); with --sdm conda, the environment's own
# launcher (`python -m varup`, written by envs/varup.post-deploy.sh).
envvars:
    "PATH",
    "PYTHONPATH",
    "VARUP_SRC",
    "VARUP_DETERMINISTIC",


if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
CONDA_ENV = "../../envs/varup.yaml"


wildcard_constraints:
    dataset="|".join(DATASETS),
    depth=r"\d+",
    method="|".join(re.escape(m) for m in plan.all_methods(config)),
    seed=r"\d+",
    shard=r"\d+",


def q(obj):
    """A JSON value quoted for the shell; as a rule parameter it also makes Snakemake re-run the rule when it changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def ds(w):
    return config["datasets"][w.dataset]


def preprocess_of(w):
    """A dataset's preprocess section; none (the section has no schema default): the images as they are."""
    return ds(w).get("preprocess", {})


# Every file a job reads is a declared input, so editing it re-runs the job and what follows (tests/test_inputs.py
# holds every path-like key of the schema to this): image trees by their folders (source_tree), a captions file as
# itself, and the file:// URL of a download as the local file it names (local_source). An http(s) URL is no input,
# since the fetched file's sha256 (pinned in the config, or recorded on first use) stands for its content.
def required_dirs(*keys):
    """An input function for the image trees a job reads (config keys, formatted with its wildcards): checked when
    the DAG is built (a placeholder path fails here, naming the key, not in a queued job), then declared as inputs
    by their folders (source_tree)."""

    def inputs(w):
        named = [k.format(**w) for k in keys]
        checks.check_dirs(config, named)
        return [d for k in named for d in source_tree(k)]

    return inputs


def source_tree(key):
    """The folders of the image tree at config key `key` that its job lists: the root and every folder below it.
    A folder's mtime changes when an entry in it is added, removed or renamed, so such an edit re-runs the job; an
    image rewritten in place keeps its folder's mtime (re-run that job with -R). ImageNet-100: the root, train/,
    val/ and the folders of the 100 classes it reads, not the 900 others of an ImageNet-1k root."""
    root = checks.get_key(config, key)
    if root is None:
        return []
    root = os.path.expanduser(str(root))
    kind = checks.get_key(config, key.rsplit(".", 1)[0] + ".kind") if key.endswith(".root") else None
    if kind == "imagenet100":
        splits = [os.path.join(root, s) for s in ("train", "val")]
        classes = [os.path.join(s, w) for s in splits for w in imagenet100_wnids()]
        return [root, *splits, *(d for d in classes if os.path.isdir(d))]
    out = []
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # hidden folders are not read
        out.append(folder)
    return out


def imagenet100_wnids():
    """The wnids of the shipped ImageNet-100 class list (varup.data.prepare.read_class_list reads the same file)."""
    with open(os.path.join(VARUP_SRC, "varup", "data", "imagenet100.txt")) as f:
        return [x.strip() for x in f if x.strip() and not x.lstrip().startswith("#")]


def local_source(url, key):
    """The local file a file:// URL (config key `key`) names, as an input list: the fetch rule re-runs when that
    file changes, and then stops where its pinned or recorded sha256 no longer matches, naming the key. Any other
    URL: no input."""
    if not url or urllib.parse.urlparse(url).scheme != "file":
        return []
    path = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    if not os.path.isfile(path):
        raise WorkflowError(f"{key}: {url} names no existing file")
    return [path]


def captions_source(w):
    """text.captions.path when the captions come from a file (kind file): the captions job reads it."""
    c = config["text"]["captions"]
    if c["kind"] != "file":
        return []
    if not os.path.isfile(path := c.get("path", "")):
        raise WorkflowError(f"text.captions.path: {path or 'not set'} is not an existing file (captions kind file)")
    return [path]


def run_of(w):
    return plan.Run(w.dataset, int(w.depth), w.method, int(w.seed))


def run_dir(w):
    return f"{RES}/{run_of(w).path}"


def kinds(*k):
    return [d for d in DATASETS if config["datasets"][d]["kind"] in k] or ["__none__"]


def all_outputs():
    return tables_and_figures()


def _stem(url):
    return os.path.splitext(os.path.basename(url.split("?")[0]))[0]


def tokenizer_file(w):
    name, tok = plan.tokenizer_of(config, w.dataset)
    if tok["kind"] == "official":
        return f"{RSC}/weights/{_stem(tok['url'])}.pth"
    return f"{RES}/{w.dataset}/tokenizer/vqvae.pt"


def mode_classifier_file(w):
    """The mode classifier that reads a toy dataset's images: its own, or the one `mode_classifier` names."""
    return f"{RES}/{ds(w).get('mode_classifier') or w.dataset}/mode_classifier.pt"


def tokenizer_gate_file(w):
    """The gate's JSON where the dataset has a tokenizer gate (toy datasets), else nothing: encoding waits for it."""
    return [f"{RES}/{w.dataset}/tokenizer/gate.json"] if ds(w)["tokenizer_gate"] else []


def weights_source(name):
    """(url, sha256 or None, config key of the sha256, config key of the url) of a file fetched into
    resources/weights/."""
    for tname, tok in config["tokenizers"].items():
        if tok["kind"] == "official" and _stem(tok["url"]) == name:
            return tok["url"], tok["sha256"], f"tokenizers.{tname}.sha256", f"tokenizers.{tname}.url"
    if name.startswith("var_d") and name[5:].isdigit():
        d = name[5:]
        w = config["weights"]
        return w["var_url"].format(depth=d), w["var_sha256"].get(d), f"weights.var_sha256.{d}", "weights.var_url"
    raise ValueError(f"no download source configured for resources/weights/{name}.pth")


def warm_start(dataset):
    """train.warm_start of a dataset's runs (a train key: no schema default; not set, the trainer starts from scratch)."""
    return bool(plan.train_settings(config, dataset).get("warm_start"))


def warm_start_file(w):
    if not warm_start(w.dataset):
        return []
    return [f"{RSC}/weights/var_d{w.depth}.pth"]


def sample_params(w):
    s = plan.sample_settings(config, w.dataset)
    return {k: s[k] for k in ("n_per_class", "batch_size", "cfg", "top_k", "top_p", "more_smooth", "precision")}


def shards_of(w):
    n = plan.sample_settings(config, w.dataset)["shards"]
    return [f"{run_dir(w)}/samples/shard{i}of{n}.npz" for i in range(n)]


def qualitative_params(w):
    s = plan.sample_settings(config, w.dataset)
    q_ = s["qualitative"]
    return {
        "n_per_class": q_["n_per_class"],
        "batch_size": s["batch_size"],
        "cfg": q_["cfg"],
        "top_k": s["top_k"],
        "top_p": s["top_p"],
        "more_smooth": s["more_smooth"],
        "precision": s["precision"],
    }


GPU = cluster.cluster_resources(config, gpu=True)  # Slurm partition/account of GPU and CPU rules (config.cluster)
CPU = cluster.cluster_resources(config, gpu=False)
TRAIN_CMD, TRAIN_RES = cluster.train_launch(config)


# The Slurm sizes of the submitted rules come from the config (cluster.sizes, cluster.all, cluster.rules: README "On a
# Slurm cluster"), as resources of the rules, so a profile or the command line adds keys and removes none (a profile's
# set-resources still wins for the keys it names). Memory and time grow with the attempt (size x attempt, capped by
# cluster.max_mem_mb / max_runtime_min): a job that ran out of either gets more on the retry.
def res(rule):
    """A submitted rule's gpu, cpus_per_task, mem_mb, runtime and the other cluster keys of the config."""
    return cluster.rule_resources(config, rule)


def train_res(rule):
    """A training rule's resources: the launch's (train.gpus/nodes, cluster.train_*) with the config's for the rule."""
    return cluster.launch_resources(config, rule, TRAIN_RES)


TRAIN_STOP_S = int(config["train"]["stop_before_limit_s"])  # a resource
EXPERIMENTS = config["experiments"]
TABLES = (
    ["claims", "table2", "table7", "codebook_calibration", "overhead", "loss_references"]  # claims: the ledger
    + (["table3"] if "ood" in EXPERIMENTS else [])
    + (["figure4"] if "figure4" in EXPERIMENTS else [])
)
UNC = config["uncertainty"]
UNC_RUNS = plan.uncertainty_runs(config)
MODE_RUNS = plan.mode_runs(config)
TOY_RUNS = plan.toy_runs(config)
TOY_DATASETS = sorted({r.dataset for r in TOY_RUNS})
TABLES += (
    (["uncertainty_droppath", "uncertainty_region", "uncertainty_entanglement"] if UNC_RUNS else [])
    + (["mode_coverage"] if MODE_RUNS else [])
    + (["toy_metrics"] if TOY_RUNS else [])
)
FIGURES = (
    ["samples", "training_curves"]
    + (["figure4"] if "figure4" in EXPERIMENTS else [])
    + (["mc_dropout_sigma", "droppath_sweep"] if UNC_RUNS else [])
)
CFG_SWEEP = plan.cfg_sweep(config)
OOD_RUNS = plan.ood_runs(config)
DOWNSTREAM = plan.downstream_pairs(config)


def run_files(name):
    return [f"{RES}/{r.path}/{name}" for r in RUNS]


def cfg_sweep_files(name):
    return [f"{RES}/{r.path}/cfg_sweep/cfg{c:g}/{name}" for r, c in CFG_SWEEP]


def downstream_files():
    return [
        f"{RES}/figures/downstream_{ds_}_d{depth}_{t}.{e}"
        for ds_, depth in DOWNSTREAM
        for t in EXPERIMENTS["downstream"]["tasks"]
        for e in ("png", "pdf")
    ]


def prefetch_files():
    """Everything the chosen config downloads (datasets, official weights, Inception weights)."""
    out = [f"{RSC}/inception/inception.json"]
    out += [f"{RSC}/datasets/{d}/archive.json" for d in kinds("afhq") if d != "__none__"]
    out += sorted(
        {
            tokenizer_file(type("W", (), {"dataset": d}))
            for d in DATASETS
            if plan.tokenizer_of(config, d)[1]["kind"] == "official"
        }
    )
    out += sorted({f"{RSC}/weights/var_d{r.depth}.pth" for r in RUNS if warm_start(r.dataset)})
    if TEXT_ON:  # CLIP weights: VAR-CLIP's text encoder and CMMD's image encoder, where configured
        out += text_encoder_weights(None) + varclip_checkpoint()
        if PROMPTS["cmmd"]["features"] == "clip":
            out.append(clip_file("ViT-L-14-336"))
    if LM_ON:  # the LM arm: dolly-15k and the hub models (base, MAUVE featurizer)
        out += [] if lmr.is_toy(config) else [f"{RSC}/dolly/databricks-dolly-15k.jsonl"]
        out += [f"{lmr.hub_dir(config, p)}/varup_fetch.json" for p in ("base", "featurizer") if LM[p]["kind"] == "hub"]
    return out


def tables_and_figures():
    return (
        [f"{RES}/tables/{t}.{e}" for t in TABLES for e in ("csv", "md", "tex", "html")]
        + [f"{RES}/figures/{f}.{e}" for f in FIGURES for e in ("png", "pdf")]
        + downstream_files()
    )


def bench_args():
    """Command-line options of `python -m varup.bench.suite all` from the config's bench section."""
    b = config["bench"]
    opts = {
        "depth": "--depth",
        "batch": "--batch",
        "sample_batch": "--sample-batch",
        "encode_batch": "--encode-batch",
        "repeats": "--repeats",
        "warmup": "--warmup",
    }
    args = [f"{flag} {int(b[k])}" for k, flag in opts.items() if b[k] is not None]
    args += ["--compile"] if b["compile"] else []
    args += [] if b["plain"] else ["--skip-plain"]
    return " ".join(args)


def inception_metric_params():
    """The metrics settings of the Inception-feature rules (evaluate, score_uncertainty_sets): without
    toy_features, so editing those re-runs only the toy-feature rules."""
    return {k: v for k, v in config["metrics"].items() if k != "toy_features"}


def toy_metric_params(w):
    """Reference set (the one real_features uses) and metric settings of the toy-feature rules."""
    m = config["metrics"]
    return {
        "split": ds(w)["metrics_real_split"],
        "max_images": m["real_max_images"],
        "resolution": ds(w)["resolution"],
        "batch_size": m["batch_size"],
        **{k: m[k] for k in ("kid_subsets", "kid_subset_size", "prc_neighborhood", "prdc_nearest_k")},
    }


def toy_floor_params(w):
    """toy_metric_params plus the floor set: n_per_class images per class (a run's sample size) of floor_split."""
    t = config["metrics"]["toy_features"]
    return {
        **toy_metric_params(w),
        "floor_split": t["floor_split"],
        "n_per_class": plan.sample_settings(config, w.dataset)["n_per_class"],
    }


def unc_mask_dir(w):
    """The folder of object masks for this run's MC-dropout mean images (uncertainty.mask_dirs), or None."""
    root = UNC["mask_dirs"].get(w.dataset)
    return os.path.join(root, f"d{w.depth}", w.method, f"seed{w.seed}") if root else None


def unc_common(w):
    """Sampling settings shared by the uncertainty studies of a dataset."""
    s = plan.sample_settings(config, w.dataset)
    return {"cfg": s["cfg"], "top_k": s["top_k"], "top_p": s["top_p"], "more_smooth": s["more_smooth"]}


# The λ study (workflow/rules/lambda_study.smk): its (point, run) pairs and the files it scores.
LAMBDA = EXPERIMENTS.get("lambda_study")
LAMBDA_RUNS = plan.lambda_runs(config)
LAMBDA_FILES = {
    "mode_coverage": "mode_coverage.json",
    "toy_metrics": "toy_metrics.json",
    "samples": "samples.npz",
    "summary": "train/summary.json",
}


def lambda_entries():
    return [
        {
            "point": p,
            "seed": r.seed,
            "run": r.path,
            "tokens_meta": f"{RES}/{r.dataset}/tokens/meta.json",
            **{k: f"{RES}/{r.path}/{f}" for k, f in LAMBDA_FILES.items()},
        }
        for p, r in LAMBDA_RUNS
    ]


# The scaling study (workflow/rules/scaling.smk): its (method, run) pairs, the per-run held-out files, the target's files.
SCALING = EXPERIMENTS.get("scaling")
SCALING_RUNS = plan.scaling_runs(config)
if scaling_problems := plan.scaling_problems(config):
    raise WorkflowError("; ".join(scaling_problems) + " (fix them in the config file)")


def scaling_entries():
    return [
        {"method": m, "depth": r.depth, "seed": r.seed, "run": r.path, "heldout": f"{RES}/{r.path}/heldout.json"}
        for m, r in SCALING_RUNS
    ]


def scaling_outputs():
    """The target's files: the table (csv, md, tex, html) and the figure (png, pdf)."""
    if not SCALING:
        return []
    tables = [f"{RES}/tables/scaling.{e}" for e in ("csv", "md", "tex", "html")]
    return tables + [f"{RES}/figures/scaling.{e}" for e in ("png", "pdf")]


# The claim study (workflow/rules/claim_study.smk): its (arm, run) pairs and the per-run grid files.
CLAIM = EXPERIMENTS.get("claim_study")
CLAIM_RUNS = plan.claim_runs(config)
if claim_problems := plan.claim_problems(config):
    raise WorkflowError("; ".join(claim_problems) + " (fix them in the config file)")


def claim_entries():
    return [{"arm": a, "seed": r.seed, "run": r.path, "grid": f"{RES}/{r.path}/claim_grid.json"} for a, r in CLAIM_RUNS]


def claim_grid_params(w):
    """The grid, the default setting, the run's kept snapshots, the sampling and scoring settings of one run."""
    s = plan.sample_settings(config, w.dataset)
    settings = plan.claim_settings(config)
    snaps = [[n, f"{run_dir(w)}/train/snapshots/step{n}.pt"] for n in plan.claim_snapshots(config)]
    sampling = {"n_per_class": CLAIM["n_per_class"], "batch_size": CLAIM["batch_size"], "seed": int(w.seed)}
    return {
        "settings": settings,
        "default": CLAIM["default_setting"],
        "curve_settings": CLAIM["curve_settings"],
        "snapshots": snaps,
        "sampling": {**sampling, "top_k": s["top_k"]},
        "rare_share": CLAIM["rare_share"],
        "memorisation_quantile": CLAIM["memorisation_quantile"],
        "metrics": toy_metric_params(w),
    }


def claim_outputs():
    """The target's files: the table (csv, md, tex, html) and the figure (png, pdf)."""
    if not CLAIM:
        return []
    tables = [f"{RES}/tables/claim_study.{e}" for e in ("csv", "md", "tex", "html")]
    return tables + [f"{RES}/figures/claim_study.{e}" for e in ("png", "pdf")]


# The text arm, the text-conditioned VAR, and the prompt study (prompts.smk; varup.config.textplan): runs, CLIP weight
# files, CMMD inputs. Like the LM arm's below: its problems stop the DAG here, naming the key; no runs when it is off.
import varup.config.textplan as vt

TEXT = config["text"]
TEXT_ON = vt.text_enabled(config)
vt.check_text(config)
TEXT_RUNS = vt.text_runs(config)
STUDY_RUNS = vt.study_runs(config)
PROMPTS = TEXT["prompts"]
PROMPT_TABLES = ["prompt_droppath", "prompt_entanglement", "prompt_descriptiveness"]
CLIP_FILES = {"ViT-L-14": "ViT-L-14.pt", "ViT-L-14-336": "ViT-L-14-336px.pt"}  # varup.models.clip.CLIP_WEIGHTS


def text_run_of(w):
    return vt.TextRun(w.dataset, int(w.depth), w.method, int(w.seed))


def clip_file(name):
    return f"{RSC}/clip/{CLIP_FILES[name]}"


def clip_url(file):
    """(url or None, its config key) of a CLIP weights file: text.encoder for the text tower, text.prompts.cmmd for
    CMMD's (varup.config.textplan.clip_source); None: the registry's URL."""
    if file == CLIP_FILES["ViT-L-14"]:
        return TEXT["encoder"].get("url"), "text.encoder.url"
    return PROMPTS["cmmd"].get("url"), "text.prompts.cmmd.url"


def text_encoder_weights(w):
    return [clip_file(TEXT["encoder"]["arch"])] if TEXT["encoder"]["kind"] == "clip" else []


def cmmd_inputs(w):
    """The CMMD feature network: CLIP ViT-L/14@336 (standard CMMD) or the toy mode classifier (toy-CMMD)."""
    if PROMPTS["cmmd"]["features"] == "clip":
        return {"clip": clip_file("ViT-L-14-336")}
    return {"classifier": mode_classifier_file(w)}


def cmmd_flags(input):
    return f"--clip-weights {input.clip}" if "clip" in input.keys() else f"--classifier {input.classifier}"


def study_model(w):
    return f"{RES}/{w.dataset}/{w.fam}d{w.depth}/{w.method}/seed{w.seed}/model.pt"


def varclip_checkpoint():
    """VAR-CLIP's released checkpoint as rule varclip_weights fetches it (text.released), or nothing."""
    r = TEXT.get("released")
    return [f"{RSC}/varclip/var_clip_d{r['depth']}.pth"] if r and TEXT_ON else []


def prompt_mask_dir(w):
    """The folder of object masks of a study run's prompt-set mean images (text.prompts.mask_dir), or None."""
    root = PROMPTS.get("mask_dir")
    return os.path.join(root, f"{w.fam}d{w.depth}", w.method, f"seed{w.seed}") if root else None


# The LM arm (lm.smk; varup.config.lmplan): Table 6's runs.
import varup.config.lmplan as lmr

LM = config["lm"]
LM_ON = lmr.lm_enabled(config)
lmr.check_lm(config)
LM_RUNS = lmr.lm_runs(config)
LM_METHODS = list(lmr.lm_methods(config)) if LM_ON else ["baseline"]  # (a wildcard constraint needs one)


def lm_run_of(w):
    return lmr.LMRun(w.method, int(w.seed))


def lm_part_input(part):
    """lm.base or lm.featurizer as an input: the toy's pre-trained folder, or the fetched hub folder's record."""
    if LM[part]["kind"] == "toy":
        return f"{RES}/lm/{part}"
    return f"{lmr.hub_dir(config, part)}/varup_fetch.json"


def lm_base_input(w=None):
    return lm_part_input("base")


def lm_featurizer_input(w=None):
    return lm_part_input("featurizer")


def lm_folder(path):
    """A model folder from its input: the folder itself, or the folder of a hub record."""
    return os.path.dirname(path) if path.endswith("varup_fetch.json") else path


def lm_hub_part(w):
    """Which of lm.base / lm.featurizer a fetched folder is."""
    return next(p for p in ("base", "featurizer") if os.path.basename(lmr.hub_dir(config, p)) == w.repo)


def hub_sources(part):
    """The local files of a hub model fetched from a file:// endpoint (a local mirror in the hub's resolve layout,
    varup.lm.hub.hub_file_url), as inputs; none from a hub server."""
    p = LM[part]
    base = os.path.join(p["endpoint"], p["repo"], "resolve", p["revision"])
    return [x for f in lmr.hub_files(config, part) for x in local_source(f"{base}/{f}", f"lm.{part}.endpoint")]


def lm_model_input(w):
    return lm_base_input() if w.method == lmr.ZERO_SHOT else f"{RES}/lm/{w.method}/seed{w.seed}/model"
