# The scaling study (experiments.scaling, issue 24): held-out token loss against model size per method, a power law
# fitted per method with an interval on its exponent, and the exponents' difference with its paired interval. Its own
# target, `snakemake scaling_study` (not part of `all`: depths x methods x seeds training runs; the train rule trains
# them, and runs that Table 2 already has are reused). README: "The scaling claim".


localrules:
    scaling_report,


rule scaling_heldout:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/heldout.json",
    log:
        f"{RES}/logs/scaling/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/scaling/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("scaling_heldout"),
    params:
        code=code_of("varup.studies.heldout"),
        device=GPU_DEVICE,
        split=lambda w: SCALING["split"],
        n=lambda w: f"--max-images {SCALING['max_images']}" if SCALING["max_images"] else "",
        mode=lambda w: SCALING["class_mode"],
        batch=lambda w: SCALING["batch_size"],
        tokens=lambda w, input: os.path.dirname(input.tokens),
        run=lambda w: run_of(w).path,
    shell:
        "python -m varup.studies.heldout --threads {threads} --device {params.device} --model {input.model}"
        " --tokenizer {input.tokenizer} --tokens {params.tokens} --split {params.split} {params.n}"
        " --class-mode {params.mode} --batch-size {params.batch} --run {params.run} --out {output} > {log} 2>&1"


rule scaling_fit:
    input:
        [e["heldout"] for e in scaling_entries()],
    output:
        f"{RES}/scaling/scaling.json",
    log:
        f"{RES}/logs/scaling/fit.log",
    benchmark:
        f"{RES}/benchmarks/scaling/fit.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("scaling_fit"),
    params:
        code=code_of("varup.studies.scaling"),
        entries=lambda w: q(scaling_entries()),
        baseline=lambda w: SCALING["baseline"],
        n_boot=lambda w: SCALING["n_boot"],
        seed=lambda w: SCALING["boot_seed"],
        confidence=lambda w: SCALING["confidence"],
        dataset=lambda w: SCALING["dataset"],
        form=lambda w: SCALING["form"],
    shell:
        "python -m varup.studies.scaling --entries {params.entries} --baseline {params.baseline}"
        " --n-boot {params.n_boot} --seed {params.seed} --confidence {params.confidence}"
        " --dataset {params.dataset} --form {params.form} --out {output} > {log} 2>&1"


rule scaling_report:
    input:
        f"{RES}/scaling/scaling.json",
    output:
        csv=f"{RES}/tables/scaling.csv",
        md=f"{RES}/tables/scaling.md",
        tex=f"{RES}/tables/scaling.tex",
        html=report(
            f"{RES}/tables/scaling.html",
            caption="../report/scaling.rst",
            category="Tables",
            labels={"table": "scaling"},
        ),
        png=report(
            f"{RES}/figures/scaling.png",
            caption="../report/scaling.rst",
            category="Figures",
            labels={"figure": "scaling"},
        ),
        pdf=f"{RES}/figures/scaling.pdf",
    log:
        f"{RES}/logs/scaling/report.log",
    benchmark:
        f"{RES}/benchmarks/scaling/report.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("varup.report.scaling"),
        tables=lambda w, output: os.path.dirname(output.csv),
        figures=lambda w, output: os.path.dirname(output.png),
    shell:
        "python -m varup.report.scaling --study {input} --tables {params.tables} --figures {params.figures}"
        " > {log} 2>&1"
