# Stage 4: sample each run's evaluation set in independent shards (deterministic per global batch), then merge.


rule sample_shard:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples/shard{{shard}}of{{nshards}}.npz",
    params:
        device=DEVICE,
        p=lambda w: q(sample_params(w)),
    wildcard_constraints:
        nshards=r"\d+",
    threads: THREADS
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_{{shard}}of{{nshards}}.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_{{shard}}of{{nshards}}.tsv"
    conda:
        CONDA_ENV
    shell:
        "varup sample --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --params {params.p} --seed {wildcards.seed} --shard {wildcards.shard} --num-shards {wildcards.nshards}"
        " --out {output} > {log} 2>&1"


rule merge_samples:
    input:
        shards_of,
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples.npz",
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_merge.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_merge.tsv"
    conda:
        CONDA_ENV
    shell:
        "varup merge-samples --out {output} {input} > {log} 2>&1"


rule sample_qualitative:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/qualitative.npz",
    params:
        device=DEVICE,
        p=lambda w: q(qualitative_params(w)),
    threads: THREADS
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.tsv"
    conda:
        CONDA_ENV
    shell:
        "varup sample --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --params {params.p} --seed {wildcards.seed} --out {output} > {log} 2>&1"
