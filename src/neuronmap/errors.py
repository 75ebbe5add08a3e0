class NeuronmapError(Exception):
    """A problem with the user's input: reported as one clear message, never a traceback."""
