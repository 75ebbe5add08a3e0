# The explain stage (docs/explain.md): the chosen units described in words, by the model-free
# baseline and a text model, and every description scored on held-out contexts against another
# unit's description (docs/parquet.md, "Explanations").


rule explain_units:
    input:
        unpack(explain_sources),
    output:
        f"{RUN}/explain/units.parquet",
    log:
        f"{RUN}/logs/explain_units.log",
    benchmark:
        f"{RUN}/benchmarks/explain_units.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("explain-units"),
        code=code("explain-units"),
        sources=explain_source_options,
    shell:
        "neuronmap explain-units --settings {params.settings:q} {params.sources} "
        "--out {output} 2> {log}"


# One job per range of units; a killed job, run again, resumes from its journal.
rule explain:
    input:
        contexts=rules.corpus_contexts.output[0],
        model=rules.prepare_model.output[0],
        units=rules.explain_units.output[0],
    output:
        explanations=f"{RUN}/explain/shards/shard-{{shard}}.explanations.parquet",
        sets=f"{RUN}/explain/shards/shard-{{shard}}.sets.parquet",
        cost=f"{RUN}/cost/explain/shard-{{shard}}.parquet",
    log:
        f"{RUN}/logs/explain/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/explain/shard-{{shard}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=6000,
    params:
        settings=settings("explain"),
        code=code("explain"),
        journal=f"{RUN}/explain/checkpoints/explain-{{shard}}.jsonl",
    shell:
        "neuronmap explain --settings {params.settings:q} --model-dir {input.model} "
        "--contexts {input.contexts} --units {input.units} --shard {wildcards.shard} "
        "--threads {threads} --journal {params.journal} "
        "--out-explanations {output.explanations} --out-sets {output.sets} "
        "--out-cost {output.cost} 2> {log}"


rule explain_score:
    input:
        model=rules.prepare_model.output[0],
        units=rules.explain_units.output[0],
        explanations=explain_shards("explanations"),
        sets=rules.explain.output.sets,
    output:
        f"{RUN}/explain/shards/shard-{{shard}}.scores.parquet",
    log:
        f"{RUN}/logs/explain_score/shard-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/explain_score/shard-{{shard}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=6000,
    params:
        settings=settings("explain-score"),
        code=code("explain-score"),
        journal=f"{RUN}/explain/checkpoints/score-{{shard}}.jsonl",
    shell:
        "neuronmap explain-score --settings {params.settings:q} --model-dir {input.model} "
        "--units {input.units} --explanations {input.explanations} --sets {input.sets} "
        "--shard {wildcards.shard} --threads {threads} --journal {params.journal} "
        "--out {output} 2> {log}"


rule explain_merge:
    input:
        explanations=explain_shards("explanations"),
        scores=expand(rules.explain_score.output[0], shard=EXPLAIN_SHARDS),
    output:
        explanations=f"{RUN}/explain/explanations.parquet",
        scores=f"{RUN}/explain/scores.parquet",
    log:
        f"{RUN}/logs/explain_merge.log",
    benchmark:
        f"{RUN}/benchmarks/explain_merge.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("explain-merge"),
        code=code("explain-merge"),
    shell:
        "neuronmap explain-merge --settings {params.settings:q} "
        "--explanations {input.explanations} --scores {input.scores} "
        "--out-explanations {output.explanations} --out-scores {output.scores} 2> {log}"
