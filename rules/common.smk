import json
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml", set_default=True)

RUN = f"results/{config['run']}"
RELATIONS = config["relations"]["names"]
SHARDS = list(range(config["shards"]))
PACKAGE = Path(workflow.basedir) / "src" / "neuronmap"


def package_files(*modules):
    """Package modules as inputs, so that editing one reruns exactly the stages that import it."""
    shared = ("__init__", "cli", "errors", "parquet_io", "schemas")
    return sorted(str(PACKAGE / f"{name}.py") for name in set(modules) | set(shared))


def relation_file(wildcards):
    return [
        str(path)
        for name in RELATIONS
        for path in Path(config["relations"]["dir"]).rglob(f"{name}.json")
    ]


def shard_responses(wildcards):
    return expand(
        f"{RUN}/responses/{{relation}}/shard-{{shard}}.parquet",
        relation=RELATIONS,
        shard=SHARDS,
    )


def trust_flag():
    return "--trust-remote-code" if config["trust_remote_code"] else ""


def all_outputs():
    return [f"{RUN}/report.html"]
