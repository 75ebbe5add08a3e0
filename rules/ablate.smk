rule baseline:
    input:
        prompts=rules.merge_prompts.output[0],
        language_prompts=rules.prepare_language_prompts.output[0],
        model=rules.prepare_model.output[0],
    output:
        source=f"{RUN}/evaluation/baseline.parquet",
        languages=f"{RUN}/evaluation/baseline.languages.parquet",
        cost=f"{RUN}/cost/baseline.parquet",
    log:
        f"{RUN}/logs/baseline.log",
    benchmark:
        f"{RUN}/benchmarks/baseline.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=4000,
    params:
        settings=settings("baseline"),
        code=code("baseline"),
    shell:
        "neuronmap baseline --settings {params.settings:q} --model-dir {input.model} "
        "--prompts {input.prompts} --language-prompts {input.language_prompts} "
        "--threads {threads} --out {output.source} --out-languages {output.languages} "
        "--out-cost {output.cost} 2> {log}"


# One job per relation: every configuration of its sweep (each k; top-k and random controls)
# evaluated together in shared forward batches, then perplexity of the neutral text.
rule ablate:
    input:
        prompts=rules.merge_prompts.output[0],
        language_prompts=rules.prepare_language_prompts.output[0],
        model=rules.prepare_model.output[0],
        units=rules.stats.output.units,
        expertise=rules.stats.output.expertise,
        text=config["perplexity"]["text"],
    output:
        predictions=f"{RUN}/ablation/{{relation}}.predictions.parquet",
        language_predictions=f"{RUN}/ablation/{{relation}}.languages.parquet",
        perplexity=f"{RUN}/ablation/{{relation}}.perplexity.parquet",
        cost=f"{RUN}/cost/ablate/{{relation}}.parquet",
    log:
        f"{RUN}/logs/ablate/{{relation}}.log",
    benchmark:
        f"{RUN}/benchmarks/ablate/{{relation}}.tsv"
    priority: ablate_priority
    conda:
        "../envs/neuronmap.yaml"
    threads: THREADS
    resources:
        gpu=gpus,
        mem_mb=4000,
    params:
        settings=settings("ablate"),
        code=code("ablate"),
    shell:
        "neuronmap ablate --settings {params.settings:q} --model-dir {input.model} "
        "--prompts {input.prompts} --language-prompts {input.language_prompts} "
        "--units {input.units} --expertise {input.expertise} --relation {wildcards.relation} "
        "--neutral-text {input.text:q} --threads {threads} "
        "--out-predictions {output.predictions} "
        "--out-language-predictions {output.language_predictions} "
        "--out-perplexity {output.perplexity} --out-cost {output.cost} 2> {log}"


rule ablation_summary:
    input:
        baseline=rules.baseline.output.source,
        baseline_languages=rules.baseline.output.languages,
        predictions=per_relation(rules.ablate.output.predictions),
        language_predictions=per_relation(rules.ablate.output.language_predictions),
        perplexity=per_relation(rules.ablate.output.perplexity),
    output:
        significance=f"{RUN}/significance.parquet",
        sweep=f"{RUN}/sweep.parquet",
        languages=f"{RUN}/languages.parquet",
        perplexity=f"{RUN}/perplexity.parquet",
    log:
        f"{RUN}/logs/ablation_summary.log",
    benchmark:
        f"{RUN}/benchmarks/ablation_summary.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("ablation-summary"),
        code=code("ablation-summary"),
    shell:
        "neuronmap ablation-summary --settings {params.settings:q} "
        "--baseline {input.baseline} --baseline-languages {input.baseline_languages} "
        "--predictions {input.predictions} --language-predictions {input.language_predictions} "
        "--perplexity {input.perplexity} --out-significance {output.significance} "
        "--out-sweep {output.sweep} --out-languages {output.languages} "
        "--out-perplexity {output.perplexity} 2> {log}"


# Per relation and k: its own top-k against the random controls on the same test prompts.
rule verdicts:
    input:
        baseline=rules.baseline.output.source,
        predictions=per_relation(rules.ablate.output.predictions),
    output:
        f"{RUN}/verdicts.parquet",
    log:
        f"{RUN}/logs/verdicts.log",
    benchmark:
        f"{RUN}/benchmarks/verdicts.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        settings=settings("verdicts"),
        code=code("verdicts"),
    shell:
        "neuronmap verdicts --settings {params.settings:q} --baseline {input.baseline} "
        "--predictions {input.predictions} --out {output} 2> {log}"
