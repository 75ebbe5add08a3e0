# The labels stage: labelled corpora's per-label records, LAPE's and AP's selections, and the
# perplexity check against random units (docs/parquet.md, "Labelled corpora").


rule label_select:
    input:
        contexts=rules.corpus_contexts.output[0],
        labels=corpus_shards("labels"),
        responses=corpus_shards("responses") if LABEL_RESPONSES else [],
    output:
        records=f"{RUN}/labels/label_records.parquet",
        expertise=f"{RUN}/labels/label_expertise.parquet",
        units=f"{RUN}/labels/label_units.parquet",
        overlap=f"{RUN}/labels/overlap.parquet",
    log:
        f"{RUN}/logs/label_select.log",
    benchmark:
        f"{RUN}/benchmarks/label_select.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        mem_mb=8000,
    params:
        settings=settings("label-select"),
        code=code("label-select"),
    shell:
        "neuronmap label-select --settings {params.settings:q} --contexts {input.contexts} "
        "--labels {input.labels} --responses {input.responses} "
        "--out-records {output.records} --out-expertise {output.expertise} "
        "--out-units {output.units} --out-overlap {output.overlap} 2> {log}"


rule label_perplexity:
    input:
        contexts=rules.corpus_contexts.output[0],
        model=rules.prepare_model.output[0],
        units=rules.label_select.output.units,
    output:
        contexts=f"{RUN}/labels/perplexity_contexts.parquet",
        summary=f"{RUN}/labels/perplexity.parquet",
    log:
        f"{RUN}/logs/label_perplexity.log",
    benchmark:
        f"{RUN}/benchmarks/label_perplexity.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=6000,
    params:
        settings=settings("label-perplexity"),
        code=code("label-perplexity"),
    shell:
        "neuronmap label-perplexity --settings {params.settings:q} --model-dir {input.model} "
        "--contexts {input.contexts} --units {input.units} --threads {threads} "
        "--out-contexts {output.contexts} --out {output.summary} 2> {log}"
