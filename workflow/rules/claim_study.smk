# The claim study (experiments.claim_study, issue 25): a regime where cross-entropy collapses (a long-tailed toy
# dataset, trained past convergence), every run sampled over a temperature x top-p x cfg grid and scored for quality and
# diversity, the arms compared with the baseline by their frontiers (paired by seed, p-values corrected), and the
# baseline's collapse curve over its kept snapshots. Its own target, `snakemake claim_study` (not part of `all`).
# README: "Does the objective move the frontier?".


localrules:
    claim_study_report,


rule claim_grid:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",  # written after its snapshots
        tokenizer=tokenizer_file,
        classifier=mode_classifier_file,
        data=f"{RES}/{{dataset}}/data",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/claim_grid.json",
    log:
        f"{RES}/logs/claim_study/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/claim_study/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("claim_grid"),
    params:
        code=code_of("claim-grid"),
        device=GPU_DEVICE,
        p=lambda w: q(claim_grid_params(w)),
    shell:
        "varup claim-grid --threads {threads} --device {params.device} --model {input.model}"
        " --tokenizer {input.tokenizer} --classifier {input.classifier} --data {input.data}"
        " --run {wildcards.dataset}/{wildcards.depth}/{wildcards.method}/{wildcards.seed} --params {params.p}"
        " --out {output} > {log} 2>&1"


rule claim_study_scores:
    input:
        [e["grid"] for e in claim_entries()],
    output:
        f"{RES}/claim_study/claim_study.json",
    log:
        f"{RES}/logs/claim_study/scores.log",
    benchmark:
        f"{RES}/benchmarks/claim_study/scores.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("claim_study_scores"),
    params:
        code=code_of("claim-study"),
        entries=lambda w: q(claim_entries()),
        p=lambda w: q(
            {
                **{k: CLAIM[k] for k in ("baseline", "primary", "quality", "diversity", "confidence")},
                **{k: CLAIM[k] for k in ("correction", "planning_sd")},
                "setting": f"{CLAIM['dataset']} (mode_zipf {config['datasets'][CLAIM['dataset']]['generator'].get('mode_zipf', 0)}), {len(CLAIM['seeds'])} seeds",
            }
        ),
    shell:
        "varup claim-study --entries {params.entries} --params {params.p} --out {output} > {log} 2>&1"


rule claim_study_report:
    input:
        f"{RES}/claim_study/claim_study.json",
    output:
        csv=f"{RES}/tables/claim_study.csv",
        md=f"{RES}/tables/claim_study.md",
        tex=f"{RES}/tables/claim_study.tex",
        html=report(
            f"{RES}/tables/claim_study.html",
            caption="../report/claim_study.rst",
            category="Tables",
            labels={"table": "claim_study"},
        ),
        png=report(
            f"{RES}/figures/claim_study.png",
            caption="../report/claim_study.rst",
            category="Figures",
            labels={"figure": "claim_study"},
        ),
        pdf=f"{RES}/figures/claim_study.pdf",
    log:
        f"{RES}/logs/claim_study/report.log",
    benchmark:
        f"{RES}/benchmarks/claim_study/report.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("varup.report.claimstudy"),
        tables=lambda w, output: os.path.dirname(output.csv),
        figures=lambda w, output: os.path.dirname(output.png),
    shell:
        "python -m varup.report.claimstudy --study {input} --tables {params.tables} --figures {params.figures}"
        " > {log} 2>&1"
