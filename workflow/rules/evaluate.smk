# Stage 5: metrics. Inception weights are fetched once (localrule: runs on a cluster's login node); real-image
# features are computed once per dataset; every run's metrics come from one Inception pass over its samples.
# Toy datasets also get FD/KID/PR in the mode classifier's feature space (toy_metrics) and, once per dataset, the
# same metrics between two disjoint real sets (toy_metrics_floor).


localrules:
    inception_weights,


rule inception_weights:
    input:
        lambda w: local_source(config["metrics"]["inception"].get("url"), "metrics.inception.url"),
    output:
        f"{RSC}/inception/inception.json",
    log:
        f"{RES}/logs/inception_weights.log",
    benchmark:
        f"{RES}/benchmarks/inception_weights.tsv"
    conda:
        CONDA_ENV
    params:
        code=code_of("inception"),
        out=lambda w, output: os.path.dirname(output[0]),
        url=f"--url {config['metrics']['inception']['url']}" if "url" in config["metrics"]["inception"] else "",
        sha=f"--sha256 {config['metrics']['inception']['sha256']}" if "sha256" in config["metrics"]["inception"] else "",
        fallback="" if config["metrics"]["inception"]["allow_fallback"] else "--no-fallback",
    shell:
        "varup inception --out-dir {params.out} {params.url} {params.sha} {params.fallback} > {log} 2>&1"


rule real_features:
    input:
        data=f"{RES}/{{dataset}}/data",
        inception=f"{RSC}/inception/inception.json",
    output:
        # the clean-FID features have provenance when they are computed (clean_fid enabled)
        **(
            {"clean_prov": f"{RES}/{{dataset}}/real_clean_features.npy.prov.json"}
            if config["metrics"]["clean_fid"]["enabled"]
            else {}
        ),
        feats=f"{RES}/{{dataset}}/real_features.npz",
        clean=f"{RES}/{{dataset}}/real_clean_features.npy",
        prov=f"{RES}/{{dataset}}/real_features.npz.prov.json",
    log:
        f"{RES}/logs/real_features/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/real_features/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("real_features"),
    params:
        code=code_of("real-features"),
        device=GPU_DEVICE,
        split=lambda w: ds(w)["metrics_real_split"],
        res=lambda w: ds(w)["resolution"],
        n=config["metrics"]["real_max_images"],
        clean_n=config["metrics"]["clean_fid"]["max_images"] if config["metrics"]["clean_fid"]["enabled"] else 0,
        bs=config["metrics"]["batch_size"],
    shell:
        "varup real-features --threads {threads} --device {params.device} --data {input.data} --split {params.split}"
        " --resolution {params.res} --inception {input.inception} --max-images {params.n} --batch-size {params.bs}"
        " --out {output.feats} --clean-out {output.clean} --clean-max-images {params.clean_n} > {log} 2>&1"


rule evaluate:
    input:
        samples=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples.npz",
        real=f"{RES}/{{dataset}}/real_features.npz",
        real_clean=f"{RES}/{{dataset}}/real_clean_features.npy",
        inception=f"{RSC}/inception/inception.json",
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/metrics.json",
    log:
        f"{RES}/logs/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("evaluate"),
    params:
        code=code_of("evaluate"),
        device=GPU_DEVICE,
        p=lambda w: q(inception_metric_params()),
        tokens=lambda w, input: os.path.dirname(input.tokens),
    shell:
        "varup evaluate --threads {threads} --device {params.device} --samples {input.samples} --real-features {input.real}"
        " --inception {input.inception} --model {input.model} --tokenizer {input.tokenizer} --tokens {params.tokens}"
        " --real-clean-features {input.real_clean} --params {params.p} --out {output} > {log} 2>&1"


use rule evaluate as evaluate_cfg with:
    input:
        samples=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/samples.npz",
        real=f"{RES}/{{dataset}}/real_features.npz",
        real_clean=f"{RES}/{{dataset}}/real_clean_features.npy",
        inception=f"{RSC}/inception/inception.json",
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/metrics.json",
    log:
        f"{RES}/logs/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}.tsv"
    wildcard_constraints:
        cfgv=r"[0-9.]+",
    resources:
        **GPU,
        **res("evaluate_cfg"),


rule toy_metrics:
    input:
        classifier=mode_classifier_file,
        samples=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples.npz",
        data=f"{RES}/{{dataset}}/data",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/toy_metrics.json",
    log:
        f"{RES}/logs/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_toy.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_toy.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU,
        **res("toy_metrics"),
    params:
        code=code_of("toy-metrics"),
        device=DEVICE,
        p=lambda w: q(toy_metric_params(w)),
    shell:
        "varup toy-metrics --threads {threads} --device {params.device} --classifier {input.classifier}"
        " --samples {input.samples} --data {input.data} --params {params.p}"
        " --run {wildcards.dataset}/{wildcards.depth}/{wildcards.method}/{wildcards.seed} --out {output} > {log} 2>&1"


rule toy_metrics_floor:
    input:
        classifier=mode_classifier_file,
        data=f"{RES}/{{dataset}}/data",
        real=f"{RES}/{{dataset}}/real_features.npz",
        inception=f"{RSC}/inception/inception.json",
        tokenizer=tokenizer_file,
    output:
        f"{RES}/{{dataset}}/toy_metrics_floor.json",
    log:
        f"{RES}/logs/evaluate/{{dataset}}_toy_floor.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{dataset}}_toy_floor.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("toy_metrics_floor"),
    params:
        code=code_of("toy-metrics-floor"),
        device=GPU_DEVICE,
        p=lambda w: q(toy_floor_params(w)),
        inception="" if config["metrics"]["toy_features"]["floor_inception"] else "--no-inception",
    shell:
        "varup toy-metrics-floor --threads {threads} --device {params.device} --classifier {input.classifier}"
        " --data {input.data} --dataset {wildcards.dataset} --inception {input.inception} --real-features {input.real}"
        " {params.inception} --tokenizer {input.tokenizer} --params {params.p} --out {output} > {log} 2>&1"
