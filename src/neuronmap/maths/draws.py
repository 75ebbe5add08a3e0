"""Seeded random draws, each keyed by what it is for."""

from __future__ import annotations

import zlib

import numpy as np


def relation_rng(seed: int, relation: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on the seed and the relation, so adding a relation
    leaves every other relation's draws unchanged."""
    return np.random.default_rng([seed, zlib.crc32(relation.encode()), zlib.crc32(purpose.encode())])
