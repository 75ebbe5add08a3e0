"""The ablate stage (rules/ablate.smk): recall with units deactivated against random controls, perplexity, paired statistics."""
