"""Every file a job reads is a declared input: editing a captions file re-runs `captions` and the text runs, and
every path-like key of the schema is either an input of the job that reads it (shown by a dry run of a config that
sets them all) or in one allowlist below, with the reason. Dry runs only: no job runs."""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from tinydag import REPO, planned_jobs, smk, tiny_config

#: a key is path-like when its last word (split at "_") is one of these (drop_path_rate is a rate)
PATH_WORDS = {"path", "paths", "dir", "dirs", "root", "roots", "folder", "folders", "file", "files", "url", "urls",
              "endpoint"}

#: path-like keys that name no file a job reads, and why
ALLOWLIST = {
    "results_dir": "where the jobs write (results/<experiment>/), not what they read",
    "resources_dir": "where fetched files are written; the fetch rules' outputs, the inputs of the jobs after them",
}


def path_keys(node: dict, schema: dict, prefix: str = "") -> set[str]:
    """Dotted keys (``*`` for a free key) of the schema whose name is path-like."""
    if "$ref" in node:
        target = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    out = set()
    for name, sub in (node.get("properties") or {}).items():
        key = f"{prefix}{name}"
        if name.lower().split("_")[-1] in PATH_WORDS:
            out.add(key)
        elif isinstance(sub, dict):
            out |= path_keys(sub, schema, key + ".")
    for sub in (node.get("additionalProperties"), node.get("items")):
        if isinstance(sub, dict):
            out |= path_keys(sub, schema, f"{prefix}*.")
    return out


def dry_run_files(out: str, field: str) -> set[str]:
    """Every path on the ``input:`` (or ``output:``) lines of a dry run's plan."""
    return {p for line in re.findall(rf"^\s+{field}: (.*)$", out, re.M) for p in line.split(", ")}


