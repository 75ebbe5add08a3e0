"""`neuronmap` subcommands of the labels stage: the per-label records merged and the two unit
selections per label (LAPE's and AP's) with their overlap."""

from __future__ import annotations

import logging

from .settings import SelectSettings

log = logging.getLogger("neuronmap")

SETTINGS = {"label-select": SelectSettings}


def cmd_label_select(args) -> None:
    """per-label records merged across shards; LAPE's and the AP selection per label, and their overlap"""
    import polars as pl

    from ..io import tables
    from ..io.parquet import read_table, write_table
    from .expertise import ap_selection, label_expertise
    from .lape import lape_selection
    from .overlap import selection_overlap
    from .records import label_records, rate_matrix
    s = args.settings
    records = label_records(args.labels)
    labels = sorted(records["label"].unique().to_list())
    units, rates = rate_matrix(records, s.sites, labels)
    lape = lape_selection(units, rates, labels, s.top_rate, s.filter_rate, s.activation_bar_ratio)
    counts = lape.group_by("label").len()
    lape_counts = {label: 0 for label in labels} | dict(zip(counts["label"], counts["len"]))
    if s.ap:
        contexts = read_table(args.contexts, ["context_id", "label", "heldout"]).filter(~pl.col("heldout"))
        expertise = label_expertise(args.responses, contexts.sort("context_id"), labels)
        wanted = lape_counts if s.ap_units == "match" else {label: int(s.ap_units) for label in labels}
        selected = pl.concat([lape, ap_selection(expertise, wanted)])
    else:
        expertise = pl.from_arrow(tables.LABEL_EXPERTISE.empty_table())
        selected = lape
    overlap = selection_overlap(selected, labels, units.height)
    write_table(records, args.out_records, tables.LABEL_RECORDS)
    write_table(expertise, args.out_expertise, tables.LABEL_EXPERTISE)
    write_table(selected, args.out_units, tables.LABEL_UNITS)
    write_table(overlap, args.out_overlap, tables.LABEL_OVERLAP)
    for row in overlap.to_dicts():
        log.info("label %s: LAPE %d units, AP %d, shared %d (%.1f expected by chance, p = %.2g)", row["label"],
                 row["lape_units"], row["ap_units"], row["shared"], row["expected"], row["p_value"])


def args_label_select(p) -> None:
    p.add_argument("--contexts", required=True)
    p.add_argument("--labels", nargs="+", required=True, help="every records job's per-label partial")
    p.add_argument("--responses", nargs="*", default=[], help="every records job's context responses (labels.ap)")
    p.add_argument("--out-records", required=True)
    p.add_argument("--out-expertise", required=True)
    p.add_argument("--out-units", required=True)
    p.add_argument("--out-overlap", required=True)
