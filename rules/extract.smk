rule extract:
    input:
        prompts=rules.prepare_prompts.output[0],
        model=rules.prepare_model.output[0],
    output:
        responses=f"{RUN}/responses/{{relation}}/shard-{{shard}}.parquet",
        stats=f"{RUN}/responses/{{relation}}/shard-{{shard}}.stats.parquet",
        top=f"{RUN}/responses/{{relation}}/shard-{{shard}}.top.parquet",
        cost=f"{RUN}/cost/extract/{{relation}}-{{shard}}.parquet",
    log:
        f"{RUN}/logs/extract/{{relation}}-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/extract/{{relation}}-{{shard}}.tsv"
    priority: STUDY_PRIORITY
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=4000,
    params:
        settings=settings("extract"),
        code=code("extract"),
    shell:
        "neuronmap extract --settings {params.settings:q} --model-dir {input.model} "
        "--prompts {input.prompts} --relation {wildcards.relation} --shard {wildcards.shard} "
        "--threads {threads} --out {output.responses} --out-stats {output.stats} "
        "--out-top {output.top} --out-cost {output.cost} 2> {log}"


rule neuron_stats:
    input:
        stats=per_shard(rules.extract.output.stats),
        top=per_shard(rules.extract.output.top),
    output:
        stats=f"{RUN}/neuron_stats.parquet",
        top=f"{RUN}/top_activations.parquet",
    log:
        f"{RUN}/logs/neuron_stats.log",
    benchmark:
        f"{RUN}/benchmarks/neuron_stats.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        settings=settings("neuron-stats"),
        code=code("neuron-stats"),
    shell:
        "neuronmap neuron-stats --settings {params.settings:q} --stats {input.stats} "
        "--top {input.top} --out {output.stats} --out-top {output.top} 2> {log}"


# Bare forward passes of each stage's regime over a sample of the prompts: the floors cost.parquet
# compares the stages with.
rule calibrate:
    input:
        prompts=rules.merge_prompts.output[0],
        model=rules.prepare_model.output[0],
    output:
        f"{RUN}/cost/calibrate.parquet",
    log:
        f"{RUN}/logs/calibrate.log",
    benchmark:
        f"{RUN}/benchmarks/calibrate.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=1,
        mem_mb=4000,
    params:
        settings=settings("calibrate"),
        code=code("calibrate"),
    shell:
        "neuronmap calibrate --settings {params.settings:q} --model-dir {input.model} "
        "--prompts {input.prompts} --threads {threads} --out {output} 2> {log}"
