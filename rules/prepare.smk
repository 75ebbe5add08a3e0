rule prepare_model:
    output:
        directory(MODEL_DIR),
    log:
        f"{RUN}/logs/prepare_model.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_model.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        settings=settings("prepare-model"),
        code=code("prepare-model"),
    shell:
        "neuronmap prepare-model --settings {params.settings:q} --out {output} 2> {log}"


# One prompts file per relation, so that adding a relation leaves the others' files (and their
# extraction jobs) untouched: a relation's prompts depend only on its own file and the seed.
rule prepare_prompts:
    input:
        relation=relation_file,
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
        settings=settings("prepare"),
        code=code("prepare"),
    shell:
        "neuronmap prepare --settings {params.settings:q} --relation {wildcards.relation} "
        "--relation-file {input.relation:q} --out {output} 2> {log}"


# Every relation's prompts in one file, for the stages that need all of them (negatives for
# expertise, test prompts for evaluation).
rule merge_prompts:
    input:
        relations=per_relation(rules.prepare_prompts.output[0]),
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
    params:
        code=code("merge-prompts"),
    shell:
        "neuronmap merge-prompts --inputs {input.relations} --out {output} 2> {log}"


# The test prompts of the configured relations' translations, prompted like the source's.
rule prepare_language_prompts:
    input:
        translations=language_files,
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
        settings=settings("prepare-languages"),
        code=code("prepare-languages"),
    shell:
        "neuronmap prepare-languages --settings {params.settings:q} "
        "--translations {input.translations:q} --out {output} 2> {log}"
