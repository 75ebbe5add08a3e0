# neuronmap: which neurons of a language model carry a relation, and what switching them off does.


from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"


wildcard_constraints:
    relation="[A-Za-z0-9_.-]+",
    shard=r"\d+",
    block=r"\d+",


include: "rules/prepare.smk"
include: "rules/plan.smk"
include: "rules/extract.smk"
include: "rules/stats.smk"
include: "rules/ablate.smk"
include: "rules/report.smk"
include: "rules/corpus.smk"
include: "rules/labels.smk"
include: "rules/atlas.smk"
include: "rules/explain.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
