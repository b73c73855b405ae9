"""Where the claims ledger (:mod:`varup.report.claims`) finds the results of targets outside `all`, in one place.

The ledger is built by the `tables` rule, which is part of `all`; the λ study, the scaling study, the LM arm and the
claim study are their own targets. So the ledger reads their result files when they are present under the
experiment's results folder and never asks for them: declaring them as inputs would make `all` run those studies
(or re-run them whenever their code changes). Instead the `tables` rule carries :func:`fingerprint` of the present
files as a parameter, so Snakemake re-runs it (reason: params changed) when one of them appears, changes or goes.
The results folder belongs to one config file (:mod:`varup.config.ownership`), so a present file is this config's.

Standard library only: imported by the workflow at parse time.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

#: the study files of targets outside `all`, relative to results/<experiment>/ (globs where a study has many)
OPTIONAL_SOURCES = {
    "lambda_study": "lambda_study/lambda_study.json",  # target lambda_study (workflow/rules/lambda_study.smk)
    "scaling": "scaling/scaling.json",  # target scaling_study (workflow/rules/scaling.smk)
    "claim_study": "claim_study/claim_study.json",  # target claim_study (issue 25; its rules are the lead's)
    "lm": "lm/*/seed*/scores.json",  # target lm_study: lm/<method>/seed<seed>/scores.json (varup.config.lmplan)
}
#: the target that produces each source, named in the ledger when a source is absent
TARGETS = {"lambda_study": "lambda_study", "scaling": "scaling_study", "claim_study": "claim_study", "lm": "lm_study"}


def present(results: str, source: str) -> list[str]:
    """The files of ``source`` (a key of OPTIONAL_SOURCES) under ``results`` (results/<experiment>), sorted."""
    return sorted(glob.glob(os.path.join(results, OPTIONAL_SOURCES[source])))


def fingerprint(results: str) -> str:
    """sha256 of every present optional source file, as one JSON string (relative path -> digest): the `tables`
    rule's parameter that re-runs it when such a file appears, changes or goes ("{}" while there is none)."""
    out = {}
    for source in OPTIONAL_SOURCES:
        for f in present(results, source):
            with open(f, "rb") as fh:
                out[os.path.relpath(f, results)] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return json.dumps(out, sort_keys=True)
