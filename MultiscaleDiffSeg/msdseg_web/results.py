"""Saving a (possibly edited) result in the output contract, and reading a saved one back.

Why the core's writer: a result saved from the browser is the same set of files as
``msdseg segment`` writes (``S.seg.nrrd``, ``S_labels.nii.gz``, ``S_volumes.csv`` and, when the run
made one, ``S_uncertainty.nii.gz``), on the input's exact grid, written atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.io import read_image
from msdseg.core.labels import LabelTree
from msdseg.outputs.writers import read_seg_nrrd_labels, write_case_outputs


@dataclass
class EditedCase:
    """What :func:`msdseg.outputs.writers.write_case_outputs` needs; volumes are counted from the labels."""

    labels: sitk.Image
    uncertainty: sitk.Image | None
    tree: LabelTree
    volumes: Mapping[str, float] | None = None


def save_result(labels: sitk.Image, uncertainty: sitk.Image | None, tree: LabelTree, outdir: Path,
                stem: str) -> dict[str, Path]:
    """Write the case's files; raises :class:`InputError` for labels outside the label tree."""
    try:
        return write_case_outputs(EditedCase(labels, uncertainty, tree), outdir, stem)
    except ValueError as exc:
        raise InputError(f"cannot save: {exc}") from None


def read_result_labels(path: Path) -> sitk.Image:
    """A saved ``.seg.nrrd`` or labels image -> uint16 aseg labels (grid checked by the caller)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        if path.name.lower().endswith(".seg.nrrd"):
            image = read_seg_nrrd_labels(path)
        else:
            image = read_image(path, validate=False)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the page
        raise InputError(f"{path.name}: cannot be read as a segmentation ({str(exc).splitlines()[0][:200]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: expected a 3-D label image")
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.mod(array, 1) == 0):
        raise InputError(f"{path.name}: contains non-integer values; a label image is needed")
    return sitk.Cast(image, sitk.sitkUInt16)
