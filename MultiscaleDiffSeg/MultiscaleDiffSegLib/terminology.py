"""The module's own terminology context, loaded into Slicer's terminologies logic.

Why a context of our own: Slicer's two default lists do not hold all 32 structures with a
Left/Right modifier.  The 3D Slicer General Anatomy list has no hippocampus, accumbens, brain stem,
third ventricle, CSF or cerebellum, and no laterality for cortex and white matter; the DICOM master
list has no cerebellar cortex, inferior lateral ventricle or ventral diencephalon, and no laterality
for the cerebellum.  ``Resources/SegmentationCategoryTypeModifier-MultiscaleDiffSeg.term.json``
lists every coded node of the label tree (SNOMED CT codes, DICOM CID 7140 "Brain Structure for
Volumetric Measurement" where Slicer's lists lack one), with Left/Right type modifiers wherever the
structure is lateral.  Segment tags name this context, so Slicer's terminology selector and
``UpdateEntryFromLoadedTerminologies`` find every segment once the file is loaded
(SlicerMONAIAuto3DSeg ships its own context the same way).

Qt-free: the caller passes the terminologies logic (``slicer.modules.terminologies.logic()`` in
the application, a ``slicer.vtkSlicerTerminologiesModuleLogic()`` in tests).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

#: File name in the module's ``Resources`` folder (installed next to ``MultiscaleDiffSeg.py``).
TERMINOLOGY_FILE = "SegmentationCategoryTypeModifier-MultiscaleDiffSeg.term.json"

#: The module's resources: the same relative place in the source tree and in the installed extension.
RESOURCES = Path(__file__).resolve().parents[1] / "Resources"


class TerminologiesLogic(Protocol):
    """The one method of ``vtkSlicerTerminologiesModuleLogic`` used here."""

    def LoadTerminologyFromFile(self, filePath: str) -> str: ...


def terminology_file(resources: Path = RESOURCES) -> Path:
    """Where the module's ``.term.json`` is."""
    return Path(resources) / TERMINOLOGY_FILE


def context_name(path: Path | None = None) -> str:
    """The context name the file declares (what segment tags must name)."""
    path = terminology_file() if path is None else Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FileNotFoundError(f"terminology file not readable: {path} ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"terminology file is not valid JSON: {path} (line {exc.lineno})") from exc
    name = document.get("SegmentationCategoryTypeContextName") if isinstance(document, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"terminology file names no SegmentationCategoryTypeContextName: {path}")
    return name


def load_module_terminology(logic: TerminologiesLogic, path: Path | None = None) -> str:
    """Load the module's context into ``logic`` and return its name.

    Loading again replaces the context with the same content, so calling this at every start is
    safe.  Raises with one line when the file is missing or the logic refuses it (the logic then
    logs its own reason, such as a missing ``@schema``).
    """
    path = terminology_file() if path is None else Path(path)
    expected = context_name(path)
    loaded = logic.LoadTerminologyFromFile(str(path))
    if loaded != expected:
        raise RuntimeError(f"Slicer's terminologies logic did not load {path.name} "
                           f"(returned '{loaded}', expected '{expected}')")
    return loaded
