"""The run's configuration: the schema (the one place defaults live), the settings each command
reads from it, the checks across keys, and the code fingerprints that decide reruns."""
