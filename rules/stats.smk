rule stats_block:
    input:
        prompts=f"{RUN}/prompts.parquet",
        responses=shard_outputs("parquet"),
        code=package_files("expertise", "responses", "prompts"),
    output:
        f"{RUN}/expertise/blocks/block-{{block}}.parquet",
    log:
        f"{RUN}/logs/stats/block-{{block}}.log",
    benchmark:
        f"{RUN}/benchmarks/stats_block/block-{{block}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        relations=RELATIONS,
        pooling=config["pooling"],
        blocks=config["stats_blocks"],
        negatives_per_positive=config["negatives_per_positive"],
        seed=config["split"]["seed"],
    shell:
        "neuronmap stats-block --prompts {input.prompts} --responses {input.responses} "
        "--relations {params.relations} --pooling {params.pooling} --block {wildcards.block} "
        "--blocks {params.blocks} --negatives-per-positive {params.negatives_per_positive} "
        "--seed {params.seed} --out {output} 2> {log}"


rule stats:
    input:
        prompts=f"{RUN}/prompts.parquet",
        blocks=expand(
            f"{RUN}/expertise/blocks/block-{{block}}.parquet", block=STATS_BLOCKS
        ),
        code=package_files("expertise", "prompts"),
    output:
        expertise=f"{RUN}/expertise/{{relation}}.parquet",
        prompts=f"{RUN}/expertise/{{relation}}.prompts.parquet",
        units=f"{RUN}/units/{{relation}}.parquet",
    log:
        f"{RUN}/logs/stats/{{relation}}.log",
    benchmark:
        f"{RUN}/benchmarks/stats/{{relation}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        negatives_per_positive=config["negatives_per_positive"],
        seed=config["split"]["seed"],
        top_k=config["top_k"],
    shell:
        "neuronmap stats --prompts {input.prompts} --blocks {input.blocks} "
        "--relation {wildcards.relation} --negatives-per-positive {params.negatives_per_positive} "
        "--seed {params.seed} --top-k {params.top_k} --out-expertise {output.expertise} "
        "--out-prompts {output.prompts} --out-units {output.units} 2> {log}"


rule overlap:
    input:
        units=expand(f"{RUN}/units/{{relation}}.parquet", relation=RELATIONS),
        code=package_files("overlap"),
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
        top_k=config["top_k"],
    shell:
        "neuronmap overlap --units {input.units} --top-k {params.top_k} --out {output} 2> {log}"


# --- Analyses of the units (issue 4): shared units, LM-head decoding, sparsity ---


rule shared_units:
    input:
        units=expand(f"{RUN}/units/{{relation}}.parquet", relation=RELATIONS),
        code=package_files("analysis_commands", "overlap"),
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
        top_k=config["top_k"],
    shell:
        "neuronmap shared-units --units {input.units} --top-k {params.top_k} --out {output} 2> {log}"


rule decode:
    input:
        model=f"{RUN}/model",
        code=package_files(
            "analysis_commands", "decode", "architectures", "model_loading"
        ),
    output:
        f"{RUN}/decoded.parquet",
    log:
        f"{RUN}/logs/decode.log",
    benchmark:
        f"{RUN}/benchmarks/decode.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    params:
        decode=config["decode"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap decode --model-dir {input.model} --sites {params.decode[sites]} "
        "--norm-gain {params.decode[norm_gain]} --top-n {params.decode[top_n]} "
        "--search {params.decode[search]} "
        "--device {params.device} --dtype {params.dtype} {params.trust} --threads {threads} "
        "--out {output} 2> {log}"


rule sparsity:
    input:
        stats=f"{RUN}/neuron_stats.parquet",
        code=package_files("analysis_commands", "sparsity"),
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
        rare_rate=config["sparsity"]["rare_rate"],
    shell:
        "neuronmap sparsity --neuron-stats {input.stats} --rare-rate {params.rare_rate} "
        "--out {output.layers} --out-dead {output.dead} 2> {log}"
