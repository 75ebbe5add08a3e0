# What the run cost, stage by stage, against the calibration job's bare forward pass.
rule cost:
    input:
        jobs=model_job_costs(),
        calibration=f"{RUN}/cost/calibrate.parquet",
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


rule report:
    input:
        prompts=f"{RUN}/prompts.parquet",
        model=f"{RUN}/model",
        baseline=f"{RUN}/evaluation/baseline.parquet",
        units=per_relation(f"{RUN}/units/{{relation}}.parquet"),
        expertise=per_relation(f"{RUN}/expertise/{{relation}}.parquet"),
        overlap=f"{RUN}/overlap.parquet",
        significance=f"{RUN}/significance.parquet",
        sweep=f"{RUN}/sweep.parquet",
        neuron_stats=f"{RUN}/neuron_stats.parquet",
        top_activations=f"{RUN}/top_activations.parquet",
        decoded=f"{RUN}/decoded.parquet",
        perplexity=f"{RUN}/perplexity.parquet",
        sparsity=f"{RUN}/sparsity.parquet",
        languages=f"{RUN}/languages.parquet",
        cost=f"{RUN}/cost.parquet",
        plan=f"{RUN}/plan.json",
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
        code=code("report"),
    shell:
        "neuronmap report --config-json {params.config_json:q} --prompts {input.prompts} "
        "--model-dir {input.model} --baseline {input.baseline} --units {input.units} "
        "--expertise {input.expertise} --overlap {input.overlap} "
        "--significance {input.significance} --sweep {input.sweep} "
        "--neuron-stats {input.neuron_stats} --top-activations {input.top_activations} "
        "--decoded {input.decoded} --perplexity {input.perplexity} "
        "--sparsity {input.sparsity} --languages {input.languages} --cost {input.cost} "
        "--plan {input.plan} "
        "--out {output.html} --figures-dir {output.figures} 2> {log}"
