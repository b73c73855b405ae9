# The LM arm (the paper's Table 6; varup.lm): its own target `snakemake lm_study` (config `lm`; not
# part of all). Corpus (the toy grammar, or dolly-15k fetched) -> base model (toy: pre-trained here; hub: Qwen1.5
# fetched) -> references from its embedding matrix -> SFT per method x seed (same torchrun/Slurm launch as the image
# trainer) -> generations for the held-out prompts (and the zero-shot base's) -> MAUVE / Self-BLEU / toy modes ->
# Table 6 beside the paper's numbers.
localrules:
    lm_dolly,
    lm_weights,
    lm_tables,


rule lm_dolly:
    """databricks-dolly-15k (sha256 pinned, or recorded on first download: lm.corpus.sha256)."""
    input:
        lambda w: local_source(LM["corpus"].get("url", lmr.DOLLY_URL), "lm.corpus.url"),
    output:
        f"{RSC}/dolly/databricks-dolly-15k.jsonl",
    log:
        f"{RES}/logs/lm/dolly_fetch.log",
    benchmark:
        f"{RES}/benchmarks/lm/dolly_fetch.tsv"
    conda:
        CONDA_ENV
    params:
        code=code_of("lm-dolly"),
        url=LM["corpus"].get("url", lmr.DOLLY_URL),  # no schema default: LM is a parameter of lm_tables
        sha=LM["corpus"]["sha256"] or "",
    shell:
        "varup lm-dolly --url {params.url} --sha256 '{params.sha}' --key lm/corpus/sha256 --out {output} > {log} 2>&1"


rule lm_weights:
    """A hub model's files (lm.base / lm.featurizer: repo, revision, files; sha256 pinned or recorded on first use)."""
    input:
        lambda w: hub_sources(lm_hub_part(w)),
    output:
        f"{RSC}/hf/{{repo}}/varup_fetch.json",
    log:
        f"{RES}/logs/lm/weights_{{repo}}.log",
    benchmark:
        f"{RES}/benchmarks/lm/weights_{{repo}}.tsv"
    conda:
        CONDA_ENV
    params:
        code=code_of("lm-fetch"),
        part=lm_hub_part,
        spec=lambda w: LM[lm_hub_part(w)],
        files=lambda w: q(lmr.hub_files(config, lm_hub_part(w))),
        sha=lambda w: q(LM[lm_hub_part(w)]["sha256"]),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "varup lm-fetch --repo {params.spec[repo]} --revision {params.spec[revision]} --endpoint {params.spec[endpoint]}"
        " --files {params.files} --sha256 {params.sha} --key lm/{params.part} --out-dir {params.out}"
        " > {log} 2>&1"


rule lm_corpus:
    """The SFT pairs and held-out prompts (with their human responses): the toy grammar, or dolly's seeded split."""
    input:
        [] if lmr.is_toy(config) else f"{RSC}/dolly/databricks-dolly-15k.jsonl",
    output:
        train=f"{RES}/lm/corpus/train.jsonl",
        eval=f"{RES}/lm/corpus/eval.jsonl",
        summary=f"{RES}/lm/corpus/summary.json",
    log:
        f"{RES}/logs/lm/corpus.log",
    benchmark:
        f"{RES}/benchmarks/lm/corpus.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("lm_corpus"),
    params:
        code=code_of("lm-corpus"),
        kind=LM["corpus"]["kind"],
        params=q(LM["corpus"]),
        template=lambda w: shlex.quote(lmr.template(config)),
        source=lambda w, input: f"--source {input[0]}" if input else "",
        out=lambda w, output: os.path.dirname(output.train),
    shell:
        "varup lm-corpus --kind {params.kind} {params.source} --params {params.params} --template {params.template}"
        " --out {params.out} > {log} 2>&1"


