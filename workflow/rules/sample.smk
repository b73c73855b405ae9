# Stage 4: sample each run's evaluation set in independent shards (deterministic per global batch), then merge.
# The shards are temp(): once merged only samples.npz stays (snakemake --notemp keeps them). On Slurm the shard jobs
# of a rule can go as one job array (profiles/slurm: slurm-array-jobs).


rule sample_shard:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:  # temp: removed once merge_samples has read it (50k samples at 256 px: ~10 GB a run, twice over)
        temp(f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples/shard{{shard}}of{{nshards}}.npz"),
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_{{shard}}of{{nshards}}.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_{{shard}}of{{nshards}}.tsv"
    wildcard_constraints:
        nshards=r"\d+",
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("sample_shard"),
    params:
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q(sample_params(w)),
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
    resources:
        **CPU,
        **res("merge_samples"),
    params:
        code=code_of("merge-samples"),
    shell:
        "varup merge-samples --out {output} {input} > {log} 2>&1"


rule sample_qualitative:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/qualitative.npz",
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_qualitative.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("sample_qualitative"),
    params:
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q(qualitative_params(w)),
    shell:
        "varup sample --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --params {params.p} --seed {wildcards.seed} --out {output} > {log} 2>&1"


# Figure 4's CFG sweep: the same sampling and merging at another guidance scale, under <run>/cfg_sweep/cfg{cfgv}/.
use rule sample_shard as sample_cfg_shard with:
    output:
        temp(
            f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/samples/shard{{shard}}of{{nshards}}.npz"
        ),
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_{{shard}}of{{nshards}}.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_{{shard}}of{{nshards}}.tsv"
    wildcard_constraints:
        nshards=r"\d+",
        cfgv=r"[0-9.]+",
    resources:
        **GPU,
        **res("sample_cfg_shard"),
    params:
        code=code_of("sample"),
        device=GPU_DEVICE,
        p=lambda w: q({**sample_params(w), "cfg": float(w.cfgv)}),


use rule merge_samples as merge_cfg_samples with:
    input:
        lambda w: [
            f"{run_dir(w)}/cfg_sweep/cfg{w.cfgv}/samples/shard{i}of{n}.npz"
            for n in [plan.sample_settings(config, w.dataset)["shards"]]
            for i in range(n)
        ],
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/cfg_sweep/cfg{{cfgv}}/samples.npz",
    log:
        f"{RES}/logs/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_merge.log",
    benchmark:
        f"{RES}/benchmarks/sample/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_cfg{{cfgv}}_merge.tsv"
    wildcard_constraints:
        cfgv=r"[0-9.]+",
    resources:
        **CPU,
        **res("merge_cfg_samples"),
