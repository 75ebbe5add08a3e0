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
    params:
        config_json=json.dumps(config, sort_keys=True),
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    resources:
        mem_mb=2000,
    conda:
        "../envs/neuronmap.yaml"
    shell:
        "neuronmap report --run-dir {RUN} --config-json {params.config_json:q} --out {output} 2> {log}"
