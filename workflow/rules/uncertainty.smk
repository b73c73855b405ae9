# Uncertainty and diversity studies: MC-Dropout sigma maps and region sigma, the DropPath-rate sweep, class
# entanglement (runs of uncertainty.run_seeds), and mode coverage of every toy run's samples.


rule mc_dropout:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
        data=f"{RES}/{{dataset}}/data",
        masks=lambda w: [d] if (d := unc_mask_dir(w)) and os.path.isdir(d) else [],
    output:
        json=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/mc_dropout.json",
        npz=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/mc_dropout.npz",
        prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/mc_dropout.json.prov.json",
    log:
        f"{RES}/logs/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_mc.log",
    benchmark:
        f"{RES}/benchmarks/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_mc.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("mc_dropout"),
    params:
        code=code_of("mc-dropout"),
        device=GPU_DEVICE,
        p=lambda w: q(
            {
                **unc_common(w),
                "T": UNC["T"],
                "rate": UNC["mc_rate"],
                "droppath_masks": UNC["droppath_masks"],
                "sigma_reading": UNC["sigma_reading"],
                "classes": UNC["classes"],
                "seeds": UNC["sample_seeds"],
                "mask_dir": unc_mask_dir(w),
            }
        ),
    shell:
        "varup mc-dropout --threads {threads} --device {params.device} --model {input.model} --tokenizer {input.tokenizer}"
        " --data {input.data} --params {params.p} --out {output.json} --out-npz {output.npz} > {log} 2>&1"


rule uncertainty_sets:
    input:
        model=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        tokenizer=tokenizer_file,
    output:
        sweep=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/sweep/sweep.json",
        mix=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/entanglement/entanglement.json",
        sweep_prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/sweep/sweep.json.prov.json",
        mix_prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/entanglement/entanglement.json.prov.json",
    log:
        f"{RES}/logs/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_sets.log",
    benchmark:
        f"{RES}/benchmarks/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_sets.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("uncertainty_sets"),
    params:
        code=code_of("uncertainty-sets"),
        device=GPU_DEVICE,
        p=lambda w: q(
            {
                **unc_common(w),
                "T": UNC["T"],
                "rates": UNC["sweep_rates"],
                "n_per_class": UNC["sweep_n_per_class"],
                "mixes": UNC["entanglement_mixes"],
                "n_mix": UNC["entanglement_n"],
                "batch_size": plan.sample_settings(config, w.dataset)["batch_size"],
                "sigma_seeds": UNC["sample_seeds"],
                "classes": UNC["classes"],
                "set_droppath_rate": UNC["set_droppath_rate"],
                "droppath_masks": UNC["droppath_masks"],
                "sigma_reading": UNC["sigma_reading"],
            }
        ),
        sweep_dir=lambda w, output: os.path.dirname(output.sweep),
        mix_dir=lambda w, output: os.path.dirname(output.mix),
    shell:
        "varup uncertainty-sets --threads {threads} --device {params.device} --model {input.model}"
        " --tokenizer {input.tokenizer} --params {params.p} --seed {wildcards.seed} --sweep-dir {params.sweep_dir}"
        " --mix-dir {params.mix_dir} > {log} 2>&1"


rule score_uncertainty_sets:
    input:
        sweep=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/sweep/sweep.json",
        mix=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/entanglement/entanglement.json",
        real=f"{RES}/{{dataset}}/real_features.npz",
        inception=f"{RSC}/inception/inception.json",
    output:
        sweep=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/sweep_scored.json",
        mix=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/entanglement_scored.json",
        sweep_prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/sweep_scored.json.prov.json",
        mix_prov=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/uncertainty/entanglement_scored.json.prov.json",
    log:
        f"{RES}/logs/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_score.log",
    benchmark:
        f"{RES}/benchmarks/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_score.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("score_uncertainty_sets"),
    params:
        code=code_of("score-sets"),
        device=GPU_DEVICE,
        p=lambda w: q(inception_metric_params()),
    shell:
        "varup score-sets --threads {threads} --device {params.device} --real-features {input.real}"
        " --inception {input.inception} --params {params.p} --sets {input.sweep} {input.mix}"
        " --out {output.sweep} {output.mix} > {log} 2>&1"


rule mode_classifier:
    input:
        data=f"{RES}/{{dataset}}/data",
    output:
        f"{RES}/{{dataset}}/mode_classifier.pt",
    log:
        f"{RES}/logs/uncertainty/{{dataset}}_mode_classifier.log",
    benchmark:
        f"{RES}/benchmarks/uncertainty/{{dataset}}_mode_classifier.tsv"
    priority: 50  # the tokenizer gate needs it before encoding (the critical path)
    conda:
        CONDA_ENV
    threads: SERIAL_THREADS
    resources:
        **GPU,
        **res("mode_classifier"),
    params:
        code=code_of("mode-classifier"),
        device=GPU_DEVICE,
        epochs=UNC["mode_classifier"]["epochs"],
        seed=UNC["mode_classifier"]["seed"],
    shell:
        "varup mode-classifier --threads {threads} --device {params.device} --data {input.data}"
        " --epochs {params.epochs} --seed {params.seed} --out {output} > {log} 2>&1"


rule mode_coverage:
    input:
        classifier=mode_classifier_file,
        samples=f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/samples.npz",
        data=f"{RES}/{{dataset}}/data",
    output:
        f"{RES}/{{dataset}}/d{{depth}}/{{method}}/seed{{seed}}/mode_coverage.json",
    log:
        f"{RES}/logs/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_modes.log",
    benchmark:
        f"{RES}/benchmarks/uncertainty/{{dataset}}_d{{depth}}_{{method}}_seed{{seed}}_modes.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **CPU,
        **res("mode_coverage"),
    params:
        code=code_of("mode-coverage"),
        device=DEVICE,
    shell:
        "varup mode-coverage --threads {threads} --device {params.device} --classifier {input.classifier}"
        " --samples {input.samples} --data {input.data} --run {wildcards.dataset}/{wildcards.depth}/{wildcards.method}/{wildcards.seed}"
        " --out {output} > {log} 2>&1"
