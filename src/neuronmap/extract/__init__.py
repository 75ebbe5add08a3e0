"""The extract stage (rules/extract.smk): pooled responses and per-token statistics of every unit, in one forward pass per batch."""
