"""neuronmap: find the neurons of a language model that carry a relation, and test them causally."""

__version__ = "0.1.0"
