# Stage 3: one training job per run (dataset x depth x method x seed). The run specification (model, loss,
# optimiser, seed) is a parameter: editing e.g. a loss weight re-runs exactly the runs of that method and
# everything downstream of them. Training resumes from <run>/train/ckpt/last.pt after a kill or preemption, and
# on Slurm it stops itself train.stop_before_limit_s before the time limit (checkpoint, exit 75, retry resumes).


rule train:
    input:
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
        tokenizer=tokenizer_file,
        refs=f"{RES}/{{dataset}}/refs.pt",
        warm=warm_start_file,
    output:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        curve=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/train/metrics.jsonl",
        summary=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/train/summary.json",
        prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt.prov.json",  # removed with model.pt
    log:
        f"{RES}/logs/train/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    priority: 30  # the critical path of the DAG goes first
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **train_res("train"),
        stop_before_limit_s=TRAIN_STOP_S,  # a resource, not a parameter: a new margin re-trains nothing
    params:
        code=code_of("train"),
        device=GPU_DEVICE,
        spec=lambda w: q(plan.run_spec(config, run_of(w))),
        tokens=lambda w, input: os.path.dirname(input.tokens),
        work=lambda w, output: os.path.dirname(output.curve),
        warm=lambda w, input: f"--warm-start {input.warm}" if input.warm else "",
        text="",
        launch=lambda w, resources: TRAIN_CMD.format(cpus=resources.cpus_per_task),
    shell:  # train_text (prompts.smk) runs the same command: params.warm and params.text add the flags of each
        "{params.launch} train --threads {threads} --device {params.device} --spec {params.spec} --tokens {params.tokens}"
        " --tokenizer {input.tokenizer} --refs {input.refs} --out {output.model} --work {params.work} {params.warm}"
        " {params.text} --stop-before-limit-s {resources.stop_before_limit_s}"
        " >> {log} 2>&1"
