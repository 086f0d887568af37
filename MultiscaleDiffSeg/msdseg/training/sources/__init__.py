"""Training and evaluation label maps built reproducibly from label maps shipped in PyPI wheels.

Entry point: :func:`prepare_data` (also ``python -m msdseg.training.sources --out DIR``).  Every map ends up
in aseg numbering of the 32 leaves on a RAS 1 mm grid, with 255 = ignore and >= 1000 =
generation-only head tissue; ``manifest.json`` lists maps, defined leaves, roles and licences.
See ``docs/data_sources.md``.
"""
from msdseg.training.sources.labelmap import GEN_ONLY_OFFSET, IGNORE
from msdseg.training.sources.prepare import SOURCES, prepare_data

__all__ = ["prepare_data", "SOURCES", "IGNORE", "GEN_ONLY_OFFSET"]
