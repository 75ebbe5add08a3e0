# The corpus pass: every unit's records over real text (docs/parquet.md, "Corpus records").


rule corpus_contexts:
    input:
        corpus=corpus_files,
        model=rules.prepare_model.output[0],
    output:
        f"{RUN}/corpus/contexts.parquet",
    log:
        f"{RUN}/logs/corpus_contexts.log",
    benchmark:
        f"{RUN}/benchmarks/corpus_contexts.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        settings=settings("corpus-contexts"),
        code=code("corpus-contexts"),
    shell:
        "neuronmap corpus-contexts --settings {params.settings:q} --model-dir {input.model} "
        "--out {output} 2> {log}"


# One job per shard; a killed job, run again, resumes from its checkpoint.
rule corpus_records:
    input:
        contexts=rules.corpus_contexts.output[0],
        model=rules.prepare_model.output[0],
    output:
        **corpus_label_outputs(),
        units=f"{RUN}/corpus/shards/shard-{{shard}}.units.parquet",
        extremes=f"{RUN}/corpus/shards/shard-{{shard}}.extremes.parquet",
        cost=f"{RUN}/cost/corpus/shard-{{shard}}.parquet",
    log:
        f"{RUN}/logs/corpus_records/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/corpus_records/shard-{{shard}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=6000,
    params:
        settings=settings("corpus-records"),
        code=code("corpus-records"),
        checkpoint=f"{RUN}/corpus/checkpoints/shard-{{shard}}.pt",
    shell:
        "neuronmap corpus-records --settings {params.settings:q} --model-dir {input.model} "
        "--contexts {input.contexts} --shard {wildcards.shard} --threads {threads} "
        "--out-units {output.units} --out-extremes {output.extremes} --out-cost {output.cost} "
        f"--checkpoint {{params.checkpoint}}{corpus_label_options()} 2> {{log}}"


rule corpus_merge:
    input:
        contexts=rules.corpus_contexts.output[0],
        model=rules.prepare_model.output[0],
        units=corpus_shards("units"),
        extremes=corpus_shards("extremes"),
    output:
        units=f"{RUN}/corpus/units.parquet",
        examples=f"{RUN}/corpus/examples.parquet",
        peak_tokens=f"{RUN}/corpus/peak_tokens.parquet",
    log:
        f"{RUN}/logs/corpus_merge.log",
    benchmark:
        f"{RUN}/benchmarks/corpus_merge.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=8000,
    params:
        settings=settings("corpus-merge"),
        code=code("corpus-merge"),
    shell:
        "neuronmap corpus-merge --settings {params.settings:q} --model-dir {input.model} "
        "--contexts {input.contexts} --units {input.units} --extremes {input.extremes} "
        "--out-units {output.units} --out-examples {output.examples} "
        "--out-peak-tokens {output.peak_tokens} 2> {log}"
