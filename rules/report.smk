rule report:
    input:
        unpack(report_analyses),
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        baseline=f"{RUN}/evaluation/baseline.parquet",
        ablation=expand(f"{RUN}/ablation/{{relation}}.parquet", relation=RELATIONS),
        units=expand(f"{RUN}/units/{{relation}}.parquet", relation=RELATIONS),
        expertise=expand(f"{RUN}/expertise/{{relation}}.parquet", relation=RELATIONS),
        overlap=f"{RUN}/overlap.parquet",
        code=package_files(
            "report",
            "report_data",
            "report_charts",
            "report_atlas",
            "report_page",
            "model_loading",
        ),
        assets=REPORT_ASSETS,
    output:
        html=report(
            f"{RUN}/report.html", category="Report", labels={"file": "report.html"}
        ),
        figures=report(
            directory(f"{RUN}/figures"),
            patterns=["{name}.svg"],
            category="Figures",
            labels={"figure": "{name}"},
        ),
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
        analyses=report_analysis_options,
    shell:
        "neuronmap report --prompts {input.prompts} --model-dir {input.model} --baseline {input.baseline} "
        "--ablation {input.ablation} --units {input.units} --expertise {input.expertise} "
        "--overlap {input.overlap} {params.analyses} --config-json {params.config_json:q} "
        "--out {output.html} --figures-dir {output.figures} 2> {log}"
