# Helpers shared by the rules: validated config, paths, run enumeration, JSON parameters.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

import varup.config as vc

# Validated (and completed with schema defaults) before any job starts; a bad key stops here, named.
vc.validate(config)

EXP = config["experiment"]
RES = f"{config['results_dir']}/{EXP}"
RSC = config["resources_dir"]
RUNS = list(vc.runs(config))
DATASETS = list(config["datasets"])
THREADS = config["threads"]
DEVICE = config["device"]

# Rules call the `varup` command. Without --sdm conda it is the one beside the interpreter running Snakemake
# (put first on PATH here, so the jobs need no activated environment); with --sdm conda, the environment's own.
envvars:
    "PATH",


if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
CONDA_ENV = "../../envs/varup.yaml"


wildcard_constraints:
    dataset="|".join(DATASETS),
    depth=r"\d+",
    method="|".join(config["methods"]),
    seed=r"\d+",
    shard=r"\d+",


def q(obj):
    """A JSON value quoted for the shell; as a rule parameter it also makes Snakemake re-run the rule when it changes."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def ds(w):
    return config["datasets"][w.dataset]


def run_of(w):
    return vc.Run(w.dataset, int(w.depth), w.method, int(w.seed))


def run_dir(w):
    return f"{RES}/{run_of(w).path}"


def kinds(*k):
    return [d for d in DATASETS if config["datasets"][d]["kind"] in k] or ["__none__"]


def all_outputs():
    return tables_and_figures()


def tokenizer_file(w):
    name, tok = vc.tokenizer_of(config, w.dataset)
    if tok["kind"] == "official":
        return f"{RSC}/weights/vae_ch160v4096z32.pth"
    return f"{RES}/{w.dataset}/tokenizer/vqvae.pt"


def sample_params(w):
    s = vc.sample_settings(config, w.dataset)
    return {k: s[k] for k in ("n_per_class", "batch_size", "cfg", "top_k", "top_p", "more_smooth")}


def shards_of(w):
    n = vc.sample_settings(config, w.dataset)["shards"]
    return [f"{run_dir(w)}/samples/shard{i}of{n}.npz" for i in range(n)]


def qualitative_params(w):
    s = vc.sample_settings(config, w.dataset)
    q_ = s.get("qualitative", {})
    return {"n_per_class": q_.get("n_per_class", 8), "batch_size": s["batch_size"], "cfg": q_.get("cfg", 3.0),
            "top_k": s["top_k"], "top_p": s["top_p"], "more_smooth": s.get("more_smooth", False)}


TABLES = ["table2", "table7", "codebook_calibration", "overhead"]
FIGURES = ["samples", "training_curves"]


def run_files(name):
    return [f"{RES}/{r.path}/{name}" for r in RUNS]


def tables_and_figures():
    return [f"{RES}/tables/{t}.{e}" for t in TABLES for e in ("csv", "md", "tex")] + [
        f"{RES}/figures/{f}.{e}" for f in FIGURES for e in ("png", "pdf")
    ]
