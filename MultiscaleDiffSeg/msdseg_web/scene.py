"""MRML operations of the web app: load a T1, import a result, export aseg labels, overlays.

Everything that makes result nodes goes through the Slicer module's MRML layer
(:mod:`MultiscaleDiffSegLib.mrml`), so a result looks the same in the browser, in Slicer and in a
saved scene: one segmentation node with the 32 structures on one shared labelmap whose label
values are the aseg numbers, hemisphere groups, the uncertainty volume and the volumes table.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from MultiscaleDiffSegLib import mrml
from msdseg.core.labels import LabelTree


def add_t1(scene, image: sitk.Image, name: str):
    """Replace the scene content by one T1 volume node on the image's exact grid.

    The scene is cleared first, as trame-slicer's own loader does: a new input starts a new case,
    and the segment editor's effects bind to the nodes that exist after the clear.
    """
    scene.Clear()
    node = mrml.add_volume_from_sitk(scene, sitk.Cast(image, sitk.sitkFloat32), name)
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOn()
    return node


def import_result(
    scene,
    volume_node,
    labels: sitk.Image,
    uncertainty: sitk.Image | None,
    segmentation_node,
    tree: LabelTree,
    info: Mapping[str, Any] | None = None,
) -> mrml.ResultNodes:
    """Fill ``segmentation_node`` (the editor's) with the result; make the table and uncertainty nodes."""
    nodes = mrml.import_results(scene, volume_node, labels, uncertainty, segmentation_node=segmentation_node,
                                tree=tree, info=info)
    nodes.segmentation.SetName(f"{volume_node.GetName()} brain structures")
    return nodes


def export_labels(segmentations_logic, segmentation_node, volume_node) -> sitk.Image:
    """The segmentation as aseg numbers on the T1's exact grid (uint16), edits included.

    Each segment is written with its own label value (the aseg number set on import; a colour
    table keyed by segment name carries the values into Slicer's exporter), so the output is
    voxel-for-voxel comparable with the command line's ``S_labels.nii.gz``.
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "msdseg_export_colors")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "msdseg_export_labels")
    try:
        colors.SetTypeToUser()
        values = [int(segmentation.GetNthSegment(i).GetLabelValue()) for i in range(segmentation.GetNumberOfSegments())]
        colors.SetNumberOfColors(max(values + [0]) + 1)
        for index in range(colors.GetNumberOfColors()):
            colors.SetColor(index, "", 0.0, 0.0, 0.0, 0.0)
        for index, value in enumerate(values):
            segment = segmentation.GetNthSegment(index)
            colors.SetColor(value, segment.GetName(), *segment.GetColor(), 1.0)
            ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        ok = segmentations_logic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok or labelmap.GetImageData() is None:
            raise RuntimeError("exporting the segmentation to a labelmap failed")
        image = mrml.volume_to_sitk(labelmap)
    finally:
        scene.RemoveNode(labelmap)
        scene.RemoveNode(colors)
    return sitk.Cast(image, sitk.sitkUInt16)


def label_counts(labels: sitk.Image) -> dict[int, int]:
    """Voxels per label value (what the test hook reports and the test compares)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64))
    return {int(v): int(counts[v]) for v in np.flatnonzero(counts)}


def set_uncertainty_overlay(slice_views, uncertainty_node, visible: bool, opacity: float) -> None:
    """Show the uncertainty volume as the slice views' foreground layer (below-threshold voxels clear)."""
    for view in slice_views:
        view.set_foreground_volume_id(uncertainty_node.GetID() if (visible and uncertainty_node) else None)
        view.set_foreground_opacity(float(opacity))


def set_uncertainty_range(uncertainty_node, lower: float, upper: float) -> None:
    """Show only voxels at or above ``lower``; spread the colour map over ``lower``..``upper``."""
    display = uncertainty_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(lower), float(upper))
    display.SetThreshold(float(lower), max(1.0, float(upper)))
    display.ApplyThresholdOn()


def ras_to_ijk(volume_node) -> np.ndarray:
    """The volume's RAS -> IJK matrix (4x4 numpy)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
