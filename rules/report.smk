rule report:
    input:
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        baseline=f"{RUN}/evaluation/baseline.parquet",
        ablation=expand(f"{RUN}/ablation/{{relation}}.parquet", relation=RELATIONS),
        units=expand(f"{RUN}/units/{{relation}}.parquet", relation=RELATIONS),
        overlap=f"{RUN}/overlap.parquet",
        code=package_files("report"),
    output:
        report(f"{RUN}/report.html", category="Report"),
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        config_json=json.dumps(config, sort_keys=True),
    shell:
        "neuronmap report --prompts {input.prompts} --model-dir {input.model} --baseline {input.baseline} "
        "--ablation {input.ablation} --units {input.units} --overlap {input.overlap} "
        "--config-json {params.config_json:q} --out {output} 2> {log}"
