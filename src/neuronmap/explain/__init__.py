"""The explain stage: units described in words, each description scored on held-out text against
a control (another unit's description) and a model-free baseline (docs/explain.md)."""
