"""Constants the test modules share, defined once.

``TREE`` is here (not only a fixture in conftest.py) because several modules need the label tree
at import time, to build ``parametrize`` lists or module-level constants; tests that only need it
inside a test take the ``tree`` fixture, which returns this same object.
"""
from __future__ import annotations

from msdseg.core.labels import load_tree

TREE = load_tree()
