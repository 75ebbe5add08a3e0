"""Every check of a run's config that needs more than its schema: keys that must agree with one
another, and the relation files, translations and model they name. The workflow runs them while
it is parsed, so bad input stops the run before any job starts, with a message naming the keys."""

from __future__ import annotations

from pathlib import Path

from ..errors import NeuronmapError


def check_keys(config: dict) -> None:
    """What the config says of itself."""
    relations = config["relations"]["names"]
    if len(relations) < 2:
        raise NeuronmapError(
            f"relations.names: {relations} has one relation, but expertise needs at least two (a relation's "
            "negatives are the other relations' prompts)")
    if config["pooling"] not in config["poolings"]:
        raise NeuronmapError(
            f"pooling: {config['pooling']!r} is not among poolings {config['poolings']} (extraction stores only "
            "those): add it to poolings or choose one of them")


def check_relations(config: dict) -> None:
    """Each relation file exists once and holds enough facts for the split and the shards."""
    from ..prepare.prompts import relation_prompts
    from ..prepare.relations import find_relation_file, load_relation
    from ..prepare.settings import PrepareSettings
    settings = PrepareSettings.from_config(config)
    for name in config["relations"]["names"]:
        path = find_relation_file(config["relations"]["dir"], name)
        relation_prompts(load_relation(path, name), settings.prompts, settings.shards)


def check_languages(config: dict) -> None:
    """Each evaluated language has a folder with at least one configured relation translated."""
    from ..prepare.languages import translation_files
    names = config["relations"]["names"]
    for language in config["languages"]["evaluate"]:
        if not translation_files(config["languages"]["dir"], [language], names):
            raise NeuronmapError(
                f"languages.evaluate: {language!r} translates none of relations.names ({', '.join(names)}) in "
                f"{Path(config['languages']['dir']) / language}")


def check_corpus(config: dict) -> None:
    """The corpus exists, holds only files neuronmap reads, no empty label file, and
    corpus.label_column can apply to it. Their contents are read by the corpus_contexts job, which
    names a bad line: reading a large corpus at every parse would not do."""
    if config["corpus"]["path"]:
        from ..corpus.reading import corpus_files
        corpus_files(config["corpus"]["path"], config["corpus"]["label_column"])


def check_model(config: dict, prepared: str | Path | None = None) -> None:
    """The model exists, its architecture is supported and has the configured sites, top_k fits
    its number of units, and a local directory holds what a job loads (safetensors weights, a
    tokenizer, no remote code unless allowed)."""
    from ..model.shape import model_shape
    from ..model.source import check_model_files, check_remote_code
    local = Path(config["model"]).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        check_remote_code(local, config["trust_remote_code"])
    shape = model_shape(config["model"], config["trust_remote_code"], prepared)
    for key, sites in (("sites", config["sites"]), ("decode.sites", config["decode"]["sites"])):
        missing = [site for site in sites if site not in shape.sites]
        if missing:
            raise NeuronmapError(
                f"{key}: {', '.join(missing)} not available in {shape.model_type} (its sites: "
                f"{', '.join(shape.sites)})")
    units = shape.units(config["sites"])
    if max(config["top_k"]) > units:
        raise NeuronmapError(
            f"top_k: {max(config['top_k'])} is more than the {units} units of sites {config['sites']} in "
            f"{shape.model_type} ({shape.n_layers} layers)")
    if local.is_dir() and (local / "config.json").is_file():
        check_model_files(local)


def check_plan(config: dict, prepared: str | Path | None = None) -> None:
    """What the model-running jobs need fits the memory the config gives them (plan/estimate.py)."""
    from ..plan.estimate import needs_parse_time_plan, parse_time_plan
    if needs_parse_time_plan(config):
        parse_time_plan(config, prepared)


def check_explain(config: dict) -> None:
    """The explain stage has the text it reads and the selection it explains."""
    explain = config["explain"]
    if not explain["enabled"]:
        return
    if not config["corpus"]["path"]:
        raise NeuronmapError("explain.enabled: the explain stage reads the corpus contexts: set corpus.path")
    if explain["units"] == "relations" and not config["relation_study"]:
        raise NeuronmapError("explain.units: relations needs relation_study (its units/<relation>.parquet)")
    if explain["units"].startswith("labels"):
        from ..corpus.reading import corpus_files
        labelled = len(corpus_files(config["corpus"]["path"])) >= 2 or config["corpus"]["label_column"] is not None
        if not (labelled and config["labels"]["enabled"]):  # as workflow.labels_active says
            raise NeuronmapError(f"explain.units: {explain['units']} needs the labels stage (a labelled corpus "
                                 "and labels.enabled); choose top:<column> or all")
        if explain["units"] == "labels:ap" and not config["labels"]["ap"]:
            raise NeuronmapError("explain.units: labels:ap needs labels.ap")
    for role in ("explainer", "scorer"):
        spec = explain[role]
        if spec["backend"] == "endpoint" and not (spec["url"] and spec["model"]):
            raise NeuronmapError(f"explain.{role}: the endpoint backend needs url and model")


def check_config(config: dict, prepared: str | Path | None = None) -> None:
    """All of the above, cheapest first. `prepared` is the run's model directory, if it exists."""
    if not config["relation_study"] and not config["corpus"]["path"]:
        raise NeuronmapError("relation_study is off and corpus.path is not set: the run would do nothing")
    check_corpus(config)
    check_explain(config)
    if config["relation_study"]:
        check_keys(config)
        check_relations(config)
        check_languages(config)
    check_model(config, prepared)
    if config["relation_study"]:
        check_plan(config, prepared)
