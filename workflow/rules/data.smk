# Stage 1: datasets -> results/{exp}/{dataset}/data/ (images/{split}/{class}/*.png, manifest.csv, dataset.json)


rule data_toy:
    output:
        directory(f"{RES}/{{dataset}}/data"),
    params:
        gen=lambda w: q(ds(w).get("generator", {})),
        res=lambda w: ds(w)["resolution"],
    wildcard_constraints:
        dataset="|".join(kinds("toy")),
    log:
        f"{RES}/logs/data/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "varup data-toy --out {output} --resolution {params.res} --params {params.gen} > {log} 2>&1"
