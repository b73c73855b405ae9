# Stage 4: sample each run's evaluation set in independent shards (deterministic per global batch), then merge.


rule sample_shard:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples/shard{{shard}}of{{nshards}}.npz",
    params:
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q(sample_params(w)),
    wildcard_constraints:
        nshards=r"\d+",
    threads: THREADS
    resources:
        **GPU,
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
    params:
        code=code_of("merge-samples"),
    resources:
        **CPU,
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
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q(qualitative_params(w)),
    threads: THREADS
    resources:
        **GPU,
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.tsv"
    conda:
        CONDA_ENV
    shell:
        "varup sample --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --params {params.p} --seed {wildcards.seed} --out {output} > {log} 2>&1"


# Figure 4's CFG sweep: the same sampling and merging at another guidance scale, under <run>/cfg_sweep/cfg{cfgv}/.
use rule sample_shard as sample_cfg_shard with:
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/samples/shard{{shard}}of{{nshards}}.npz",
    params:
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q({**sample_params(w), "cfg": float(w.cfgv)}),
    wildcard_constraints:
        nshards=r"\d+",
        cfgv=r"[0-9.]+",
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_{{shard}}of{{nshards}}.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_{{shard}}of{{nshards}}.tsv"


use rule merge_samples as merge_cfg_samples with:
    input:
        lambda w: [f"{run_dir(w)}/cfg_sweep/cfg{w.cfgv}/samples/shard{i}of{n}.npz"
                   for n in [plan.sample_settings(config, w.dataset)["shards"]] for i in range(n)],
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/samples.npz",
    wildcard_constraints:
        cfgv=r"[0-9.]+",
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_merge.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_merge.tsv"
