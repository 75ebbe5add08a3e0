# Before any model-running job: what each will need (memory per device, tokens, FLOPs, time,
# bytes written), from the model's config and tokenizer and the run's config; the report shows it
# beside what the run measured (cost.parquet). Ask for it alone before submitting a run:
# snakemake results/<run>/plan.json. The same estimate refuses, while the workflow is parsed, a
# config whose jobs do not fit the memory it gives them.
rule plan:
    input:
        model=rules.prepare_model.output[0],
        relations=relation_files,
    output:
        f"{RUN}/plan.json",
    log:
        f"{RUN}/logs/plan.log",
    benchmark:
        f"{RUN}/benchmarks/plan.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=2000,
    params:
        settings=settings("plan"),
        code=code("plan"),
    shell:
        "neuronmap plan --settings {params.settings:q} --model-dir {input.model} "
        "--out {output} > {log} 2>&1"
