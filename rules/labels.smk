# The labels stage: labelled corpora (docs/parquet.md, "Labelled corpora").


# Every label's held-out contexts with each selection off, against matched random units.
rule label_perplexity:
    input:
        contexts=f"{RUN}/corpus/contexts.parquet",
        model=f"{RUN}/model",
        units=f"{RUN}/labels/label_units.parquet",
    output:
        contexts=f"{RUN}/labels/perplexity_contexts.parquet",
        summary=f"{RUN}/labels/perplexity.parquet",
    log:
        f"{RUN}/logs/label_perplexity.log",
    benchmark:
        f"{RUN}/benchmarks/label_perplexity.tsv"
    conda:
        "../envs/neuronmap.yaml"
    threads: 2
    resources:
        gpu=GPUS,
        mem_mb=6000,
    params:
        settings=settings("label-perplexity"),
        code=code("label-perplexity"),
    shell:
        "neuronmap label-perplexity --settings {params.settings:q} --model-dir {input.model} "
        "--contexts {input.contexts} --units {input.units} --threads {threads} "
        "--out-contexts {output.contexts} --out {output.summary} 2> {log}"
