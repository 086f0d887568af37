"""Saving a (possibly edited) result in the output contract, and reading a saved one back.

Why the core's writer: a result saved from the browser is the same set of files as
``msdseg segment`` writes (``S.seg.nrrd``, ``S_labels.nii.gz``, ``S_volumes.csv`` and, when the run
made one, ``S_uncertainty.nii.gz``), on the input's exact grid, written atomically.

Why versioned names: a save never replaces a file already in the output folder (an earlier save,
a command-line run, a correction made in Slicer); when ``S.*`` exists the result is saved as
``S_v2.*``, then ``S_v3.*`` and so on.

Why a fixed list of downloads: the page asks for a kind of file, never for a path, and a saved
file is read back only by a plain name that resolves inside the output folder.
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
from msdseg.outputs.provenance import provenance_name
from msdseg.outputs.writers import output_names, read_seg_nrrd_labels, write_case_outputs

#: What the page may download: the current segmentation in either format, or its volumes.
DOWNLOAD_KINDS = ("segmentation", "labels", "volumes")
#: Give up looking for a free versioned name after this many.
MAX_VERSIONS = 999


@dataclass
class EditedCase:
    """What :func:`msdseg.outputs.writers.write_case_outputs` needs; volumes are counted from the labels."""

    labels: sitk.Image
    uncertainty: sitk.Image | None
    tree: LabelTree
    volumes: Mapping[str, float] | None = None


def free_stem(outdir: Path, stem: str) -> str:
    """``stem`` when none of its files exists in ``outdir``, else the first free ``stem_vN``."""
    for version in range(1, MAX_VERSIONS + 1):
        candidate = stem if version == 1 else f"{stem}_v{version}"
        names = [*output_names(candidate).values(), provenance_name(candidate)]
        if not any((outdir / name).exists() or (outdir / name).is_symlink() for name in names):
            return candidate
    raise InputError(f"cannot save: {outdir} already holds {MAX_VERSIONS} versions of {stem}")


def save_result(labels: sitk.Image, uncertainty: sitk.Image | None, tree: LabelTree, outdir: Path,
                stem: str) -> dict[str, Path]:
    """Write the case's files under a name no existing file has (see :func:`free_stem`).

    Raises :class:`InputError` for labels outside the label tree.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        return write_case_outputs(EditedCase(labels, uncertainty, tree), outdir, free_stem(outdir, stem))
    except ValueError as exc:
        raise InputError(f"cannot save: {exc}") from None


def check_download_kind(kind: str) -> str:
    """Refuse anything but the fixed download kinds (the page never sends a path)."""
    if kind not in DOWNLOAD_KINDS:
        raise InputError(f"unknown download '{str(kind)[:80]}' (one of {', '.join(DOWNLOAD_KINDS)})")
    return kind


def saved_file(outdir: Path, name: str) -> Path:
    """A file in the output folder by its plain name; nothing outside it, no links, no folders."""
    name = str(name)
    root = outdir.resolve()
    path = root / name
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name or "\0" in name:
        raise InputError(f"'{name[:80]}' is not a file name in the output folder")
    if path.is_symlink() or path.resolve().parent != root or not path.is_file():
        raise InputError(f"{name}: no such file in the output folder")
    return path


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
