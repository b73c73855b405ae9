# Downstream studies: OOD detection from token likelihoods (Table 3) and zero-shot editing (Figures 2/3).


rule data_ood:
    input:
        required_dirs("experiments.ood.source.root"),
    output:
        directory(f"{RES}/{{dataset}}/ood_data"),
    log:
        f"{RES}/logs/data/{{dataset}}_ood.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}_ood.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("data_ood"),
    params:
        code=code_of("prepare-ood"),
        src=lambda w: q(EXPERIMENTS["ood"]["source"]),
        res=lambda w: ds(w)["resolution"],
    shell:
        "varup prepare-ood --source {params.src} --out {output} --resolution {params.res} > {log} 2>&1"


rule encode_ood:
    input:
        data=f"{RES}/{{dataset}}/ood_data",
        tokenizer=tokenizer_file,
    output:
        meta=f"{RES}/{{dataset}}/ood_tokens/meta.json",
        tokens=f"{RES}/{{dataset}}/ood_tokens/ood_tokens.npy",
        side=multiext(f"{RES}/{{dataset}}/ood_tokens/", "ood_labels.npy", "ood_source.npy"),
    log:
        f"{RES}/logs/encode/{{dataset}}_ood.log",
    benchmark:
        f"{RES}/benchmarks/encode/{{dataset}}_ood.tsv"
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("encode_ood"),
    params:
        code=code_of("encode"),
        device=GPU_DEVICE,
        pre=lambda w: q(preprocess_of(w)),
        res=lambda w: ds(w)["resolution"],
        out=lambda w, output: os.path.dirname(output.meta),
    shell:
        "varup encode --threads {threads} --device {params.device} --data {input.data} --tokenizer {input.tokenizer}"
        " --resolution {params.res} --preprocess {params.pre} --splits val:ood --out {params.out} >> {log} 2>&1"


rule ood_eval:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        id_tokens=f"{RES}/{{dataset}}/tokens/meta.json",
        ood_tokens=f"{RES}/{{dataset}}/ood_tokens/meta.json",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/ood.json",
    log:
        f"{RES}/logs/ood/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/ood/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("ood_eval"),
    params:
        code=code_of("ood"),
        device=GPU_DEVICE,
        n=lambda w: EXPERIMENTS["ood"]["max_images"],
        mode=lambda w: EXPERIMENTS["ood"]["class_mode"],
        id_dir=lambda w, input: os.path.dirname(input.id_tokens),
        ood_dir=lambda w, input: os.path.dirname(input.ood_tokens),
    shell:
        "varup ood --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --id-tokens {params.id_dir} --ood-tokens {params.ood_dir} --max-images {params.n} --class-mode {params.mode}"
        " --out {output} > {log} 2>&1"


# Table 3's mCE: ImageNet-C corruptions of the ood dataset's held-out images (one directory per dataset), tokenized
# in one encode job (split "corrupt"), scored per run; the tables rule forms CE/mCE against the reference method.
CORRUPT = EXPERIMENTS["ood"]["corruptions"] if "ood" in EXPERIMENTS else {"enabled": False}
CORRUPT_RUNS = OOD_RUNS if CORRUPT["enabled"] else []
if CORRUPT["enabled"] and CORRUPT["reference"] not in config["methods"]:
    raise WorkflowError(
        f"experiments.ood.corruptions.reference: {CORRUPT['reference']!r} is not one of the methods "
        f"({', '.join(config['methods'])}): name the method whose runs are the mCE reference"
    )


rule corrupt_data:
    input:
        f"{RES}/{{dataset}}/data",
    output:
        directory(f"{RES}/{{dataset}}/corrupt_data"),
    log:
        f"{RES}/logs/data/{{dataset}}_corrupt.log",
    benchmark:
        f"{RES}/benchmarks/data/{{dataset}}_corrupt.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU,
        **res("corrupt_data"),
    params:
        code=code_of("corrupt-images"),
        p=lambda w: q({k: CORRUPT[k] for k in ("names", "severities", "max_images", "seed")}),
        pre=lambda w: q(preprocess_of(w)),
        res=lambda w: ds(w)["resolution"],
    shell:
        "varup corrupt-images --data {input} --resolution {params.res} --preprocess {params.pre} --params {params.p}"
        " --workers {threads} --out {output} > {log} 2>&1"


