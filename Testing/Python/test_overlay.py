"""Overlay PNGs: orientation is physical (not storage order), L/R convention holds, images are drawn."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.image import imread

from msdseg.outputs.overlay import (DPI, PANEL_INCHES, boundaries, brain_centre, extract_slices, save_comparison_png,
                            save_overlay_png, to_ras)
from shared import TREE

pytestmark = pytest.mark.unit


def head(n: int = 40, spacing=(1.5, 1.2, 2.0)) -> tuple[sitk.Image, sitk.Image]:
    """LPS-stored head: a bright ball; labels with a marker at the patient's left-anterior-superior."""
    k, j, i = np.mgrid[:n, :n, :n]
    ball = (i - n / 2) ** 2 + (j - n / 2) ** 2 + (k - n / 2) ** 2 < (0.42 * n) ** 2
    image = sitk.GetImageFromArray((ball * 100.0 + 10.0 * np.sin(i + j)).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-30.0, -24.0, -40.0))
    labels = np.zeros((n, n, n), np.uint16)
    labels[ball & (i >= n // 2)] = 3   # LPS: +i = +x = patient left
    labels[ball & (i < n // 2)] = 42
    # marker: patient left (high i), anterior (LPS -y: low j), superior (high k)
    labels[n // 2 + 2:n // 2 + 6, n // 2 - 6:n // 2 - 2, n // 2 + 6:n // 2 + 10] = 17
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(image)
    return image, lab


def marker_quadrant(sl: np.ndarray) -> tuple[str, str]:
    rows, cols = np.nonzero(sl == 17)
    assert rows.size, "marker not in slice"
    vertical = "top" if rows.mean() < sl.shape[0] / 2 else "bottom"
    horizontal = "left" if cols.mean() < sl.shape[1] / 2 else "right"
    return vertical, horizontal


def display(labels: sitk.Image, convention: str) -> dict:
    ras = to_ras(labels)
    arr = sitk.GetArrayFromImage(ras)
    return extract_slices(arr, brain_centre(arr == 17, arr.shape), ras.GetSpacing(), convention)


def test_radiological_and_neurological_conventions() -> None:
    _, lab = head()
    radio = display(lab, "radiological")
    assert marker_quadrant(radio["axial"].data) == ("top", "right")     # anterior up, left on screen right
    assert marker_quadrant(radio["coronal"].data) == ("top", "right")   # superior up
    assert (radio["axial"].left, radio["axial"].right) == ("R", "L")
    assert marker_quadrant(radio["sagittal"].data) == ("top", "left")   # anterior on the left
    assert (radio["sagittal"].left, radio["sagittal"].right) == ("A", "P")
    neuro = display(lab, "neurological")
    assert marker_quadrant(neuro["axial"].data) == ("top", "left")
    assert (neuro["axial"].left, neuro["axial"].right) == ("L", "R")
    with pytest.raises(ValueError):
        display(lab, "sideways")


@pytest.mark.parametrize("storage", ["LIA", "RPI", "ASL"])
def test_storage_orientation_does_not_change_display(storage: str) -> None:
    _, lab = head()
    reference = display(lab, "radiological")
    reoriented = sitk.DICOMOrient(lab, storage)  # same physical image, other voxel order
    assert reoriented.GetDirection() != lab.GetDirection()
    shown = display(reoriented, "radiological")
    for view in ("axial", "coronal", "sagittal"):
        np.testing.assert_array_equal(shown[view].data, reference[view].data)
        assert shown[view].aspect == pytest.approx(reference[view].aspect)


def test_aspect_follows_spacing() -> None:
    _, lab = head(spacing=(1.0, 1.0, 3.0))
    views = display(lab, "radiological")
    assert views["axial"].aspect == pytest.approx(1.0)
    assert views["coronal"].aspect == pytest.approx(3.0)


def test_boundaries_are_one_pixel_contours() -> None:
    sl = np.zeros((9, 9), int)
    sl[2:7, 2:7] = 5
    edge = boundaries(sl)
    assert edge[4, 4] == 0 and edge[2, 4] == 5 and edge[0, 0] == 0
    assert np.count_nonzero(edge) == 16


def _check_png(path: Path, width_in: float, height_in: float) -> np.ndarray:
    png = imread(str(path))
    assert png.shape[:2] == (round(height_in * DPI), round(width_in * DPI))
    rgb = png[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert np.any(rgb.max(axis=-1) - rgb.min(axis=-1) > 0.2)  # coloured (not grey) pixels: labels drawn
    return png


def _coloured_pixels(png: np.ndarray) -> int:
    rgb = png[..., :3]
    return int(np.count_nonzero(rgb.max(axis=-1) - rgb.min(axis=-1) > 0.2))


def test_save_overlay_png(tmp_path: Path) -> None:
    image, lab = head()
    save_overlay_png(image, lab, tmp_path / "o.png", TREE, title="UNTRAINED MODEL")
    with_labels = _check_png(tmp_path / "o.png", 3 * PANEL_INCHES, PANEL_INCHES + 0.8)
    empty = sitk.Image(lab.GetSize(), sitk.sitkUInt16)
    empty.CopyInformation(lab)
    save_overlay_png(image, empty, tmp_path / "e.png", TREE)
    without = imread(str(tmp_path / "e.png"))
    # only the yellow R/L letters are coloured without labels; the fill adds thousands of pixels
    assert _coloured_pixels(with_labels) > _coloured_pixels(without) + 1000


def test_save_overlay_png_with_uncertainty_row(tmp_path: Path) -> None:
    image, lab = head()
    unc = sitk.GetImageFromArray(np.random.default_rng(0).random(lab.GetSize()[::-1]).astype(np.float32))
    unc.CopyInformation(lab)
    save_overlay_png(image, sitk.DICOMOrient(lab, "LIA"), tmp_path / "u.png", TREE, uncertainty=unc,
                     convention="neurological")
    _check_png(tmp_path / "u.png", 3 * PANEL_INCHES, 2 * PANEL_INCHES + 0.8)


def test_save_comparison_png(tmp_path: Path) -> None:
    image, lab = head()
    save_comparison_png(lab, lab, tmp_path / "c.png", TREE, image=image, title="pred vs ref")
    _check_png(tmp_path / "c.png", 2 * PANEL_INCHES, 3 * PANEL_INCHES + 0.8)
    save_comparison_png(lab, lab, tmp_path / "c2.png", TREE)  # no image: still drawn
    _check_png(tmp_path / "c2.png", 2 * PANEL_INCHES, 3 * PANEL_INCHES + 0.8)


def test_long_titles_are_wrapped_above_the_convention_note() -> None:
    from msdseg.outputs.overlay import _heading

    title = "/a/very/long/path/to/some/model/file/msdseg_brain.safetensors - fsaverage - ensemble (balanced)"
    lines = _heading(title, "radiological", width=40).split("\n")
    assert len(lines) >= 3 and all(len(line) <= 40 for line in lines[:-1])
    assert "radiological" in lines[-1]
    assert _heading("", "radiological", width=40) == lines[-1]
