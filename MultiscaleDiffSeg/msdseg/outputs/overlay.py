"""Quick-look PNGs: labels (and uncertainty) over the image on three orthogonal slices.

Why these choices:

* Every volume is reoriented to RAS with ``SimpleITK.DICOMOrient`` (a permutation/flip of axes, no
  resampling) so a file stored LIA, LPS or oblique shows the same way.  Oblique volumes are shown on
  their nearest axis-aligned planes, which is what a quick look needs.
* The display convention is explicit and written on the image: 'R'/'L' letters on the sides of the
  axial and coronal views, 'A'/'P' on the sagittal one, and the convention named under the title.
  Radiological (patient right on image left, as in 3D Slicer and most radiology viewers) is the
  default; neurological is available.
* Slices go through the centre of mass of the label foreground (the brain), not the middle of the
  field of view, which for a head with a neck can miss the brain's centre by centimetres.
* Matplotlib's Agg backend through the object API (no pyplot state): safe in worker processes and on
  machines without a display.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from msdseg.core.labels import LabelTree

Convention = Literal["radiological", "neurological"]
VIEWS = ("axial", "coronal", "sagittal")
PANEL_INCHES = 4.0
DPI = 100


@dataclass
class Slice2D:
    """One displayed slice: ``data[row, col]`` with row 0 at the top of the screen."""

    data: np.ndarray
    aspect: float  # pixel height / pixel width on screen (physical spacing ratio)
    left: str      # letter for the left edge of the screen
    right: str     # letter for the right edge of the screen


# ----------------------------------------------------------------------------- geometry
def to_ras(image: sitk.Image) -> sitk.Image:
    """Axes permuted/flipped so index i points Right, j Anterior, k Superior (no resampling)."""
    return sitk.DICOMOrient(image, "RAS")


def _on_grid(moving: sitk.Image, reference: sitk.Image, nearest: bool) -> sitk.Image:
    """``moving`` on ``reference``'s grid (only resampled if the grids differ)."""
    if (moving.GetSize() == reference.GetSize()
            and np.allclose(moving.GetOrigin(), reference.GetOrigin(), atol=1e-4)
            and np.allclose(moving.GetSpacing(), reference.GetSpacing(), atol=1e-6)
            and np.allclose(moving.GetDirection(), reference.GetDirection(), atol=1e-6)):
        return moving
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(moving, reference, sitk.Transform(), interp, 0.0, moving.GetPixelID())


def brain_centre(labels_kji: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """(k, j, i) index of the foreground centre of mass, or of the volume centre when empty."""
    if labels_kji is not None:
        idx = np.nonzero(labels_kji)
        if idx[0].size:
            return tuple(int(round(float(np.mean(a)))) for a in idx)  # type: ignore[return-value]
    return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]


def extract_slices(
    volume_kji: np.ndarray,
    centre: Sequence[int],
    spacing_ijk: Sequence[float],
    convention: Convention = "radiological",
) -> dict[str, Slice2D]:
    """Axial, coronal and sagittal slices of a RAS-oriented (k, j, i) array, ready for ``imshow``.

    Index i increases toward patient Right, j toward Anterior, k toward Superior.  Rows are flipped
    so superior / anterior is up; columns so that the convention holds (radiological: patient right
    on the screen's left).  Sagittal views show anterior on the left.
    """
    if convention not in ("radiological", "neurological"):
        raise ValueError(f"unknown display convention {convention!r}")
    k, j, i = (int(c) for c in centre)
    sx, sy, sz = (float(s) for s in spacing_ijk)
    radiological = convention == "radiological"
    # columns run along i (toward Right): radiological puts high i (Right) at the screen's left
    col = (lambda a: a[:, ::-1]) if radiological else (lambda a: a)
    lr = ("R", "L") if radiological else ("L", "R")
    axial = col(volume_kji[k][::-1, :])          # rows j (anterior up)
    coronal = col(volume_kji[:, j, :][::-1, :])  # rows k (superior up)
    sagittal = volume_kji[:, :, i][::-1, ::-1]   # rows k up, columns j with anterior on the left
    return {
        "axial": Slice2D(axial, sy / sx, *lr),
        "coronal": Slice2D(coronal, sz / sx, *lr),
        "sagittal": Slice2D(sagittal, sz / sy, "A", "P"),
    }


