rule prepare_language_prompts:
    input:
        translations=language_files,
        code=package_files("analysis_commands", "languages", "prompts", "relations"),
    output:
        f"{RUN}/prompts.languages.parquet",
    log:
        f"{RUN}/logs/prepare_language_prompts.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_language_prompts.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        languages=config["languages"],
        relations=RELATIONS,
        max_facts=config["relations"]["max_facts"],
        templates=config["templates"],
        few_shot=config["few_shot"],
        split=config["split"],
    shell:
        "neuronmap prepare-languages --dir {params.languages[dir]:q} "
        "--languages {params.languages[evaluate]} --relations {params.relations} "
        "--templates {params.templates} --few-shot {params.few_shot} --max-facts {params.max_facts} "
        "--test-facts {params.split[test_facts]} --max-test-fraction {params.split[max_test_fraction]} "
        "--seed {params.split[seed]} --out {output} 2> {log}"


rule baseline:
    input:
        prompts=f"{RUN}/prompts.parquet",
        language_prompts=f"{RUN}/prompts.languages.parquet",
        model=f"{RUN}/model",
        code=package_files(
            "analysis_commands",
            "ablation",
            "evaluation",
            "deactivation",
            "architectures",
            "batching",
            "model_loading",
            "prompts",
        ),
    output:
        source=f"{RUN}/evaluation/baseline.parquet",
        languages=f"{RUN}/evaluation/baseline.languages.parquet",
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
        source_language=config["languages"]["source"],
        batch_size=config["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap baseline --model-dir {input.model} --prompts {input.prompts} "
        "--language-prompts {input.language_prompts} --source-language {params.source_language} "
        "--max-new-tokens {params.evaluation[max_new_tokens]} --match {params.evaluation[match]} "
        "--case-sensitive {params.evaluation[case_sensitive]} --batch-size {params.batch_size} "
        "--device {params.device} --dtype {params.dtype} {params.trust} --threads {threads} "
        "--out {output.source} --out-languages {output.languages} 2> {log}"


# One job per relation: every configuration of its sweep (each k; top-k and random controls)
# evaluated together in shared forward batches, then perplexity of the neutral text.
rule ablate:
    input:
        prompts=f"{RUN}/prompts.parquet",
        language_prompts=f"{RUN}/prompts.languages.parquet",
        model=f"{RUN}/model",
        units=f"{RUN}/units/{{relation}}.parquet",
        expertise=f"{RUN}/expertise/{{relation}}.parquet",
        baseline=f"{RUN}/evaluation/baseline.parquet",
        text=config["perplexity"]["text"],
        code=package_files(
            "analysis_commands",
            "ablation",
            "evaluation",
            "deactivation",
            "perplexity",
            "architectures",
            "batching",
            "model_loading",
            "prompts",
        ),
    output:
        summary=f"{RUN}/ablation/{{relation}}.parquet",
        predictions=f"{RUN}/ablation/{{relation}}.predictions.parquet",
        language_predictions=f"{RUN}/ablation/{{relation}}.languages.parquet",
        perplexity=f"{RUN}/ablation/{{relation}}.perplexity.parquet",
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
        ablation=config["ablation"],
        evaluation=config["evaluation"],
        source_language=config["languages"]["source"],
        max_tokens=config["perplexity"]["max_tokens"],
        batch_size=config["batch_size"],
        device=config["device"],
        dtype=config["dtype"],
        trust=trust_flag(),
    shell:
        "neuronmap ablate --model-dir {input.model} --prompts {input.prompts} "
        "--language-prompts {input.language_prompts} --source-language {params.source_language} "
        "--units {input.units} --expertise {input.expertise} --baseline {input.baseline} "
        "--relation {wildcards.relation} --top-k {params.top_k} --seeds {params.seeds} "
        "--value {params.ablation[value]} --clamp-value {params.ablation[clamp_value]} "
        "--configs-per-batch {params.ablation[configs_per_batch]} "
        "--random-eval {params.ablation[random_eval]} "
        "--neutral-text {input.text:q} --perplexity-max-tokens {params.max_tokens} "
        "--max-new-tokens {params.evaluation[max_new_tokens]} --match {params.evaluation[match]} "
        "--case-sensitive {params.evaluation[case_sensitive]} --batch-size {params.batch_size} "
        "--device {params.device} --dtype {params.dtype} {params.trust} --threads {threads} "
        "--out-summary {output.summary} --out-predictions {output.predictions} "
        "--out-language-predictions {output.language_predictions} "
        "--out-perplexity {output.perplexity} 2> {log}"


rule ablation_summary:
    input:
        baseline=f"{RUN}/evaluation/baseline.parquet",
        baseline_languages=f"{RUN}/evaluation/baseline.languages.parquet",
        predictions=expand(
            f"{RUN}/ablation/{{relation}}.predictions.parquet", relation=RELATIONS
        ),
        language_predictions=expand(
            f"{RUN}/ablation/{{relation}}.languages.parquet", relation=RELATIONS
        ),
        perplexity=expand(
            f"{RUN}/ablation/{{relation}}.perplexity.parquet", relation=RELATIONS
        ),
        code=package_files("analysis_commands", "sweep", "significance"),
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
        significance=config["significance"],
    shell:
        "neuronmap ablation-summary --baseline {input.baseline} "
        "--baseline-languages {input.baseline_languages} --predictions {input.predictions} "
        "--language-predictions {input.language_predictions} --perplexity {input.perplexity} "
        "--bootstrap-resamples {params.significance[bootstrap_resamples]} "
        "--confidence {params.significance[confidence]} --alpha {params.significance[alpha]} "
        "--seed {params.significance[seed]} --out-significance {output.significance} "
        "--out-sweep {output.sweep} --out-languages {output.languages} "
        "--out-perplexity {output.perplexity} 2> {log}"
