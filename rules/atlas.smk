# The atlas of every unit (docs/parquet.md, "Atlas"): its index, built from whatever stages the
# config runs. Not part of `all`: `snakemake --cores 2 atlas_index`, then `neuronmap atlas`.


rule atlas_index:
    input:
        unpack(atlas_sources),
    output:
        f"{RUN}/atlas/units.parquet",
    log:
        f"{RUN}/logs/atlas_index.log",
    benchmark:
        f"{RUN}/benchmarks/atlas_index.tsv"
    conda:
        "../envs/neuronmap.yaml"
    resources:
        mem_mb=4000,
    params:
        code=code("atlas-index"),
    shell:
        "neuronmap atlas-index --units {input.units} --examples {input.examples} "
        "--peak-tokens {input.peak_tokens} --neuron-stats {input.neuron_stats} "
        "--decoded {input.decoded} --expertise {input.expertise} "
        "--label-records {input.label_records} --label-units {input.label_units} "
        "--label-expertise {input.label_expertise} --explanations {input.explanations} "
        "--explain-scores {input.explain_scores} --out {output} 2> {log}"
