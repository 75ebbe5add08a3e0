"""The labels stage: labelled corpora's per-label records, unit selections and causal check."""
