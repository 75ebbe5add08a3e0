"""The model: loading it, the one place that knows its architecture, its shape, and the hooks that read and deactivate its units."""