# ----------------------------------------------------------------------------- colours
def label_lut(tree: LabelTree, alpha: float = 0.45) -> np.ndarray:
    """RGBA table indexed by aseg number (transparent for background and unknown numbers)."""
    lut = np.zeros((int(tree.channel_to_aseg.max()) + 1, 4), dtype=float)
    for leaf in tree.leaves:
        lut[int(leaf.label)] = [*(c / 255.0 for c in leaf.color), alpha]  # type: ignore[arg-type]
    return lut


def colour_labels(labels2d: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGBA image of a 2-D label slice (numbers beyond the table are transparent)."""
    safe = np.where((labels2d >= 0) & (labels2d < len(lut)), labels2d, 0).astype(np.int64)
    return lut[safe]


def boundaries(labels2d: np.ndarray) -> np.ndarray:
    """Labels kept only on pixels whose 4-neighbourhood has another label (1-pixel contours)."""
    lab = np.asarray(labels2d)
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return np.where(edge & (lab > 0), lab, 0)


def intensity_window(image_kji: np.ndarray) -> tuple[float, float]:
    """1st-99.5th percentile of non-zero voxels: robust to bright vessels and empty background."""
    values = image_kji[image_kji != 0]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    lo, hi = np.percentile(values, [1.0, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


# ----------------------------------------------------------------------------- drawing
def _decorate(ax, sl: Slice2D, name: str, colour: str = "yellow") -> None:
    ax.set_axis_off()
    ax.set_title(name, fontsize=10)
    style = dict(color=colour, fontsize=14, fontweight="bold", va="center", transform=ax.transAxes)
    ax.text(0.02, 0.5, sl.left, ha="left", **style)
    ax.text(0.98, 0.5, sl.right, ha="right", **style)


def _show_background(ax, sl: Slice2D | None, window: tuple[float, float], shape: tuple[int, int], aspect: float):
    if sl is None:
        ax.imshow(np.zeros(shape), cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    else:
        ax.imshow(sl.data, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")


def _convention_note(convention: Convention) -> str:
    if convention == "radiological":
        return "radiological convention: patient right on image left"
    return "neurological convention: patient right on image right"


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(os.fspath(path), dpi=DPI, format="png", facecolor="black")


def _arrays(image: sitk.Image | None, volumes: Sequence[sitk.Image | None], nearest: Sequence[bool]):
    """RAS (k, j, i) arrays of ``image`` and of ``volumes`` resampled onto the first available grid."""
    reference = image if image is not None else next(v for v in volumes if v is not None)
    ref_ras = to_ras(reference)
    spacing = ref_ras.GetSpacing()
    img = sitk.GetArrayFromImage(to_ras(image)).astype(np.float32) if image is not None else None
    out = []
    for vol, nn in zip(volumes, nearest):
        out.append(None if vol is None else sitk.GetArrayFromImage(to_ras(_on_grid(vol, reference, nn))))
    return img, out, spacing, sitk.GetArrayViewFromImage(ref_ras).shape


def _heading(title: str, convention: str, width: int) -> str:
    """The figure heading: ``title`` wrapped to ``width`` characters (a long model path would
    otherwise run off both edges of the figure), then the display convention."""
    import textwrap

    note = _convention_note(convention)
    return "\n".join(textwrap.wrap(title, width) + [note]) if title else note


def save_overlay_png(
    image: sitk.Image,
    labels: sitk.Image,
    path: str | os.PathLike,
    tree: LabelTree,
    uncertainty: sitk.Image | None = None,
    title: str = "",
    convention: Convention = "radiological",
    alpha: float = 0.45,
) -> None:
    """Labels as a semi-transparent fill over the image; an uncertainty row when given.

    ``title`` is printed large at the top: use it to flag e.g. 'UNTRAINED MODEL'.
    """
    img, (lab, unc), spacing, shape = _arrays(image, [labels, uncertainty], [True, False])
    centre = brain_centre(lab, shape)
    img_s = extract_slices(img, centre, spacing, convention)
    lab_s = extract_slices(lab, centre, spacing, convention)
    unc_s = extract_slices(unc, centre, spacing, convention) if unc is not None else None
    window = intensity_window(img)
    lut = label_lut(tree, alpha)
    rows = 2 if unc_s is not None else 1
    fig = Figure(figsize=(3 * PANEL_INCHES, rows * PANEL_INCHES + 0.8), facecolor="black")
    fig.suptitle(_heading(title, convention, width=70), color="white", fontsize=12)
    axes = fig.subplots(rows, 3, squeeze=False)
    for col, view in enumerate(VIEWS):
        ax = axes[0][col]
        _show_background(ax, img_s[view], window, img_s[view].data.shape, img_s[view].aspect)
        ax.imshow(colour_labels(lab_s[view].data, lut), aspect=img_s[view].aspect, interpolation="nearest")
        _decorate(ax, img_s[view], f"{view} - labels")
        ax.title.set_color("white")
    if unc_s is not None:
        peak = float(np.nanmax(unc)) if unc.size else 1.0
        norm = Normalize(vmin=0.0, vmax=peak if peak > 1.0 else 1.0)  # contract: 0..1
        for col, view in enumerate(VIEWS):
            ax = axes[1][col]
            _show_background(ax, img_s[view], window, img_s[view].data.shape, img_s[view].aspect)
            mappable = ax.imshow(unc_s[view].data, cmap="magma", norm=norm, alpha=0.75,
                                 aspect=img_s[view].aspect, interpolation="nearest")
            _decorate(ax, img_s[view], f"{view} - uncertainty", colour="cyan")
            ax.title.set_color("white")
        cbar = fig.colorbar(mappable, ax=list(axes[1]), fraction=0.025, pad=0.01)
        cbar.ax.tick_params(colors="white")
        cbar.set_label("uncertainty", color="white")
    _save(fig, path)


def save_comparison_png(
    pred: sitk.Image,
    ref: sitk.Image,
    path: str | os.PathLike,
    tree: LabelTree,
    image: sitk.Image | None = None,
    title: str = "",
    convention: Convention = "radiological",
) -> None:
    """Prediction and reference contours side by side (columns) on three orthogonal slices (rows).

    Both label maps are shown on the reference grid; the image (if any) is resampled linearly onto it.
    """
    img_on_ref = _on_grid(image, ref, nearest=False) if image is not None else None
    img, (p, r), spacing, shape = _arrays(img_on_ref if img_on_ref is not None else None, [pred, ref], [True, True])
    if img is None:  # no image: a faint grey rendering of the reference foreground as background
        img = (r > 0).astype(np.float32) * 0.35
        window = (0.0, 1.0)
    else:
        window = intensity_window(img)
    centre = brain_centre(r if np.any(r) else p, shape)
    img_s = extract_slices(img, centre, spacing, convention)
    p_s = extract_slices(p, centre, spacing, convention)
    r_s = extract_slices(r, centre, spacing, convention)
    lut = label_lut(tree, alpha=1.0)
    fig = Figure(figsize=(2 * PANEL_INCHES, 3 * PANEL_INCHES + 0.8), facecolor="black")
    fig.suptitle(_heading(title, convention, width=60), color="white", fontsize=11)
    axes = fig.subplots(3, 2, squeeze=False)
    for row, view in enumerate(VIEWS):
        for col, (name, sl) in enumerate((("prediction", p_s), ("reference", r_s))):
            ax = axes[row][col]
            _show_background(ax, img_s[view], window, img_s[view].data.shape, img_s[view].aspect)
            ax.imshow(colour_labels(boundaries(sl[view].data), lut), aspect=img_s[view].aspect,
                      interpolation="nearest")
            _decorate(ax, img_s[view], f"{view} - {name}")
            ax.title.set_color("white")
    _save(fig, path)
