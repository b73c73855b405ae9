# The hardware benchmark as a target (`snakemake bench`): device ceilings, the training step (CE only and the full
# objective, plain mode), sampling and encoding, in one process on the device the rules use. Not part of rule all:
# its figures mean something only on an otherwise idle device.


rule bench:
    output:
        json=f"{RES}/bench/bench.json",
        md=f"{RES}/bench/bench.md",
    log:
        f"{RES}/logs/bench/bench.log",
    benchmark:
        f"{RES}/benchmarks/bench/bench.tsv"
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("bench"),
    params:
        code=code_of("varup.bench.suite"),
        device=GPU_DEVICE,
        args=bench_args(),
    shell:
        "python -m varup.bench.suite all --threads {threads} --device {params.device} {params.args}"
        " --json {output.json} --markdown {output.md} > {log} 2>&1"
