rule prepare_model:
    input:
        code=package_files("model_loading", "architectures"),
    output:
        directory(f"{RUN}/model"),
    params:
        model=config["model"],
        trust=trust_flag(),
    log:
        f"{RUN}/logs/prepare_model.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_model.tsv"
    resources:
        mem_mb=4000,
    conda:
        "../envs/neuronmap.yaml"
    shell:
        "neuronmap prepare-model --model {params.model:q} {params.trust} --out {output} 2> {log}"


rule prepare_prompts:
    input:
        relations=relation_file,
        code=package_files("prompts", "relations"),
    output:
        f"{RUN}/prompts.parquet",
    params:
        relations_dir=config["relations"]["dir"],
        relations=RELATIONS,
        max_facts=config["relations"]["max_facts"],
        templates=config["templates"],
        few_shot=config["few_shot"],
        split=config["split"],
        shards=config["shards"],
    log:
        f"{RUN}/logs/prepare_prompts.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_prompts.tsv"
    resources:
        mem_mb=1000,
    conda:
        "../envs/neuronmap.yaml"
    shell:
        "neuronmap prepare --relations-dir {params.relations_dir:q} --relations {params.relations} "
        "--templates {params.templates} --few-shot {params.few_shot} --max-facts {params.max_facts} "
        "--test-facts {params.split[test_facts]} --max-test-fraction {params.split[max_test_fraction]} "
        "--seed {params.split[seed]} --shards {params.shards} --out {output} 2> {log}"
