"""The atlas of every unit (rules/atlas.smk): an index of what each stage says about each unit,
and `neuronmap atlas`, a local web page that serves it and reads the rest lazily."""
