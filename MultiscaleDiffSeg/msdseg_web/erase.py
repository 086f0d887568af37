"""An eraser that gives erased voxels back to the label the result had, or to background.

Why: Slicer's Erase effect only removes voxels from the selected segment, so erasing a stroke
that covered the caudate leaves a hole instead of the caudate.  In "restore" mode each erased
voxel returns to the label it had in the result as segmented or opened (the *reference*); voxels
the reference already gave to the erased segment become background, as erasing means.

How: the stock effect's stroke (trame-slicer's brush, its masking, its one-slice cylinder) is
rasterised by trame-slicer's own :class:`SegmentModifier`, then applied as one "remove" and one
"add" per restored label, grouped into a single undo step.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from trame_slicer.segmentation import SegmentationEffectErase
from trame_slicer.segmentation.segment_modifier import ModificationMode
from trame_slicer.utils import vtk_image_to_np

RESTORE, BACKGROUND = "restore", "background"


def restore_targets(stroke: np.ndarray, active: np.ndarray, reference: np.ndarray, active_value: int) -> dict[int, np.ndarray]:
    """Label value -> voxels (mask) that an erase stroke hands back to that label.

    Only voxels of the erased segment under the stroke change; those whose reference label is the
    erased segment itself (or background) stay erased.
    """
    erased = stroke & active
    targets: dict[int, np.ndarray] = {}
    for value in np.unique(reference[erased]):
        value = int(value)
        if value not in (0, int(active_value)):
            targets[value] = erased & (reference == value)
    return targets


def install_restoring_eraser(editor: Any, reference: Callable[[], np.ndarray | None], mode: Callable[[], str]) -> None:
    """Make the editor's Erase effect follow ``mode()`` (restore or background).

    The effect instance keeps its own stroke handling; only the step that applies a finished
    stroke is wrapped (``paint_glyph_at_world_coordinates``, which trame-slicer calls per stroke).
    """
    effect = editor.get_effect(SegmentationEffectErase)
    stock = effect.paint_glyph_at_world_coordinates

    def paint(polydata: Any, points: Any) -> None:
        labels = reference()
        if mode() != RESTORE or labels is None or not restore_stroke(effect.modifier, polydata, points, labels):
            stock(polydata, points)

    effect.paint_glyph_at_world_coordinates = paint


def restore_stroke(modifier: Any, polydata: Any, points: Any, reference: np.ndarray) -> bool:
    """Apply one erase stroke in restore mode; False (nothing done) when the grids do not match."""
    active_id = modifier.active_segment_id
    if not active_id or points.GetNumberOfPoints() == 0:
        return False
    canvas = modifier.create_modifier_labelmap()
    modifier.paint_glyph_in_labelmap(polydata, points, canvas)
    stroke = vtk_image_to_np(canvas) > 0
    if stroke.shape != reference.shape:
        return False
    segmentation = modifier.segmentation.segmentation
    active = np.asarray(modifier.get_segment_labelmap(active_id, as_numpy_array=True)) > 0
    segment_of = {int(segmentation.GetSegment(i).GetLabelValue()): i for i in segmentation.GetSegmentIDs()}
    targets = restore_targets(stroke, active, reference, segmentation.GetSegment(active_id).GetLabelValue())
    with modifier.group_undo_commands("Erase"):
        _apply(modifier, stroke, active_id, ModificationMode.Remove)
        for value, mask in targets.items():
            if value in segment_of:
                _apply(modifier, mask, segment_of[value], ModificationMode.Add)
    modifier.trigger_active_segment_modified()
    return True


def _apply(modifier: Any, mask: np.ndarray, segment_id: str, mode: ModificationMode) -> None:
    canvas = modifier.create_modifier_labelmap()  # the editor's one modifier image, cleared
    vtk_image_to_np(canvas)[:] = mask
    modifier.apply_labelmap(canvas, segment_id=segment_id, modification_mode=mode,
                            do_bypass_masking=mode is ModificationMode.Add)
