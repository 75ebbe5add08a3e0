"""The labels stage (rules/labels.smk): labelled corpora's per-label records, the LAPE and AP
selections of units per label, and the perplexity check of those selections."""