rule lm_pretrain:
    """The toy base model (which=base) or the toy MAUVE featurizer (which=featurizer, another seed): a Qwen2 config
    with a few layers pre-trained with cross-entropy on the grammar's plain text."""
    input:
        f"{RES}/lm/corpus/summary.json",
    output:
        model=directory(f"{RES}/lm/{{which}}"),
        curve=f"{RES}/lm/{{which}}_train/metrics.jsonl",
        prov=f"{RES}/lm/{{which}}.prov.json",
    log:
        f"{RES}/logs/lm/pretrain_{{which}}.log",
    benchmark:
        f"{RES}/benchmarks/lm/pretrain_{{which}}.tsv"
    wildcard_constraints:
        which="base|featurizer",
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("lm_pretrain"),
    params:
        code=code_of("lm-pretrain"),
        device=GPU_DEVICE,
        corpus=lambda w, input: os.path.dirname(input[0]),
        model=q(LM["base"]["model"]),
        train=lambda w: q(lmr.pretrain_spec(config, featurizer=w.which == "featurizer")),
        template=lambda w: shlex.quote(lmr.template(config)),
        work=lambda w, output: os.path.dirname(output.curve),
    shell:
        "varup lm-pretrain --threads {threads} --device {params.device} --corpus {params.corpus} --model {params.model}"
        " --train {params.train} --template {params.template} --out {output.model} --work {params.work} >> {log} 2>&1"


rule lm_refs:
    """The objective's references from the base model's input-embedding matrix (as from a VQVAE codebook)."""
    input:
        base=lm_base_input(),
        corpus=f"{RES}/lm/corpus/train.jsonl",
    output:
        refs=f"{RES}/lm/refs.pt",
        stats=f"{RES}/lm/refs.pt.json",
        prov=f"{RES}/lm/refs.pt.prov.json",
    log:
        f"{RES}/logs/lm/refs.log",
    benchmark:
        f"{RES}/benchmarks/lm/refs.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("lm_refs"),
    params:
        code=code_of("lm-refs"),
        device=GPU_DEVICE,
        base=lambda w, input: lm_folder(input.base),
        corpus=lambda w, input: os.path.dirname(input.corpus),
        params=q(LM["references"]),
        train=q(LM["train"]),
    shell:
        "varup lm-refs --threads {threads} --device {params.device} --base {params.base} --corpus {params.corpus}"
        " --params {params.params} --train {params.train} --out {output.refs} > {log} 2>&1"


rule lm_sft:
    """One SFT run (method x seed): CE for the baseline, the objective for ours; resumable, DDP under torchrun."""
    input:
        base=lm_base_input(),
        corpus=f"{RES}/lm/corpus/train.jsonl",
        refs=f"{RES}/lm/refs.pt",
    output:
        model=directory(f"{RES}/lm/{{method}}/seed{{seed}}/model"),
        curve=f"{RES}/lm/{{method}}/seed{{seed}}/train/metrics.jsonl",
        summary=f"{RES}/lm/{{method}}/seed{{seed}}/train/summary.json",
        prov=f"{RES}/lm/{{method}}/seed{{seed}}/model.prov.json",
    log:
        f"{RES}/logs/lm/sft_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/lm/sft_{{method}}_seed{{seed}}.tsv"
    wildcard_constraints:
        method="|".join(re.escape(m) for m in LM_METHODS),
        seed=r"\d+",
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **train_res("lm_sft"),
        stop_before_limit_s=TRAIN_STOP_S,
    params:
        code=code_of("lm-sft"),
        device=GPU_DEVICE,
        base=lambda w, input: lm_folder(input.base),
        corpus=lambda w, input: os.path.dirname(input.corpus),
        train=lambda w: q(lmr.lm_run_spec(config, lm_run_of(w))),
        dtype=LM["base"]["dtype"],
        work=lambda w, output: os.path.dirname(output.curve),
        launch=lambda w, resources: TRAIN_CMD.format(cpus=resources.cpus_per_task),
    shell:
        "{params.launch} lm-sft --threads {threads} --device {params.device} --base {params.base}"
        " --corpus {params.corpus} --refs {input.refs} --train {params.train} --dtype {params.dtype}"
        " --out {output.model} --work {params.work} --stop-before-limit-s {resources.stop_before_limit_s} >> {log} 2>&1"


