import pytest

from neuronmap.ablate.evaluation import is_correct


@pytest.mark.parametrize("generated, objects, match, case_sensitive, expected", [
    (" Paris", ["Paris"], "prefix", False, True),
    (" Par", ["Paris"], "prefix", False, True),        # the answer is a prefix of the gold object
    (" Paris is", ["Paris"], "prefix", False, True),   # the gold object is a prefix of the answer
    (" paris", ["Paris"], "prefix", True, False),
    (" paris", ["Paris"], "prefix", False, True),
    (" Lyon", ["Paris"], "prefix", False, False),
    ("   ", ["Paris"], "prefix", False, False),        # empty answers never count
    ("\nParis", ["Paris"], "prefix", False, True),
    (" Rome\nThe", ["Rome"], "prefix", False, True),    # the answer ends at the line break
    (" Par", ["Paris"], "exact_start", False, False),
    (" Paris.", ["Paris"], "exact_start", False, True),
    (" French", ["English", "French"], "prefix", False, True),  # any of a subject's objects
])
def test_match_rule(generated, objects, match, case_sensitive, expected):
    assert is_correct(generated, objects, match, case_sensitive) is expected
