# varup — rebuild every table and figure of "Uncertainty Preservation in Generative Visual Autoregression".
#
#   snakemake --cores 2                              # the embedded toy experiment (config/config.yaml)
#   snakemake --configfile config/paper.yaml ...     # the paper configuration
#   snakemake --report results/toy/report.html       # the HTML report with every table and figure
#
# This file only wires: the library (src/varup) computes; each rule calls `python -m varup <stage>`.
import os
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")


# The embedded toy experiment is the default; a --configfile REPLACES it (it is not merged into it).
if not workflow.config_settings.configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/uncertainty.smk"
include: "workflow/rules/paper.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/lambda_study.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/claim_study.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/lm.smk"
include: "workflow/rules/digits.smk"


# `snakemake --report` before the workflow has run: say so (instead of Snakemake's "Missing metadata" warnings and a
# failure on the first missing table).
if reporting.report_requested(sys.argv) and (why := reporting.unfinished_report(all_outputs())):
    raise WorkflowError(why)


rule all:
    default_target: True
    input:
        all_outputs(),


rule lambda_study:
    """The λ study of experiments.lambda_study (not part of all: points x seeds training runs)."""
    input:
        [f"{RES}/tables/lambda_study.{e}" for e in ("csv", "md", "tex")] if LAMBDA else [],


rule scaling_study:
    """The scaling study of experiments.scaling (not part of all: depths x methods x seeds training runs)."""
    input:
        scaling_outputs(),


rule claim_study:
    """The claim study of experiments.claim_study (not part of all: arms x seeds training runs on its own dataset)."""
    input:
        claim_outputs(),


rule prompt_study:
    """The text-conditioned VAR and the companion study's prompt experiments (config text; not part of all)."""
    input:
        [f"{RES}/tables/{t}.{e}" for t in PROMPT_TABLES for e in ("csv", "md", "tex", "html")] if TEXT_ON else [],
        [f"{RES}/figures/prompt_sigma.{e}" for e in ("png", "pdf")] if TEXT_ON else [],


rule lm_study:
    """The LM arm, the paper's Table 6 (config lm; not part of all)."""
    input:
        [f"{RES}/tables/table6.{e}" for e in ("csv", "md", "tex", "html")] if LM_ON else [],
        [f"{RES}/figures/lm_modes.{e}" for e in ("png", "pdf")] if LM_ON else [],


rule digits:
    """The digits rehearsal's table (datasets of kind digits: config/digits.yaml; not part of all)."""
    input:
        DIGITS_TABLE,


rule prefetch:
    """Download everything the chosen config needs (run on a login node; compute jobs then stay offline)."""
    input:
        prefetch_files(),
