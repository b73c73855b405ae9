# Stage 2: tokenizer -> token cache -> loss references (each computed once per dataset).


localrules:
    fetch_weights,


rule fetch_weights:
    input:
        lambda w: local_source(*weights_source(w.name)[::3]),  # (url, its key)
    output:
        f"{RSC}/weights/{{name}}.pth",
    log:
        f"{RES}/logs/fetch/{{name}}.log",
    benchmark:
        f"{RES}/benchmarks/fetch/{{name}}.tsv"
    conda:
        CONDA_ENV
    params:
        url=lambda w: weights_source(w.name)[0],
        sha=lambda w: weights_source(w.name)[1] or "",
        key=lambda w: weights_source(w.name)[2],
    shell:
        "varup fetch --url {params.url:q} --sha256 '{params.sha}' --key {params.key} --out {output} > {log} 2>&1"


rule tokenizer_train:
    input:
        data=f"{RES}/{{dataset}}/data",
    output:
        model=f"{RES}/{{dataset}}/tokenizer/vqvae.pt",
        summary=f"{RES}/{{dataset}}/tokenizer/summary.json",
        curve=f"{RES}/{{dataset}}/tokenizer/metrics.jsonl",
        prov=f"{RES}/{{dataset}}/tokenizer/vqvae.pt.prov.json",  # a sidecar goes with its result
    log:
        f"{RES}/logs/tokenizer/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/tokenizer/{{dataset}}.tsv"
    priority: 50  # the critical path of the DAG goes first
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("tokenizer_train"),
        stop_before_limit_s=TRAIN_STOP_S,
    params:
        code=code_of("tokenizer-train"),
        device=GPU_DEVICE,
        vq=lambda w: q(plan.tokenizer_of(config, w.dataset)[1]["vqvae"]),
        train=lambda w: q(plan.tokenizer_of(config, w.dataset)[1]["train"]),
        pre=lambda w: q(preprocess_of(w)),
        res=lambda w: ds(w)["resolution"],
        work=lambda w, output: os.path.dirname(output.model),
    shell:
        "varup tokenizer-train --threads {threads} --device {params.device} --data {input.data} --resolution {params.res}"
        " --preprocess {params.pre} --vqvae {params.vq} --train {params.train} --out {output.model}"
        " --work {params.work} --stop-before-limit-s {resources.stop_before_limit_s} >> {log} 2>&1"


rule tokenizer_gate:
    input:
        data=f"{RES}/{{dataset}}/data",
        tokenizer=tokenizer_file,
        classifier=mode_classifier_file,
    output:
        f"{RES}/{{dataset}}/tokenizer/gate.json",
    log:
        f"{RES}/logs/tokenizer/{{dataset}}_gate.log",
    benchmark:
        f"{RES}/benchmarks/tokenizer/{{dataset}}_gate.tsv"
    priority: 45  # the critical path of the DAG goes first
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("tokenizer_gate"),
    params:
        code=code_of("tokenizer-gate"),
        device=GPU_DEVICE,
        bound=lambda w: ds(w)["tokenizer_gate"]["max_class_error"],
        split=lambda w: ds(w)["tokenizer_gate"]["split"],
        key=lambda w: f"datasets.{w.dataset}.tokenizer_gate.max_class_error",
        pre=lambda w: q(preprocess_of(w)),
        res=lambda w: ds(w)["resolution"],
    shell:
        "varup tokenizer-gate --threads {threads} --device {params.device} --tokenizer {input.tokenizer}"
        " --classifier {input.classifier} --data {input.data} --resolution {params.res} --preprocess {params.pre}"
        " --split {params.split} --max-class-error {params.bound} --key {params.key} --out {output} > {log} 2>&1"


rule encode:
    input:
        data=f"{RES}/{{dataset}}/data",
        tokenizer=tokenizer_file,
        gate=tokenizer_gate_file,
    output:
        meta=f"{RES}/{{dataset}}/tokens/meta.json",
        train=f"{RES}/{{dataset}}/tokens/train_tokens.npy",
        val=f"{RES}/{{dataset}}/tokens/val_tokens.npy",
        # written beside the tokens: removed with them (never left over from an older cache)
        side=multiext(
            f"{RES}/{{dataset}}/tokens/", "train_labels.npy", "train_source.npy", "val_labels.npy", "val_source.npy"
        ),
    log:
        f"{RES}/logs/encode/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/encode/{{dataset}}.tsv"
    priority: 40  # the critical path of the DAG goes first
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("encode"),
    params:
        code=code_of("encode"),
        device=GPU_DEVICE,
        pre=lambda w: q(preprocess_of(w)),
        variants=lambda w: q(ds(w)["token_variants"]),
        res=lambda w: ds(w)["resolution"],
        out=lambda w, output: os.path.dirname(output.meta),
    shell:
        "varup encode --threads {threads} --workers {threads} --device {params.device} --data {input.data}"
        " --tokenizer {input.tokenizer} --resolution {params.res} --preprocess {params.pre} --variants {params.variants}"
        " --out {params.out}"
        " >> {log} 2>&1"


rule references:
    input:
        tokenizer=tokenizer_file,
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
    output:
        refs=f"{RES}/{{dataset}}/refs.pt",
        stats=f"{RES}/{{dataset}}/refs.json",
        prov=f"{RES}/{{dataset}}/refs.pt.prov.json",
    log:
        f"{RES}/logs/references/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/references/{{dataset}}.tsv"
    priority: 40  # the critical path of the DAG goes first
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("references"),
    params:
        code=code_of("references"),
        k=config["references"]["num_clusters"],
        support_k=config["references"]["support_k"],
        seed=config["references"]["cluster_seed"],
        tau=("" if config["references"]["tau"] is None else f"--tau {config['references']['tau']}"),
        tokens=lambda w, input: os.path.dirname(input.tokens),
    shell:
        "varup references --threads {threads} --tokenizer {input.tokenizer} --tokens {params.tokens}"
        " --num-clusters {params.k} --seed {params.seed} {params.tau} --support-k {params.support_k}"
        " --stats {output.stats} --out {output.refs} > {log} 2>&1"
