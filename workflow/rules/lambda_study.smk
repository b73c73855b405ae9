# The λ study (experiments.lambda_study, issue 11): named loss settings x training seeds on a toy dataset, scored
# by mode coverage, KL, class error, toy-feature metrics and codebook usage, with t-intervals and paired
# differences to the baseline. Its own target, `snakemake lambda_study` (not part of `all`: it trains
# points x seeds runs; README has its measured time). Points whose loss equals a configured method reuse its runs.


localrules:
    lambda_study_table,


rule lambda_study_scores:
    input:
        [e[k] for e in lambda_entries() for k in (*LAMBDA_FILES, "tokens_meta")],
    output:
        f"{RES}/lambda_study/lambda_study.json",
    log:
        f"{RES}/logs/lambda_study/scores.log",
    benchmark:
        f"{RES}/benchmarks/lambda_study/scores.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("lambda_study_scores"),
    params:
        code=code_of("lambda-study"),
        entries=lambda w: q(lambda_entries()),
        losses=lambda w: q(LAMBDA["points"]),
        baseline=lambda w: LAMBDA["baseline"],
        confidence=lambda w: LAMBDA["confidence"],
    shell:
        "varup lambda-study --entries {params.entries} --losses {params.losses} --baseline {params.baseline}"
        " --confidence {params.confidence} --out {output} > {log} 2>&1"


rule lambda_study_table:
    input:
        f"{RES}/lambda_study/lambda_study.json",
    output:
        csv=f"{RES}/tables/lambda_study.csv",
        md=f"{RES}/tables/lambda_study.md",
        tex=f"{RES}/tables/lambda_study.tex",
        html=report(
            f"{RES}/tables/lambda_study.html",
            caption="../report/lambda_study.rst",
            category="Tables",
            labels={"table": "lambda_study"},
        ),
    log:
        f"{RES}/logs/lambda_study/table.log",
    benchmark:
        f"{RES}/benchmarks/lambda_study/table.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("tables"),
        cfg=lambda w: q(reporting.report_config(config)),
        results=lambda w: RES,
        out=lambda w, output: os.path.dirname(output.csv),
    shell:
        "varup tables --only lambda_study --config {params.cfg} --results {params.results} --out {params.out}"
        " > {log} 2>&1"
