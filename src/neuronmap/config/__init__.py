"""The run's configuration, the ground every stage stands on: the schema (config.schema.yaml, the
one place defaults live, shipped with the package) and the settings each command reads from it.
The checks across keys and the code fingerprints are the workflow's (neuronmap.workflow)."""