def test_every_path_like_key_of_the_schema_is_an_input_of_the_job_that_reads_it(tmp_path):
    schema = yaml.safe_load((REPO / "src" / "varup" / "config" / "schema.yaml").read_text())
    src = tmp_path / "src"

    def tree(*dirs: str) -> Path:
        for d in dirs:
            (src / d).mkdir(parents=True, exist_ok=True)
        return src / dirs[0]

    def file(name: str) -> Path:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("x\n")
        return src / name

    def url(name: str) -> str:
        return file(name).as_uri()

    cfg = tiny_config(tmp_path / "results")
    cfg["resources_dir"] = str(tmp_path / "resources")  # nothing fetched yet: every fetch rule is planned
    toy = cfg["datasets"]["shapes"]
    base = {"resolution": toy["resolution"], "tokenizer": toy["tokenizer"]}
    cfg["datasets"]["fold"] = {**base, "kind": "folder", "root": str(tree("fold", "fold/a/deep", "fold/b"))}
    cfg["datasets"]["inet"] = {**base, "kind": "imagenet100",
                               "root": str(tree("inet", "inet/train/n02869837", "inet/val/n02869837"))}
    cfg["datasets"]["afhq"] = {**base, "kind": "afhq", "download": {"url": url("afhq.zip")}}
    cfg["tokenizers"]["vq_official"] = {"kind": "official", "url": url("vae_test.pth")}
    cfg["weights"] = {"var_url": f"{src.as_uri()}/var_d{{depth}}.pth"}
    file("var_d1.pth")
    cfg["experiments"]["ood"]["source"] = {"kind": "folder", "root": str(tree("ood", "ood/sub"))}
    cfg["uncertainty"]["mask_dirs"] = {"shapes": str(tree("masks", "masks/d1/baseline/seed0"))}
    cfg["metrics"]["inception"]["url"] = url("inception.pth")
    text = cfg["text"]
    text["captions"] = {"kind": "file", "path": str(file("captions.csv"))}
    text["encoder"] = {"kind": "clip", "url": url("clip/ViT-L-14.pt")}
    text["prompts"]["cmmd"] = {"features": "clip", "url": url("clip/ViT-L-14-336px.pt")}
    text["released"] = {"url": url("varclip.pth")}  # VAR-CLIP's released model: on afhq, with the official tokenizer
    text["dataset"], cfg["datasets"]["afhq"]["tokenizer"] = "afhq", "vq_official"
    text["prompts"]["mask_dir"] = str(tree("pmasks", "pmasks/text_d16/released/seed0"))
    lm = cfg["lm"]
    lm["corpus"] = {"kind": "dolly", "url": url("dolly.jsonl"), "n_eval": 2}
    hub = {"kind": "hub", "endpoint": src.as_uri(), "files": ["config.json", "model.safetensors"]}
    lm["base"] = {**hub, "repo": "org/base"}
    lm["featurizer"] = {**hub, "repo": "org/feat"}
    for repo in ("org/base", "org/feat"):
        for f in hub["files"]:
            file(f"{repo}/resolve/main/{f}")
    expected = {  # key -> the paths the dry run must list as inputs
        "datasets.*.root": [src / "fold", src / "fold/a", src / "fold/a/deep", src / "fold/b", src / "inet",
                            src / "inet/train", src / "inet/val", src / "inet/train/n02869837",
                            src / "inet/val/n02869837"],
        "datasets.*.download.url": [src / "afhq.zip"],
        "tokenizers.*.url": [src / "vae_test.pth"],
        "weights.var_url": [src / "var_d1.pth"],
        "experiments.ood.source.root": [src / "ood", src / "ood/sub"],
        "uncertainty.mask_dirs": [src / "masks/d1/baseline/seed0"],
        "metrics.inception.url": [src / "inception.pth"],
        "text.captions.path": [src / "captions.csv"],
        "text.encoder.url": [src / "clip/ViT-L-14.pt"],
        "text.prompts.cmmd.url": [src / "clip/ViT-L-14-336px.pt"],
        "text.released.url": [src / "varclip.pth"],
        "text.prompts.mask_dir": [src / "pmasks/text_d16/released/seed0"],
        "lm.corpus.url": [src / "dolly.jsonl"],
        **{f"lm.{part}.{k}": [src / f"org/{part[:4]}/resolve/main/{f}" for f in hub["files"]]
           for part in ("base", "featurizer") for k in ("endpoint", "files")},
    }
    assert path_keys(schema, schema) == set(expected) | set(ALLOWLIST), (
        "a path-like key of the schema is neither checked here nor allowlisted: declare what it names as an input "
        "of the job that reads it and add it to `expected`, or add it to ALLOWLIST with the reason")

    res, rsc = f"{cfg['results_dir']}/{cfg['experiment']}", cfg["resources_dir"]
    targets = [f"{res}/{d}/data" for d in ("fold", "inet", "afhq")] + [
        f"{res}/shapes/ood_data", f"{res}/shapes/d1/baseline/seed0/uncertainty/mc_dropout.json",
        f"{res}/shapes/captions/captions.json", f"{rsc}/weights/vae_test.pth", f"{rsc}/weights/var_d1.pth", "prefetch",
        f"{res}/afhq/text_d16/released/seed0/prompts/sets.json"]
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(cfg))
    r = smk(tmp_path / "work", tmp_path / "all.yaml", "-n", *targets, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    inputs = {os.path.normpath(p) for p in dry_run_files(r.stdout, "input")}
    missing = {k: [str(p) for p in paths if str(p) not in inputs] for k, paths in expected.items()}
    assert not any(missing.values()), {k: v for k, v in missing.items() if v}


def test_editing_the_captions_file_re_runs_captions_and_the_text_runs(tmp_path):
    """A finished text run (its upstream jobs' outputs made as stand-ins and marked up to date with --touch): a
    dry run has nothing to do; after an edit of the captions file it plans exactly `captions` and `train_text`."""
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\ntrain/0.png,a circle\n")
    cfg = tiny_config(tmp_path / "results")
    cfg["text"].update(captions={"kind": "file", "path": str(captions)}, methods=["baseline"], seeds=[0])
    cfgfile = tmp_path / "text.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    target = f"{cfg['results_dir']}/{cfg['experiment']}/shapes/text_d1/baseline/seed0/model.pt"
    r = smk(work, cfgfile, "-n", target, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert {"captions", "train_text"} <= {rule for rule, _ in planned_jobs(r.stdout)}
    for out in dry_run_files(r.stdout, "output"):  # stand-ins: a folder where the path has no extension
        p = Path(out) if os.path.isabs(out) else work / out
        if not os.path.splitext(p.name)[1]:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    r = smk(work, cfgfile, "--touch", "--cores", "1", target, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    mtime = ("--rerun-triggers", "mtime", "input")  # what an edit of a file changes (not the code fingerprints,
    # which a library edit made while this test runs would change)
    r = smk(work, cfgfile, "-n", target, *mtime, timeout=300)
    assert r.returncode == 0 and planned_jobs(r.stdout) == [], r.stdout[-3000:]
    captions.write_text("path,caption\ntrain/0.png,a red circle\n")
    later = os.stat(captions).st_mtime + 60  # an edit after the run, whatever the clock's resolution
    os.utime(captions, (later, later))
    r = smk(work, cfgfile, "-n", target, *mtime, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert sorted(rule for rule, _ in planned_jobs(r.stdout)) == ["captions", "train_text"], r.stdout[-3000:]