rule lm_generate:
    """Responses of one model for every held-out prompt (method zero_shot: the base model itself)."""
    input:
        model=lm_model_input,
        eval=f"{RES}/lm/corpus/eval.jsonl",
    output:
        gens=f"{RES}/lm/{{method}}/seed{{seed}}/generations.jsonl",
        prov=f"{RES}/lm/{{method}}/seed{{seed}}/generations.jsonl.prov.json",
    log:
        f"{RES}/logs/lm/generate_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/lm/generate_{{method}}_seed{{seed}}.tsv"
    wildcard_constraints:
        method="|".join(re.escape(m) for m in [lmr.ZERO_SHOT, *LM_METHODS]),
        seed=r"\d+",
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("lm_generate"),
    params:
        code=code_of("lm-generate"),
        device=GPU_DEVICE,
        model=lambda w, input: lm_folder(input.model),
        decode=q(LM["generate"]),
        dtype=LM["base"]["dtype"],
    shell:
        "varup lm-generate --threads {threads} --device {params.device} --model {params.model} --eval {input.eval}"
        " --decode {params.decode} --seed {wildcards.seed} --dtype {params.dtype} --out {output.gens} > {log} 2>&1"


rule lm_score:
    """MAUVE (against the human responses), Self-BLEU and, on the toy grammar, the modes of one generation set."""
    input:
        gens=f"{RES}/lm/{{method}}/seed{{seed}}/generations.jsonl",
        eval=f"{RES}/lm/corpus/eval.jsonl",
        featurizer=lm_featurizer_input(),
    output:
        f"{RES}/lm/{{method}}/seed{{seed}}/scores.json",
    log:
        f"{RES}/logs/lm/score_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/lm/score_{{method}}_seed{{seed}}.tsv"
    wildcard_constraints:
        method="|".join(re.escape(m) for m in [lmr.ZERO_SHOT, *LM_METHODS]),
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("lm_score"),
    params:
        code=code_of("lm-score"),
        device=GPU_DEVICE,
        featurizer=lambda w, input: lm_folder(input.featurizer),
        score=q(LM["score"]),
        label=shlex.quote(lmr.featurizer_label(config)),
        toy="--toy" if lmr.is_toy(config) else "",
    shell:
        "varup lm-score --threads {threads} --device {params.device} --generations {input.gens} --eval {input.eval}"
        " --featurizer {params.featurizer} --score {params.score} --label {params.label} {params.toy}"
        " --out {output} > {log} 2>&1"


rule lm_tables:
    """Table 6 (zero-shot, SFT with CE and with the objective, mean ± std over seeds, the paper's numbers beside) and
    the figure of the SFT curves and (toy) the generated vs true mode frequencies."""
    input:
        scores=[f"{RES}/{r.path}/scores.json" for r in LM_RUNS],
        curves=[f"{RES}/{r.path}/train/metrics.jsonl" for r in LM_RUNS if r.method != lmr.ZERO_SHOT],
        corpus=f"{RES}/lm/corpus/summary.json",
    output:
        **{
            f"table6_{e}": (
                report(
                    f"{RES}/tables/table6.{e}",
                    caption="../report/table6.rst",
                    category="Tables",
                    labels={"table": "table6"},
                )
                if e == "html"
                else f"{RES}/tables/table6.{e}"
            )
            for e in ("csv", "md", "tex", "html")
        },
        modes_png=report(
            f"{RES}/figures/lm_modes.png",
            caption="../report/lm_modes.rst",
            category="Figures",
            labels={"figure": "lm_modes"},
        ),
        modes_pdf=f"{RES}/figures/lm_modes.pdf",
    log:
        f"{RES}/logs/lm/tables.log",
    benchmark:
        f"{RES}/benchmarks/lm/tables.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("tables") + code_of("figures"),
        cfg=lambda w: q({"lm": LM, "methods": config["methods"]}),
        results=lambda w: RES,
        tables=lambda w, output: os.path.dirname(output[0]),
        figures=lambda w, output: os.path.dirname(output.modes_png),
    shell:
        "(varup tables --config {params.cfg} --results {params.results} --out {params.tables} --only lm"
        " && varup figures --config {params.cfg} --results {params.results} --out {params.figures} --only lm)"
        " > {log} 2>&1"
