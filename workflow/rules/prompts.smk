# The text-conditioned VAR (VAR-CLIP layout) and the companion study's prompt experiments (varup.studies.prompts): its own
# target `snakemake prompt_study` (config `text`; not part of all). Captions -> text runs (the toy text encoder is
# trained with the generator; on a cluster CLIP's frozen text embeddings) -> per run (both families): prompt sets +
# MC-Dropout σ -> scores (FID/KID, CMMD, modes) against a real reference pool -> tables and the σ figure.
localrules:
    clip_weights,
    varclip_weights,
    prompt_tables,


ruleorder: varclip_model > train_text  # text_d<depth>/released/seed0 is VAR-CLIP's released model, not trained here


STUDY_METHOD = "|".join(re.escape(m) for m in [*plan.all_methods(config), vt.RELEASED])  # the study's methods


rule captions:
    """A dataset's caption table (varup.data.captions): graded toy captions, a captions file, or class templates."""
    input:
        data=f"{RES}/{{dataset}}/data",
        source=captions_source,  # text.captions.path (kind file): an edit re-runs captions and the text runs
    output:
        json=f"{RES}/{{dataset}}/captions/captions.json",
        npz=f"{RES}/{{dataset}}/captions/captions.npz",
    log:
        f"{RES}/logs/captions/{{dataset}}.log",
    benchmark:
        f"{RES}/benchmarks/captions/{{dataset}}.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("captions"),
    params:
        code=code_of("captions"),
        spec=lambda w: q(TEXT["captions"]),
        out=lambda w, output: os.path.dirname(output.json),
    shell:
        "varup captions --data {input.data} --spec {params.spec} --out {params.out} > {log} 2>&1"


rule clip_weights:
    """OpenAI CLIP weights (sha256-checked): ViT-L-14 (VAR-CLIP's text encoder), ViT-L-14-336 (CMMD)."""
    input:
        lambda w: local_source(*clip_url(w.file)),
    output:
        f"{RSC}/clip/{{file}}",
    log:
        f"{RES}/logs/clip_weights/{{file}}.log",
    benchmark:
        f"{RES}/benchmarks/clip_weights/{{file}}.tsv"
    wildcard_constraints:
        file="|".join(re.escape(f) for f in CLIP_FILES.values()),
    conda:
        CONDA_ENV
    params:
        code=code_of("clip-weights"),
        name=lambda w: next(n for n, f in CLIP_FILES.items() if f == w.file),
        url=lambda w: vt.clip_source(config, w.file, "url"),
        sha=lambda w: vt.clip_source(config, w.file, "sha256"),
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "varup clip-weights --name {params.name} {params.url} {params.sha} --out-dir {params.out} > {log} 2>&1"


rule varclip_weights:
    """VAR-CLIP's released checkpoint (text.released): resumable, sha256-checked (pinned, or recorded on first use)."""
    input:
        lambda w: local_source(TEXT["released"]["url"], "text.released.url"),
    output:
        f"{RSC}/varclip/var_clip_d{{depth}}.pth",
    log:
        f"{RES}/logs/varclip_weights/d{{depth}}.log",
    benchmark:
        f"{RES}/benchmarks/varclip_weights/d{{depth}}.tsv"
    conda:
        CONDA_ENV
    params:
        code=code_of("varclip-weights"),
        url=lambda w: TEXT["released"]["url"],
        sha=lambda w: TEXT["released"]["sha256"] or "",
    shell:
        "varup varclip-weights --url {params.url:q} --sha256 '{params.sha}' --out {output} > {log} 2>&1"


rule varclip_model:
    """The released VAR-CLIP as a model file of the text family (method released): loaded strictly, its CLIP text
    tower's activation and its null condition recorded (text.encoder.act, text.null_condition: auto = VAR-CLIP's)."""
    input:
        f"{RSC}/varclip/var_clip_d{{depth}}.pth",
    output:
        f"{RES}/{{dataset}}/text_d{{depth}}/released/seed0/model.pt",
    log:
        f"{RES}/logs/varclip_model/{{dataset}}_d{{depth}}.log",
    benchmark:
        f"{RES}/benchmarks/varclip_model/{{dataset}}_d{{depth}}.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
        **res("varclip_model"),
    params:
        code=code_of("varclip-model"),
        null=lambda w: vt.text_settings(config)["null_condition"],
        act=lambda w: vt.text_settings(config)["act"],
        arch=TEXT["encoder"]["arch"],
        url=lambda w: TEXT["released"]["url"],
    shell:
        "varup varclip-model --checkpoint {input} --out {output} --null-condition {params.null} --act {params.act}"
        " --arch {params.arch} --depth {wildcards.depth} --source {params.url:q} > {log} 2>&1"


