rule stats_block:
    input:
        prompts=rules.merge_prompts.output[0],
        responses=per_shard(rules.extract.output.responses),
    output:
        f"{RUN}/expertise/blocks/block-{{block}}.parquet",
    log:
        f"{RUN}/logs/stats/block-{{block}}.log",
    benchmark:
        f"{RUN}/benchmarks/stats_block/block-{{block}}.tsv"
    priority: STUDY_PRIORITY
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
    params:
        settings=settings("stats-block"),
        code=code("stats-block"),
    shell:
        "neuronmap stats-block --settings {params.settings:q} --prompts {input.prompts} "
        "--responses {input.responses} --block {wildcards.block} --out {output} 2> {log}"


rule stats:
    input:
        prompts=rules.merge_prompts.output[0],
        blocks=expand(rules.stats_block.output[0], block=STATS_BLOCKS),
    output:
        expertise=f"{RUN}/expertise/{{relation}}.parquet",
        prompts=f"{RUN}/expertise/{{relation}}.prompts.parquet",
        units=f"{RUN}/units/{{relation}}.parquet",
    log:
        f"{RUN}/logs/stats/{{relation}}.log",
    benchmark:
        f"{RUN}/benchmarks/stats/{{relation}}.tsv"
    priority: STUDY_PRIORITY
    conda:
        "../envs/neuronmap.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=settings("stats"),
        code=code("stats"),
    shell:
        "neuronmap stats --settings {params.settings:q} --prompts {input.prompts} "
        "--blocks {input.blocks} --relation {wildcards.relation} "
        "--out-expertise {output.expertise} --out-prompts {output.prompts} "
        "--out-units {output.units} 2> {log}"


rule overlap:
    input:
        units=per_relation(rules.stats.output.units),
    output:
        f"{RUN}/overlap.parquet",
    log:
        f"{RUN}/logs/overlap.log",
    benchmark:
        f"{RUN}/benchmarks/overlap.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        settings=settings("overlap"),
        code=code("overlap"),
    shell:
        "neuronmap overlap --settings {params.settings:q} --units {input.units} "
        "--out {output} 2> {log}"


rule shared_units:
    input:
        units=per_relation(rules.stats.output.units),
    output:
        f"{RUN}/shared_units.parquet",
    log:
        f"{RUN}/logs/shared_units.log",
    benchmark:
        f"{RUN}/benchmarks/shared_units.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        settings=settings("shared-units"),
        code=code("shared-units"),
    shell:
        "neuronmap shared-units --settings {params.settings:q} --units {input.units} "
        "--out {output} 2> {log}"


rule decode:
    input:
        model=rules.prepare_model.output[0],
    output:
        f"{RUN}/decoded.parquet",
    log:
        f"{RUN}/logs/decode.log",
    benchmark:
        f"{RUN}/benchmarks/decode.tsv"
    priority: DECODE_PRIORITY
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=4000,
    params:
        settings=settings("decode"),
        code=code("decode"),
    shell:
        "neuronmap decode --settings {params.settings:q} --model-dir {input.model} "
        "--threads {threads} --out {output} 2> {log}"


rule sparsity:
    input:
        stats=rules.neuron_stats.output.stats,
    output:
        layers=f"{RUN}/sparsity.parquet",
        dead=f"{RUN}/dead_units.parquet",
    log:
        f"{RUN}/logs/sparsity.log",
    benchmark:
        f"{RUN}/benchmarks/sparsity.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("sparsity"),
        code=code("sparsity"),
    shell:
        "neuronmap sparsity --settings {params.settings:q} --neuron-stats {input.stats} "
        "--out {output.layers} --out-dead {output.dead} 2> {log}"


# The selection rerun on permuted relation labels, on pairs of relations and on halves of the
# facts, for one block of layers (one sort per unit serves them all): versatility's and
# stability's map step.
rule labeling_block:
    input:
        prompts=rules.merge_prompts.output[0],
        responses=per_shard(rules.extract.output.responses),
    output:
        f"{RUN}/labelings/block-{{block}}.parquet",
    log:
        f"{RUN}/logs/labelings/block-{{block}}.log",
    benchmark:
        f"{RUN}/benchmarks/labeling_block/block-{{block}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        mem_mb=4000,
    params:
        settings=settings("labeling-block"),
        code=code("labeling-block"),
    shell:
        "neuronmap labeling-block --settings {params.settings:q} --prompts {input.prompts} "
        "--responses {input.responses} --block {wildcards.block} --out {output} 2> {log}"


rule versatility:
    input:
        units=per_relation(rules.stats.output.units),
        blocks=expand(rules.labeling_block.output[0], block=STATS_BLOCKS),
        expertise=expand(rules.stats.output.expertise, relation=RELATIONS[0]),
    output:
        f"{RUN}/versatility.parquet",
    log:
        f"{RUN}/logs/versatility.log",
    benchmark:
        f"{RUN}/benchmarks/versatility.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("versatility"),
        code=code("versatility"),
    shell:
        "neuronmap versatility --settings {params.settings:q} --units {input.units} "
        "--blocks {input.blocks} --expertise {input.expertise} --out {output} 2> {log}"


rule stability:
    input:
        prompts=rules.merge_prompts.output[0],
        blocks=expand(rules.labeling_block.output[0], block=STATS_BLOCKS),
    output:
        f"{RUN}/stability.parquet",
    log:
        f"{RUN}/logs/stability.log",
    benchmark:
        f"{RUN}/benchmarks/stability.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        settings=settings("stability"),
        code=code("stability"),
    shell:
        "neuronmap stability --settings {params.settings:q} --prompts {input.prompts} "
        "--blocks {input.blocks} --out {output} 2> {log}"
