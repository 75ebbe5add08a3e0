# What the run cost, stage by stage, against the calibration job's bare forward passes of its regime.
rule cost:
    input:
        jobs=model_job_costs,
        calibration=rules.calibrate.output[0],
    output:
        f"{RUN}/cost.parquet",
    log:
        f"{RUN}/logs/cost.log",
    benchmark:
        f"{RUN}/benchmarks/cost.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        code=code("cost"),
    shell:
        "neuronmap cost --jobs {input.jobs} --calibration {input.calibration} "
        "--out {output} 2> {log}"


# The relation study's sections where it ran, the corpus's and the labelled corpora's where they ran.
rule report:
    input:
        unpack(report_inputs),
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
        # The report shows the whole config (and its sha256): it reads every key.
        config_json=json.dumps(config, sort_keys=True),
        inputs=report_options,
        code=code("report"),
    shell:
        "neuronmap report --config-json {params.config_json:q} {params.inputs} "
        "--out {output.html} --figures-dir {output.figures} 2> {log}"