use rule train as train_text with:
    input:
        tokens=f"{RES}/{{dataset}}/tokens/meta.json",
        tokenizer=tokenizer_file,
        refs=f"{RES}/{{dataset}}/refs.pt",
        warm=lambda w: [],
        captions=f"{RES}/{{dataset}}/captions/captions.json",
        encoder=text_encoder_weights,
    output:
        model=f"{RES}/{{dataset}}/text_d{{depth}}/{{method}}/seed{{seed}}/model.pt",
        curve=f"{RES}/{{dataset}}/text_d{{depth}}/{{method}}/seed{{seed}}/train/metrics.jsonl",
        summary=f"{RES}/{{dataset}}/text_d{{depth}}/{{method}}/seed{{seed}}/train/summary.json",
        prov=f"{RES}/{{dataset}}/text_d{{depth}}/{{method}}/seed{{seed}}/model.pt.prov.json",
    log:
        f"{RES}/logs/train/{{dataset}}_text_d{{depth}}_{{method}}_seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{dataset}}_text_d{{depth}}_{{method}}_seed{{seed}}.tsv"
    resources:
        **train_res("train_text"),
        stop_before_limit_s=TRAIN_STOP_S,
    params:
        code=code_of("train"),
        device=GPU_DEVICE,
        spec=lambda w: q(vt.text_run_spec(config, text_run_of(w))),
        tokens=lambda w, input: os.path.dirname(input.tokens),
        work=lambda w, output: os.path.dirname(output.curve),
        warm="",
        text=lambda w, input: f"--captions {os.path.dirname(input.captions)}"
        + (f" --text-encoder-weights {input.encoder}" if input.encoder else ""),
        launch=lambda w, resources: TRAIN_CMD.format(cpus=resources.cpus_per_task),


rule prompt_reference:
    """Inception and CMMD features of a balanced pool of real train images (per mode on toy data, else per class)."""
    input:
        unpack(cmmd_inputs),
        data=f"{RES}/{{dataset}}/data",
        inception=f"{RSC}/inception/inception.json",
    output:
        f"{RES}/{{dataset}}/prompt_reference.npz",
    log:
        f"{RES}/logs/prompts/{{dataset}}_reference.log",
    benchmark:
        f"{RES}/benchmarks/prompts/{{dataset}}_reference.tsv"
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("prompt_reference"),
    params:
        code=code_of("prompt-reference"),
        device=GPU_DEVICE,
        per=PROMPTS["real_per_group"],
        kind=PROMPTS["cmmd"]["features"],
        net=lambda w, input: cmmd_flags(input),
    shell:
        "varup prompt-reference --threads {threads} --device {params.device} --data {input.data}"
        " --inception {input.inception} --per-group {params.per} --cmmd {params.kind} {params.net} --out {output}"
        " > {log} 2>&1"


rule prompt_sets:
    """One run's prompt sets (DropPath sweep, entanglement, descriptiveness) and their MC-Dropout σ; fam is "" for
    the class-conditional VAR and "text_" for the text-conditioned one."""
    input:
        model=study_model,
        tokenizer=tokenizer_file,
        data=f"{RES}/{{dataset}}/data",
        encoder=lambda w: text_encoder_weights(w) if w.fam else [],
        masks=lambda w: [d] if (d := prompt_mask_dir(w)) and os.path.isdir(d) else [],  # text.prompts.mask_dir
    output:
        f"{RES}/{{dataset}}/{{fam}}d{{depth}}/{{method}}/seed{{seed}}/prompts/sets.json",
    log:
        f"{RES}/logs/prompts/{{dataset}}_{{fam}}d{{depth}}_{{method}}_seed{{seed}}_sets.log",
    benchmark:
        f"{RES}/benchmarks/prompts/{{dataset}}_{{fam}}d{{depth}}_{{method}}_seed{{seed}}_sets.tsv"
    wildcard_constraints:
        fam="(text_)?",
        method=STUDY_METHOD,
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("prompt_sets"),
    params:
        code=code_of("prompt-sets"),
        device=GPU_DEVICE,
        family=lambda w: "text" if w.fam else "var",
        params=q(
            {k: v for k, v in PROMPTS.items() if k not in ("families", "real_per_group", "cmmd", "mask_dir")}
            | {k: UNC[k] for k in ("set_droppath_rate", "droppath_masks", "sigma_reading")}
        ),
        weights=lambda w, input: f"--text-encoder-weights {input.encoder}" if input.encoder else "",
        masks=lambda w: f"--mask-dir {q(d)}" if (d := prompt_mask_dir(w)) else "",
    shell:
        "varup prompt-sets --threads {threads} --device {params.device} --model {input.model}"
        " --tokenizer {input.tokenizer} --data {input.data} --family {params.family} --params {params.params}"
        " {params.weights} {params.masks} --out {output} > {log} 2>&1"


