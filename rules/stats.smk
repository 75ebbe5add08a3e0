rule stats:
    input:
        prompts=f"{RUN}/prompts.parquet",
        responses=shard_responses,
        code=package_files("expertise", "responses", "prompts", "architectures"),
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
        mem_mb=4000,
    params:
        negatives_per_positive=config["negatives_per_positive"],
        seed=config["split"]["seed"],
        top_k=config["top_k"],
    shell:
        "neuronmap stats --prompts {input.prompts} --responses {input.responses} "
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
