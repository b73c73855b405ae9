# Stage 1: datasets -> results/{exp}/{dataset}/data/ (manifest.csv, dataset.json; the toy also writes its images).
# Downloads are localrules: on a cluster they run on the login node, compute nodes never touch the network.


localrules:
    fetch_archive,


rule data_toy:
    output:
        directory(f"{RES}/{{dataset}}/data"),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("toy")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_toy"),
    params:
        code=code_of("data-toy"),
        gen=lambda w: q(ds(w)["generator"]),
        res=lambda w: ds(w)["resolution"],
    shell:
        "varup data-toy --out {output} --resolution {params.res} --params {params.gen} > {log} 2>&1"


rule fetch_archive:
    input:
        lambda w: local_source(ds(w)["download"]["url"], f"datasets.{w.dataset}.download.url"),
    output:
        f"{RSC}/datasets/{{dataset}}/archive.json",
    log:
        f"{RES}/logs/data/{{dataset}}_fetch.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}_fetch.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("afhq")),
    conda:
        CONDA_ENV
    params:
        url=lambda w: ds(w)["download"]["url"],
        sha=lambda w: ds(w)["download"]["sha256"] or "",
        key=lambda w: f"datasets.{w.dataset}.download.sha256",
    shell:
        "varup fetch-archive --url {params.url:q} --sha256 '{params.sha}' --key {params.key} --out {output} > {log} 2>&1"


rule data_afhq:
    input:
        f"{RSC}/datasets/{{dataset}}/archive.json",
    output:
        directory(f"{RES}/{{dataset}}/data"),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("afhq")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_afhq"),
    params:
        code=code_of("prepare"),
        res=lambda w: ds(w)["resolution"],
        verify=lambda w: "--verify" if ds(w)["verify"] else "",
    shell:
        "varup prepare --kind afhq --source {input} --out {output} --resolution {params.res} {params.verify} > {log} 2>&1"


rule data_imagenet100:
    input:
        required_dirs("datasets.{dataset}.root"),
    output:
        directory(f"{RES}/{{dataset}}/data"),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("imagenet100")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_imagenet100"),
    params:
        code=code_of("prepare"),
        root=lambda w: ds(w)["root"],
        res=lambda w: ds(w)["resolution"],
        verify=lambda w: "--verify" if ds(w)["verify"] else "",
        cap=lambda w: f"--max-per-class {ds(w)['max_per_class']}" if ds(w)["max_per_class"] else "",
    shell:
        "varup prepare --kind imagenet100 --source {params.root:q} --out {output} --resolution {params.res}"
        " {params.verify} {params.cap} > {log} 2>&1"


rule data_folder:
    input:
        required_dirs("datasets.{dataset}.root"),
    output:
        directory(f"{RES}/{{dataset}}/data"),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    wildcard_constraints:
        dataset="|".join(kinds("folder")),
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_folder"),
    params:
        code=code_of("prepare"),
        root=lambda w: ds(w)["root"],
        res=lambda w: ds(w)["resolution"],
        frac=lambda w: ds(w)["val_fraction"],
        verify=lambda w: "--verify" if ds(w)["verify"] else "",
    shell:
        "varup prepare --kind folder --source {params.root:q} --out {output} --resolution {params.res}"
        " --val-fraction {params.frac} {params.verify} > {log} 2>&1"