rule encode_corrupt:
    input:
        data=f"{RES}/{{dataset}}/corrupt_data",
        tokenizer=tokenizer_file,
    output:
        meta=f"{RES}/{{dataset}}/corrupt_tokens/meta.json",
        tokens=f"{RES}/{{dataset}}/corrupt_tokens/corrupt_tokens.npy",
        side=multiext(f"{RES}/{{dataset}}/corrupt_tokens/", "corrupt_labels.npy", "corrupt_source.npy"),
    log:
        f"{RES}/logs/encode/{{dataset}}_corrupt.log",
    benchmark:
        f"{RES}/benchmarks/encode/{{dataset}}_corrupt.tsv"
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("encode_corrupt"),
    params:
        code=code_of("encode"),
        device=GPU_DEVICE,
        pre=lambda w: q({"mid_reso": 1.0}),  # stored preprocessed at R x R: read as they are
        res=lambda w: ds(w)["resolution"],
        out=lambda w, output: os.path.dirname(output.meta),
    shell:
        "varup encode --threads {threads} --device {params.device} --data {input.data} --tokenizer {input.tokenizer}"
        " --resolution {params.res} --preprocess {params.pre} --splits val:corrupt --out {params.out} > {log} 2>&1"


rule corruption_eval:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/corrupt_tokens/meta.json",
        data=f"{RES}/{{dataset}}/corrupt_data",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/corruptions.json",
    log:
        f"{RES}/logs/corruptions/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/corruptions/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("corruption_eval"),
    params:
        code=code_of("corruption-eval"),
        device=GPU_DEVICE,
        mode=lambda w: CORRUPT["class_mode"],
        tokens=lambda w, input: os.path.dirname(input.tokens),
    shell:
        "varup corruption-eval --threads {threads} --device {params.device} --model {input.model}"
        " --tokenizer {input.tokenizer} --tokens {params.tokens} --data {input.data} --class-mode {params.mode}"
        " --out {output} > {log} 2>&1"


rule downstream:
    input:
        models=lambda w: [
            f"{RES}/{w.dataset}/d{w.depth}/{m}/seed{config['seeds'][0]}/model.pt"
            for m in EXPERIMENTS["downstream"]["methods"]
        ],
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
    output:
        [
            (
                report(
                    f"{RES}/figures/downstream_{{dataset}}_d{{depth}}_{t}.{e}",
                    caption="../report/downstream.rst",
                    category="Figures",
                    labels={"figure": f"downstream {t}"},
                )
                if e == "png"
                else f"{RES}/figures/downstream_{{dataset}}_d{{depth}}_{t}.{e}"
            )
            for t in (EXPERIMENTS["downstream"]["tasks"] if "downstream" in EXPERIMENTS else [])
            for e in ("png", "pdf")
        ],
        summary=f"{RES}/figures/downstream_{{dataset}}_d{{depth}}.json",
        prov=f"{RES}/figures/downstream_{{dataset}}_d{{depth}}.json.prov.json",
    log:
        f"{RES}/logs/downstream/{{dataset}}_d{{depth}}.log",
    benchmark:
        f"{RES}/benchmarks/downstream/{{dataset}}_d{{depth}}.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("downstream"),
    params:
        code=code_of("downstream"),
        device=GPU_DEVICE,
        models=lambda w, input: " ".join(f"{m}={p}" for m, p in zip(EXPERIMENTS["downstream"]["methods"], input.models)),
        p=lambda w: q(EXPERIMENTS["downstream"]),
        tokens=lambda w, input: os.path.dirname(input.tokens),
        out=lambda w, output: os.path.dirname(output.summary),
    shell:
        "varup downstream --threads {threads} --device {params.device} --models {params.models}"
        " --tokenizer {input.tokenizer} --tokens {params.tokens} --params {params.p} --out-dir {params.out}"
        " --name {wildcards.dataset}_d{wildcards.depth} > {log} 2>&1"
