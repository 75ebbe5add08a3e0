"""The report stage (rules/report.smk): one self-contained HTML page with the run's figures and the neuron atlas."""
