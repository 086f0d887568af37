"""The small three-view overlay PNG of one case (``S_overlay.png``) that the cohort report embeds.

Drawn by the worker that segmented the case, which has the image in memory; Matplotlib's object
API on the Agg canvas keeps it safe in any process without a display.
"""
from __future__ import annotations

import io

import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from msdseg.core.labels import LabelTree


def render_thumbnail(image: sitk.Image, labels: sitk.Image, tree: LabelTree,
                     uncertainty: sitk.Image | None = None, title: str = "",
                     panel_inches: float = 1.7, dpi: int = 80) -> bytes:
    """Small PNG: labels over the image on three views (and an uncertainty row when given).

    Uses :mod:`msdseg.outputs.overlay`'s orientation and slicing (RAS, radiological, slices through the
    brain's centre), at thumbnail size.  ``labels``/``uncertainty`` must be on ``image``'s grid
    (they are: outputs are always on the input grid).
    """
    from msdseg.outputs.overlay import (VIEWS, brain_centre, colour_labels, extract_slices, intensity_window,
                                        label_lut, to_ras)

    img = sitk.GetArrayFromImage(to_ras(sitk.Cast(image, sitk.sitkFloat32)))
    lab_ras = to_ras(labels)
    lab = sitk.GetArrayFromImage(lab_ras)
    spacing = lab_ras.GetSpacing()
    centre = brain_centre(lab, lab.shape)
    img_s = extract_slices(img, centre, spacing)
    lab_s = extract_slices(lab, centre, spacing)
    unc_s = None
    if uncertainty is not None:
        unc_s = extract_slices(sitk.GetArrayFromImage(to_ras(uncertainty)), centre, spacing)
    window = intensity_window(img)
    lut = label_lut(tree, 0.5)
    rows = 2 if unc_s is not None else 1
    fig = Figure(figsize=(3 * panel_inches, rows * panel_inches + (0.3 if title else 0.0)), facecolor="black")
    if title:
        fig.suptitle(title, color="white", fontsize=8)
    axes = fig.subplots(rows, 3, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.88 if title else 0.99, wspace=0.02, hspace=0.02)
    for col, view in enumerate(VIEWS):
        ax = axes[0][col]
        ax.imshow(img_s[view].data, cmap="gray", vmin=window[0], vmax=window[1], aspect=img_s[view].aspect,
                  interpolation="nearest")
        ax.imshow(colour_labels(lab_s[view].data, lut), aspect=img_s[view].aspect, interpolation="nearest")
        ax.set_axis_off()
        ax.text(0.02, 0.5, img_s[view].left, color="yellow", fontsize=7, transform=ax.transAxes, va="center")
        if unc_s is not None:
            ax = axes[1][col]
            ax.imshow(img_s[view].data, cmap="gray", vmin=window[0], vmax=window[1], aspect=img_s[view].aspect,
                      interpolation="nearest")
            ax.imshow(unc_s[view].data, cmap="magma", vmin=0.0, vmax=1.0, alpha=0.75, aspect=img_s[view].aspect,
                      interpolation="nearest")
            ax.set_axis_off()
    return png_bytes(fig, dpi)


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes, drawn on the Agg canvas (no pyplot state, no display)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return buf.getvalue()