rule prompt_scores:
    """FID/KID (Inception), CMMD and (toy) the modes of every prompt set of a run, against the reference pool."""
    input:
        unpack(cmmd_inputs),
        sets=f"{RES}/{{dataset}}/{{fam}}d{{depth}}/{{method}}/seed{{seed}}/prompts/sets.json",
        reference=f"{RES}/{{dataset}}/prompt_reference.npz",
        data=f"{RES}/{{dataset}}/data",
        inception=f"{RSC}/inception/inception.json",
        modes=lambda w: [mode_classifier_file(w)] if ds(w)["kind"] == "toy" else [],
    output:
        f"{RES}/{{dataset}}/{{fam}}d{{depth}}/{{method}}/seed{{seed}}/prompts/scores.json",
    log:
        f"{RES}/logs/prompts/{{dataset}}_{{fam}}d{{depth}}_{{method}}_seed{{seed}}_scores.log",
    benchmark:
        f"{RES}/benchmarks/prompts/{{dataset}}_{{fam}}d{{depth}}_{{method}}_seed{{seed}}_scores.tsv"
    wildcard_constraints:
        fam="(text_)?",
        method=STUDY_METHOD,
    conda:
        CONDA_ENV
    threads: THREADS
    resources:
        **GPU,
        **res("prompt_scores"),
    params:
        code=code_of("prompt-scores"),
        device=GPU_DEVICE,
        params=lambda w: q(inception_metric_params()),
        net=lambda w, input: (f"--classifier {input.modes[0]}" if input.modes else "")
        + (f" --clip-weights {input.clip}" if "clip" in input.keys() else ""),
    shell:
        "varup prompt-scores --threads {threads} --device {params.device} --sets {input.sets}"
        " --reference {input.reference} --data {input.data} --inception {input.inception} --params {params.params}"
        " {params.net} --out {output} > {log} 2>&1"


rule prompt_tables:
    """The prompt study's tables (laid out like the companion study's, its numbers beside) and σ figure."""
    input:
        scores=[f"{RES}/{r.path}/prompts/scores.json" for r in STUDY_RUNS],
        sets=[f"{RES}/{r.path}/prompts/sets.json" for r in STUDY_RUNS],
    output:  # in the report of `snakemake --report <file> all prompt_study`
        **{
            f"{t}_{e}": (
                report(
                    f"{RES}/tables/{t}.{e}", caption=f"../report/{t}.rst", category="Prompt study", labels={"table": t}
                )
                if e == "html"
                else f"{RES}/tables/{t}.{e}"
            )
            for t in PROMPT_TABLES
            for e in ("csv", "md", "tex", "html")
        },
        sigma_png=report(
            f"{RES}/figures/prompt_sigma.png",
            caption="../report/prompt_sigma.rst",
            category="Prompt study",
            labels={"figure": "prompt_sigma"},
        ),
        sigma_pdf=f"{RES}/figures/prompt_sigma.pdf",
    log:
        f"{RES}/logs/prompt_tables.log",
    benchmark:
        f"{RES}/benchmarks/prompt_tables.tsv"
    conda:
        CONDA_ENV
    resources:
        **CPU,
    params:
        code=code_of("tables") + code_of("figures"),
        cfg=lambda w: q({**reporting.report_config(config), "text": TEXT}),
        results=lambda w: RES,
        tables=lambda w, output: os.path.dirname(output[0]),
        figures=lambda w, output: os.path.dirname(output.sigma_png),
    shell:
        "(varup tables --config {params.cfg} --results {params.results} --out {params.tables} --only prompts"
        " && varup figures --config {params.cfg} --results {params.results} --out {params.figures} --only prompts)"
        " > {log} 2>&1"
