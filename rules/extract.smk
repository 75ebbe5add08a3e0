rule extract:
    input:
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        code=package_files(
            "extract",
            "hooks",
            "architectures",
            "batching",
            "responses",
            "model_loading",
        ),
    output:
        f"{RUN}/responses/{{relation}}/shard-{{shard}}.parquet",
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
        pooling=config["pooling"],
        batch_size=config["batch_size"],
        response_dtype=config["response_dtype"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap extract --model-dir {input.model} --prompts {input.prompts} "
        "--relation {wildcards.relation} --shard {wildcards.shard} --sites {params.sites} "
        "--pooling {params.pooling} --batch-size {params.batch_size} "
        "--response-dtype {params.response_dtype} --device {params.device} --dtype {params.dtype} "
        "{params.trust} --threads {threads} --out {output} 2> {log}"
