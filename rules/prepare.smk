rule prepare_model:
    input:
        code=package_files("model_loading", "architectures"),
    output:
        directory(f"{RUN}/model"),
    log:
        f"{RUN}/logs/prepare_model.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_model.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        model=config["model"],
        trust=trust_flag(),
    shell:
        "neuronmap prepare-model --model {params.model:q} {params.trust} --out {output} 2> {log}"


# One prompts file per relation, so that adding a relation leaves the others' files (and their
# extraction jobs) untouched: a relation's prompts depend only on its own file and the seed.
rule prepare_prompts:
    input:
        relation=relation_file,
        code=package_files("prompts", "relations"),
    output:
        f"{RUN}/prompts/{{relation}}.parquet",
    log:
        f"{RUN}/logs/prepare_prompts/{{relation}}.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_prompts/{{relation}}.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    params:
        relations_dir=config["relations"]["dir"],
        max_facts=config["relations"]["max_facts"],
        templates=config["templates"],
        few_shot=config["few_shot"],
        split=config["split"],
        shards=config["shards"],
    shell:
        "neuronmap prepare --relations-dir {params.relations_dir:q} --relations {wildcards.relation} "
        "--templates {params.templates} --few-shot {params.few_shot} --max-facts {params.max_facts} "
        "--test-facts {params.split[test_facts]} --max-test-fraction {params.split[max_test_fraction]} "
        "--seed {params.split[seed]} --shards {params.shards} --out {output} 2> {log}"


# Every relation's prompts in one file, for the stages that need all of them (negatives for
# expertise, test prompts for evaluation).
rule merge_prompts:
    input:
        relations=expand(f"{RUN}/prompts/{{relation}}.parquet", relation=RELATIONS),
        code=package_files(),
    output:
        f"{RUN}/prompts.parquet",
    log:
        f"{RUN}/logs/merge_prompts.log",
    benchmark:
        f"{RUN}/benchmarks/merge_prompts.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=1000,
    shell:
        "neuronmap merge-prompts --inputs {input.relations} --out {output} 2> {log}"
