# Stage 6: tables and figures (CPU-only, cheap) and their report entries. Local rules: on a cluster they run beside
# Snakemake (seconds each; a submitted job would wait in the queue longer than it runs).


import varup.config.claimsplan as claimsplan


localrules:
    tables,
    figures,


rule tables:
    input:
        metrics=run_files("metrics.json"),
        summaries=run_files("train/summary.json"),
        ood=[f"{RES}/{r.path}/ood.json" for r in OOD_RUNS],
        corruptions=[f"{RES}/{r.path}/corruptions.json" for r in CORRUPT_RUNS],
        sweep=cfg_sweep_files("metrics.json"),
        unc=[
            f"{RES}/{r.path}/uncertainty/{f}"
            for r in UNC_RUNS
            for f in ("mc_dropout.json", "sweep_scored.json", "entanglement_scored.json")
        ],
        modes=[f"{RES}/{r.path}/mode_coverage.json" for r in MODE_RUNS],
        toy=[f"{RES}/{r.path}/toy_metrics.json" for r in TOY_RUNS],
        toy_floor=[f"{RES}/{d}/toy_metrics_floor.json" for d in TOY_DATASETS],
        refs=[f"{RES}/{d}/refs.json" for d in MAIN_DATASETS],
    output:
        # the report shows each table's HTML rendering (its viewer cannot display .md); .md and .tex are for papers
        **{
            f"{t}_{ext}": (
                report(
                    f"{RES}/tables/{t}.{ext}",
                    caption=f"../report/{t}.rst",
                    category="Claims ledger" if t == "claims" else "Tables",  # the report's first category
                    labels={"table": t},
                )
                if ext == "html"
                else f"{RES}/tables/{t}.{ext}"
            )
            for t in TABLES
            for ext in ("csv", "md", "tex", "html")
        },
    log:
        f"{RES}/logs/tables.log",
    benchmark:
        f"{RES}/benchmarks/tables.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("tables"),
        cfg=lambda w: q(reporting.report_config(config)),
        # the claims ledger reads the studies outside `all` when present; their digests re-run this rule when one
        # appears or changes, without making `all` run them (varup.config.claimsplan)
        claims_sources=lambda w: claimsplan.fingerprint(RES),
        results=lambda w: RES,
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "varup tables --config {params.cfg} --results {params.results} --out {params.out} > {log} 2>&1"


rule figures:
    input:
        qualitative=[f"{RES}/{r.path}/qualitative.npz" for r in plan.main_runs(config) if r.seed == config["seeds"][0]],
        curves=run_files("train/metrics.jsonl"),
        metrics=run_files("metrics.json") if "figure4" in EXPERIMENTS else [],
        sweep=cfg_sweep_files("metrics.json"),
        unc=[f"{RES}/{r.path}/uncertainty/{f}" for r in UNC_RUNS for f in ("mc_dropout.npz", "sweep_scored.json")],
        tokens_meta=[f"{RES}/{d}/tokens/meta.json" for d in MAIN_DATASETS],  # class names of the sample grids
    output:
        **{
            f"{f}_{ext}": (
                report(
                    f"{RES}/figures/{f}.{ext}", caption=f"../report/{f}.rst", category="Figures", labels={"figure": f}
                )
                if ext == "png"
                else f"{RES}/figures/{f}.{ext}"
            )
            for f in FIGURES
            for ext in ("png", "pdf")
        },
    log:
        f"{RES}/logs/figures.log",
    benchmark:
        f"{RES}/benchmarks/figures.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("figures"),
        cfg=lambda w: q(reporting.report_config(config)),
        results=lambda w: RES,
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "varup figures --config {params.cfg} --results {params.results} --out {params.out} > {log} 2>&1"
