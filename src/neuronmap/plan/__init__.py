"""The plan stage: what a run's model-running jobs will need, before any of them runs (rules/plan.smk)."""
