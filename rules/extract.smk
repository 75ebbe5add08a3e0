rule extract:
    input:
        prompts=f"{RUN}/prompts/{{relation}}.parquet",
        model=f"{RUN}/model",
        code=package_files(
            "extract",
            "hooks",
            "neuron_stats",
            "architectures",
            "batching",
            "responses",
            "model_loading",
            "host_memory",
        ),
    output:
        responses=f"{RUN}/responses/{{relation}}/shard-{{shard}}.parquet",
        stats=f"{RUN}/responses/{{relation}}/shard-{{shard}}.stats.parquet",
        top=f"{RUN}/responses/{{relation}}/shard-{{shard}}.top.parquet",
    log:
        f"{RUN}/logs/extract/{{relation}}-{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/extract/{{relation}}-{{shard}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    params:
        sites=config["sites"],
        poolings=config["poolings"],
        batch_size=config["batch_size"],
        batch_tokens=config["batch_tokens"],
        response_dtype=config["response_dtype"],
        top_n=config["top_activations"],
        active_threshold=config["active_threshold"],
        include_bos=config["include_bos"],
        fused_statistics=config["fused_statistics"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap extract --model-dir {input.model} --prompts {input.prompts} "
        "--relation {wildcards.relation} --shard {wildcards.shard} --sites {params.sites} "
        "--poolings {params.poolings} --batch-size {params.batch_size} "
        "--batch-tokens {params.batch_tokens} --response-dtype {params.response_dtype} "
        "--top-n {params.top_n} --active-threshold {params.active_threshold} "
        "--include-bos {params.include_bos} --fused-statistics {params.fused_statistics} --device {params.device} --dtype {params.dtype} "
        "{params.trust} --threads {threads} --out {output.responses} "
        "--out-stats {output.stats} --out-top {output.top} 2> {log}"


rule neuron_stats:
    input:
        stats=shard_outputs("stats.parquet"),
        top=shard_outputs("top.parquet"),
        code=package_files("neuron_stats", "hooks"),
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
        top_n=config["top_activations"],
    shell:
        "neuronmap neuron-stats --stats {input.stats} --top {input.top} --top-n {params.top_n} "
        "--out {output.stats} --out-top {output.top} 2> {log}"
