# The digits rehearsal (issue 23, item 7): the folder dataset path on images no one here made, scikit-learn's
# bundled handwritten digits (datasets of kind digits, config/digits.yaml). digits_images writes them as an image
# folder (train/val/<digit>/, a stratified seeded split, nearest-neighbour upscaled to the resolution); data_digits
# prepares that folder exactly as data_folder prepares a user's; tokenizer, encode, training, sampling and evaluate
# are the main DAG's rules. Then a digit classifier trained on the real training split reads every run's samples
# (class error; chance 0.9), a real-vs-real floor is scored against the held-out digits, and digits_table writes
# tables/digits.*. Its own target, rule digits in the Snakefile: `snakemake digits --configfile config/digits.yaml`
# (README: "Real data: the digits rehearsal").

for _name, _ds in config["datasets"].items():  # stopped before any job, naming the key
    if _ds["kind"] == "digits" and _ds["resolution"] % 8:
        raise WorkflowError(
            f"datasets.{_name}.resolution: {_ds['resolution']} px, but the digits (8 x 8) are upscaled by whole "
            "pixels (nearest neighbour): use a multiple of 8, e.g. 32"
        )

DIGITS_RUNS = [r for r in plan.main_runs(config) if config["datasets"][r.dataset]["kind"] == "digits"]
DIGITS_DATASETS = list(dict.fromkeys(r.dataset for r in DIGITS_RUNS))
DIGITS_TABLE = [f"{RES}/tables/digits.{e}" for e in ("csv", "md", "tex", "html")] if DIGITS_RUNS else []


localrules:
    digits_table,


rule digits_images:
    output:
        directory(f"{RES}/{{dataset}}/digits_images"),
    log:
        f"{RES}/logs/data/{{dataset}}_images.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}_images.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("digits")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("digits_images"),
    params:
        code=code_of("digits-images"),
        res=lambda w: ds(w)["resolution"],
        frac=lambda w: ds(w)["val_fraction"],
        cap=lambda w: f"--max-per-class {ds(w)['max_per_class']}" if ds(w)["max_per_class"] else "",
    shell:
        "varup digits-images --out {output} --resolution {params.res} --val-fraction {params.frac} {params.cap}"
        " > {log} 2>&1"


rule data_digits:
    input:
        f"{RES}/{{dataset}}/digits_images",
    output:
        directory(f"{RES}/{{dataset}}/data"),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("digits")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_digits"),
    params:
        code=code_of("prepare"),
        res=lambda w: ds(w)["resolution"],
        verify=lambda w: "--verify" if ds(w)["verify"] else "",
    shell:
        "varup prepare --kind folder --source {input} --out {output} --resolution {params.res} {params.verify}"
        " > {log} 2>&1"


rule digit_classifier:
    input:
        f"{RES}/{{dataset}}/data",
    output:
        model=f"{RES}/{{dataset}}/digit_classifier.npz",
        record=f"{RES}/{{dataset}}/digit_classifier.json",
    log:
        f"{RES}/logs/digits/{{dataset}}_classifier.log",
    benchmark:
        f"{RES}/benchmarks/digits/{{dataset}}_classifier.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("digits")),
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU,
        **res("digit_classifier"),
    params:
        code=code_of("digit-classifier"),
        res=lambda w: ds(w)["resolution"],
    shell:
        "varup digit-classifier --threads {threads} --data {input} --resolution {params.res} --out {output.model}"
        " --record {output.record} > {log} 2>&1"


rule digit_scores:
    input:
        classifier=f"{RES}/{{dataset}}/digit_classifier.npz",
        samples=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples.npz",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/digit_scores.json",
    log:
        f"{RES}/logs/digits/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/digits/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("digits")),
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU,
        **res("digit_scores"),
    params:
        code=code_of("digit-scores"),
    shell:
        "varup digit-scores --threads {threads} --classifier {input.classifier} --samples {input.samples}"
        " --run {wildcards.dataset}/{wildcards.depth}/{wildcards.method}/{wildcards.seed} --out {output} > {log} 2>&1"


rule digits_floor:
    input:
        classifier=f"{RES}/{{dataset}}/digit_classifier.npz",
        data=f"{RES}/{{dataset}}/data",
        real=f"{RES}/{{dataset}}/real_features.npz",
        inception=f"{RSC}/inception/inception.json",
    output:
        f"{RES}/{{dataset}}/digits_floor.json",
    log:
        f"{RES}/logs/digits/{{dataset}}_floor.log",
    benchmark:
        f"{RES}/benchmarks/digits/{{dataset}}_floor.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("digits")),
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("digits_floor"),
    params:
        code=code_of("digits-floor"),
        device=GPU_DEVICE,
        # the reference set and metric settings of the runs' Inception metrics; the floor set: a run's sample size
        # (sample.n_per_class per class) of train digits
        p=lambda w: q(
            {
                **toy_metric_params(w),
                "floor_split": "train",
                "n_per_class": plan.sample_settings(config, w.dataset)["n_per_class"],
            }
        ),
    shell:
        "varup digits-floor --threads {threads} --device {params.device} --classifier {input.classifier}"
        " --data {input.data} --dataset {wildcards.dataset} --inception {input.inception} --real-features {input.real}"
        " --params {params.p} --out {output} > {log} 2>&1"


rule digits_table:
    input:
        scores=[f"{RES}/{r.path}/digit_scores.json" for r in DIGITS_RUNS],
        metrics=[f"{RES}/{r.path}/metrics.json" for r in DIGITS_RUNS],
        floors=[f"{RES}/{d}/digits_floor.json" for d in DIGITS_DATASETS],
        classifiers=[f"{RES}/{d}/digit_classifier.json" for d in DIGITS_DATASETS],
    output:
        csv=f"{RES}/tables/digits.csv",
        md=f"{RES}/tables/digits.md",
        tex=f"{RES}/tables/digits.tex",
        html=f"{RES}/tables/digits.html",
    log:
        f"{RES}/logs/digits/table.log",
    benchmark:
        f"{RES}/benchmarks/digits/table.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("digits-table"),
        cfg=lambda w: q(reporting.report_config(config)),
        results=lambda w: RES,
        out=lambda w, output: os.path.dirname(output.csv),
    shell:
        "varup digits-table --config {params.cfg} --results {params.results} --out {params.out} > {log} 2>&1"
