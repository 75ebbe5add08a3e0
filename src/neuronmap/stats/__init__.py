"""The stats stage (rules/stats.smk): each unit's expertise (AP) per relation, the selected units, their overlaps, decoding and sparsity."""
