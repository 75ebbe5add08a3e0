rule baseline:
    input:
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        code=package_files(
            "ablation",
            "evaluation",
            "deactivation",
            "architectures",
            "batching",
            "model_loading",
            "prompts",
        ),
    output:
        f"{RUN}/evaluation/baseline.parquet",
    log:
        f"{RUN}/logs/baseline.log",
    benchmark:
        f"{RUN}/benchmarks/baseline.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    params:
        evaluation=config["evaluation"],
        batch_size=config["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap baseline --model-dir {input.model} --prompts {input.prompts} "
        "--max-new-tokens {params.evaluation[max_new_tokens]} --match {params.evaluation[match]} "
        "--case-sensitive {params.evaluation[case_sensitive]} --batch-size {params.batch_size} "
        "--device {params.device} --dtype {params.dtype} {params.trust} --threads {threads} "
        "--out {output} 2> {log}"


rule ablate:
    input:
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        units=f"{RUN}/units/{{relation}}.parquet",
        baseline=f"{RUN}/evaluation/baseline.parquet",
        code=package_files(
            "ablation",
            "evaluation",
            "deactivation",
            "architectures",
            "batching",
            "model_loading",
            "prompts",
        ),
    output:
        summary=f"{RUN}/ablation/{{relation}}.parquet",
        predictions=f"{RUN}/ablation/{{relation}}.predictions.parquet",
    log:
        f"{RUN}/logs/ablate/{{relation}}.log",
    benchmark:
        f"{RUN}/benchmarks/ablate/{{relation}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=4000,
    params:
        top_k=config["top_k"],
        seeds=config["random_seeds"],
        evaluation=config["evaluation"],
        batch_size=config["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap ablate --model-dir {input.model} --prompts {input.prompts} --units {input.units} "
        "--baseline {input.baseline} --relation {wildcards.relation} --top-k {params.top_k} "
        "--seeds {params.seeds} --max-new-tokens {params.evaluation[max_new_tokens]} "
        "--match {params.evaluation[match]} --case-sensitive {params.evaluation[case_sensitive]} "
        "--batch-size {params.batch_size} --device {params.device} --dtype {params.dtype} "
        "{params.trust} --threads {threads} --out-summary {output.summary} "
        "--out-predictions {output.predictions} 2> {log}"
