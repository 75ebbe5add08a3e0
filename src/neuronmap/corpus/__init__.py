"""The corpus pass: every unit's records over real text (rules/corpus.smk)."""
