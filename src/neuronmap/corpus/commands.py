"""`neuronmap` subcommands of the corpus stage: contexts from a corpus, one shard's records,
and the merge of every shard's records."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .settings import ContextsSettings, MergeSettings, RecordsSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"corpus-contexts": ContextsSettings, "corpus-records": RecordsSettings, "corpus-merge": MergeSettings}


def cmd_corpus_contexts(args) -> None:
    """cut a corpus's documents into contexts of tokens, each with its shard"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import write_table
    from ..model.loading import load_tokenizer
    from .contexts import cut_contexts
    from .reading import read_documents
    s = args.settings
    documents = read_documents(s.path, s.text_column, s.label_column)
    labelled = s.labels and len({d.label for d in documents}) >= 2
    contexts = cut_contexts(load_tokenizer(args.model_dir), documents, s.context_tokens, s.shards,
                            s.heldout_fraction if labelled else 0.0)
    write_table(contexts, args.out, tables.CONTEXTS)
    labels = contexts.group_by("label").agg(contexts=pl.len()).sort("label")
    log.info("%d documents, %d contexts, %d tokens (%d contexts held out); per label: %s", len(documents),
             contexts.height, contexts["n_tokens"].sum(), contexts["heldout"].sum(),
             ", ".join(f"{r['label'] or '-'}: {r['contexts']}" for r in labels.to_dicts()))


def args_corpus_contexts(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model (its tokenizer)")
    p.add_argument("--out", required=True)


def cmd_corpus_records(args) -> None:
    """every unit's records over one shard's contexts, resumable from its checkpoint"""
    import polars as pl

    from ..errors import NeuronmapError
    from ..io import tables
    from ..io.parquet import read_table, write_table
    from ..model.cost import counting_forwards, job_cost
    from ..model.host_memory import reuse_freed_buffers
    from ..model.loading import load_for_job
    from .engine import RecordsOutputs, RecordsPass
    contexts = read_table(args.contexts)
    # Held-out contexts are the perplexity check's text, never the records'.
    shard = contexts.filter((pl.col("shard") == args.shard) & ~pl.col("heldout"))
    if shard.height == 0:
        raise NeuronmapError(f"{args.contexts}: no contexts in shard {args.shard} (fewer documents than "
                             "corpus.shards?)")
    log.info("CUDA_VISIBLE_DEVICES=%s", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    reuse_freed_buffers()  # every batch has the same shape: its buffers serve the next one
    model, tokenizer = load_for_job(args.model_dir, args.settings.model, args.threads)
    labels = corpus_labels(contexts) if args.out_labels else []
    response_sites = args.settings.label_sites if args.out_responses else ()
    if response_sites:
        check_response_size(contexts.filter(~pl.col("heldout")).height, model, response_sites, args.settings.ap_max_gb)
    outputs = RecordsOutputs(Path(args.out_units), Path(args.out_extremes), Path(args.checkpoint),
                             Path(args.out_labels) if args.out_labels else None,
                             Path(args.out_responses) if args.out_responses else None)
    records = RecordsPass(model, shard, args.settings, int(contexts["n_tokens"].max()), tokenizer.pad_token_id,
                          labels, response_sites)
    with counting_forwards(model) as count:
        records.run(outputs)
    write_table(job_cost("corpus", f"shard-{args.shard}", shard.height, count), args.out_cost, tables.JOB_COST)


def corpus_labels(contexts) -> list[str]:
    """The corpus's labels, sorted; the labels stage needs two or more."""
    from ..errors import NeuronmapError
    labels = sorted(set(contexts["label"].to_list()))
    if len(labels) < 2:
        raise NeuronmapError(f"labels: the corpus holds {len(labels)} label ({', '.join(labels) or 'none'}); the "
                             "labels stage compares two or more (a corpus folder of one file per label, or "
                             "corpus.label_column), or set labels.enabled: false")
    return labels


def check_response_size(contexts: int, model, sites, max_gb: float) -> None:
    """The AP selection stores every context's mean response at the label sites: refuse a corpus
    whose responses would not fit labels.ap_max_gb, before any forward pass."""
    from ..errors import NeuronmapError
    from ..model.architectures import MlpSites
    mlp = MlpSites(model)
    units = sum(mlp.width(site) for site in sites) * mlp.n_layers
    size = contexts * units * 2 / 2 ** 30
    if size > max_gb:
        raise NeuronmapError(f"labels.ap: the mean responses of {contexts} contexts x {units} units of labels.sites "
                             f"{list(sites)} take {size:.1f} GB (float16), over labels.ap_max_gb = {max_gb}: set "
                             "labels.ap: false (LAPE's selection needs no stored responses), fewer labels.sites, "
                             "or a larger labels.ap_max_gb")


def args_corpus_records(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the records (0 = torch's default)")
    p.add_argument("--contexts", required=True)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--out-units", required=True)
    p.add_argument("--out-extremes", required=True)
    p.add_argument("--out-cost", required=True)
    p.add_argument("--checkpoint", required=True, help="where the running records are saved (and resumed from)")
    p.add_argument("--out-labels", help="per-label records (labelled corpora: the labels stage)")
    p.add_argument("--out-responses", help="each context's mean response at labels.sites (the AP selection)")


def cmd_corpus_merge(args) -> None:
    """merge the shards' records: units, examples and peak tokens, one row group per layer"""
    from ..io.parquet import read_table
    from ..model.loading import load_tokenizer
    from .merge import merge_records
    contexts = read_table(args.contexts, ["context_id", "document", "label", "token_ids"])
    merge_records([Path(p) for p in args.units], [Path(p) for p in args.extremes], contexts,
                  load_tokenizer(args.model_dir), args.settings,
                  {"units": Path(args.out_units), "examples": Path(args.out_examples),
                   "peak_tokens": Path(args.out_peak_tokens)})


def args_corpus_merge(p) -> None:
    p.add_argument("--model-dir", required=True, help="directory written by prepare-model (its tokenizer)")
    p.add_argument("--contexts", required=True)
    p.add_argument("--units", nargs="+", required=True)
    p.add_argument("--extremes", nargs="+", required=True)
    p.add_argument("--out-units", required=True)
    p.add_argument("--out-examples", required=True)
    p.add_argument("--out-peak-tokens", required=True)
