"""Segmentation results -> MRML nodes: segments, terminology, subject hierarchy, volumes, uncertainty.

Qt-free: only MRML/logic classes from ``slicer``, VTK, numpy, SimpleITK and the core's label tree,
so everything here runs (and is tested) with ``slicer-core`` outside the Slicer application.

Design decisions (see docs/slicer_extension.md, "Results"):

* **One segmentation node with all 32 structures**, one shared labelmap layer whose label values are
  the FreeSurfer aseg numbers: the node is voxel-for-voxel the core's ``S.seg.nrrd`` and
  ``S_labels.nii.gz``, segments stay mutually exclusive in the Segment Editor, and one export gives
  one labelmap.  Empty structures are kept as empty segments so the segment list (and every
  exported file) has the same 32 entries for every subject.
* **Groups are subject-hierarchy folders, not nodes.**  Slicer has no segment groups, so the
  hemispheres are three folders ("Left hemisphere", "Right hemisphere", "Midline") inside the
  result folder.  Each carries a folder display node that references the segmentation; the
  scene watcher of :mod:`.visibility` maps the folder's eye icon to the visibility of its
  segments, so hiding a hemisphere is one click in the Data module, and
  :func:`set_group_visibility` does the same from code.
* **Re-running replaces, never duplicates**: result nodes carry the attribute
  ``MultiscaleDiffSeg.Role`` and a node reference to their input volume, and are reused in place
  (node IDs and references stay valid).  A segmentation the user picked as output is marked
  ``chosen`` and is never taken over by an automatic re-run, so two results can be compared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from msdseg.core.labels import LabelTree, Node, load_tree
from msdseg.core.volumes import laterality_name, structure_volumes

# ----------------------------------------------------------------------------- names of things
ROLE_ATTRIBUTE = "MultiscaleDiffSeg.Role"
ROLE_SEGMENTATION = "segmentation"
ROLE_UNCERTAINTY = "uncertainty"
ROLE_VOLUMES = "volumes"
ROLE_FOLDER = "results"
ROLE_GROUP = "group"
GROUP_ATTRIBUTE = "MultiscaleDiffSeg.Group"
#: "auto": created by the module for its input (reused when that input is segmented again);
#: "chosen": a node the user picked as output (only reused when picked again).
OUTPUT_ATTRIBUTE = "MultiscaleDiffSeg.Output"
INFO_ATTRIBUTE_PREFIX = "MultiscaleDiffSeg.Info."
SEGMENTATION_ID_ATTRIBUTE = "MultiscaleDiffSeg.SegmentationNodeID"

INPUT_REFERENCE_ROLE = "MultiscaleDiffSegInput"
UNCERTAINTY_REFERENCE_ROLE = "MultiscaleDiffSegUncertainty"
VOLUMES_REFERENCE_ROLE = "MultiscaleDiffSegVolumes"
SEGMENTATION_REFERENCE_ROLE = "MultiscaleDiffSegSegmentation"

TERMINOLOGY_TAG = "TerminologyEntry"
SEGMENT_NODE_TAG = "MultiscaleDiffSeg.NodeId"
SEGMENT_GROUP_TAG = "MultiscaleDiffSeg.Group"
SEGMENT_PATH_TAG = "MultiscaleDiffSeg.Path"

TERMINOLOGY_CONTEXT = "Segmentation category and type - MultiscaleDiffSeg"  # Resources/*.term.json
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")

#: The groups that get subject-hierarchy folders: the children of the tree's root.
GROUP_ALIASES = {"left": "left_hemisphere", "right": "right_hemisphere", "mid": "midline"}

#: Colour maps for the uncertainty map, first one found in the scene wins.  "Inferno" is loaded
#: from Slicer's colour files in the application; slicer-core has only the built-in tables.
UNCERTAINTY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeIron",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeWarm1",
)
#: Uncertainty below this is transparent when the map is shown as foreground.
UNCERTAINTY_DISPLAY_THRESHOLD = 0.02

VOLUME_COLUMNS = ("Structure", "Node ID", "Level", "Aseg label", "Laterality", "Group", "Volume mL")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class GeometryMismatchError(ValueError):
    """The worker's output is not on the input volume's voxel grid (never resampled silently)."""


@dataclass
class ResultNodes:
    """The nodes of one result (what :func:`import_results` made or reused)."""

    segmentation: Any
    table: Any
    uncertainty: Any | None = None
    folder_item: int = 0
    group_items: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- geometry
def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 voxel index -> RAS mm of a SimpleITK image (which stores LPS geometry)."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(np.array(image.GetSpacing(), dtype=float))
    lps[:3, 3] = np.array(image.GetOrigin(), dtype=float)
    return LPS_TO_RAS @ lps


def volume_dimensions(volume_node) -> tuple[int, int, int]:
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no voxel data")
    return tuple(int(d) for d in image.GetDimensions())  # type: ignore[return-value]


def volume_to_sitk(volume_node) -> sitk.Image:
    """The volume's voxels and geometry (local coordinates, i.e. without parent transforms).

    Why not the storage node: writing the worker's input this way needs no ITK IO module of the
    application, keeps full double precision in the geometry and works identically headless.
    """
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{volume_node.GetName()}' has no voxel data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar (grey-level) T1 volume is needed")
    dims = volume_dimensions(volume_node)
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    lps = LPS_TO_RAS @ volume_ijk_to_ras(volume_node)  # LPS_TO_RAS is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    return image


def add_volume_from_sitk(scene, image: sitk.Image, name: str, label: bool = False):
    """A scalar (or labelmap) volume node holding ``image`` with its exact geometry."""
    cls = "vtkMRMLLabelMapVolumeNode" if label else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    _set_volume_voxels(node, sitk.GetArrayFromImage(image), image_ijk_to_ras(image))
    node.CreateDefaultDisplayNodes()
    return node


def _set_volume_voxels(node, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array_kji.shape[2], array_kji.shape[1], array_kji.shape[0])
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True)
    image_data.GetPointData().SetScalars(vtk_array)
    node.SetIJKToRASMatrix(numpy_to_matrix(ijk_to_ras))
    node.SetAndObserveImageData(image_data)


def check_same_grid(image: sitk.Image, volume_node, tolerance_mm: float = 1e-3, what: str = "labels") -> None:
    """Raise :class:`GeometryMismatchError` unless ``image`` lies on the volume's voxel grid.

    The tolerance covers NIfTI's single-precision header: the voxel corners may move by far less
    than a micrometre; anything more is a real mismatch and must not be hidden by resampling.
    """
    dims = volume_dimensions(volume_node)
    if tuple(image.GetSize()) != dims:
        raise GeometryMismatchError(f"{what} have {image.GetSize()} voxels but the input volume has {dims}")
    a, b = image_ijk_to_ras(image), volume_ijk_to_ras(volume_node)
    corners = np.array([[i, j, k, 1.0] for i in (0, dims[0] - 1) for j in (0, dims[1] - 1) for k in (0, dims[2] - 1)])
    shift = float(np.max(np.linalg.norm((corners @ a.T - corners @ b.T)[:, :3], axis=1)))
    extent = float(np.max(np.linalg.norm((corners @ b.T)[:, :3] - b[:3, 3], axis=1)))
    if shift > max(tolerance_mm, 1e-6 * extent):
        raise GeometryMismatchError(f"{what} are not on the input volume's grid (corners differ by {shift:.4g} mm)")


def labels_array_on_volume_grid(labels: sitk.Image, volume_node, tree: LabelTree) -> np.ndarray:
    """The (k, j, i) aseg array of ``labels`` after checking grid, pixel type and label numbers."""
    check_same_grid(labels, volume_node)
    array = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.GetPixelIDTypeAsString()}")
    allowed = set(int(v) for v in tree.channel_to_aseg)
    present = np.flatnonzero(np.bincount(array.ravel().astype(np.int64)))
    unknown = [int(v) for v in present if int(v) not in allowed]
    if unknown:
        raise ValueError(f"labels contain numbers that are not structures of the label tree: {unknown[:10]}")
    dtype = np.uint8 if int(tree.channel_to_aseg.max()) <= 255 else np.uint16
    return array.astype(dtype, copy=False)


# ----------------------------------------------------------------------------- terminology
def _code_string(code) -> str:
    return "^".join((code.scheme, code.value, code.meaning)) if code is not None else "^^"


def terminology_entry(node: Node) -> str:
    """Slicer's ``TerminologyEntry`` tag for a tree node (in the module's own terminology context).

    ``context~category~type~typeModifier~anatomicContext~region~regionModifier``; laterality is the
    type modifier (SCT 7771000 Left / 24028007 Right), as in Slicer's own anatomy list.  Set as a
    plain string because the terminology logic is not available without the application.  No
    trailing ``|``: that is the separator between tags in the .seg.nrrd header, not part of the
    value (a value ending in ``|`` is written as ``...||`` and read back without it).
    """
    if node.code is None:
        return ""
    parts = [
        TERMINOLOGY_CONTEXT,
        "^".join(ANATOMICAL_STRUCTURE),
        _code_string(node.code),
        _code_string(node.laterality),
        ANATOMIC_CONTEXT,
        "^^",
        "^^",
    ]
    return "~".join(parts)


def group_of(tree: LabelTree, node_id: str) -> str:
    """The top-level group (child of the root) that contains ``node_id``."""
    chain = [tree[node_id], *tree.ancestors(node_id)]
    return chain[-2].id if len(chain) >= 2 else node_id


def node_path(tree: LabelTree, node_id: str) -> str:
    """``brain/left_hemisphere/.../left_putamen``: lets scripts select any subtree by tag."""
    chain = [tree[node_id], *tree.ancestors(node_id)]
    return "/".join(n.id for n in reversed(chain))


def get_segment_tag(segment, key: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(key, value) else None


def canonical_group(tree: LabelTree, group: str) -> str:
    """Accept a tree node id, its name, or left/right/mid."""
    key = str(group).strip()
    key = GROUP_ALIASES.get(key.lower(), key)
    for node in tree.nodes:
        if key == node.id or key.lower() == node.name.lower():
            return node.id
    raise ValueError(f"unknown group '{group}' (use a structure of the label tree, e.g. left_hemisphere)")


# ----------------------------------------------------------------------------- segmentation
def _binary_labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _set_source_representation(segmentation) -> None:
    name = _binary_labelmap_name()
    if hasattr(segmentation, "SetSourceRepresentationName"):
        segmentation.SetSourceRepresentationName(name)
    else:  # Slicer < 5.4
        segmentation.SetMasterRepresentationName(name)


def fill_segmentation(segmentation_node, volume_node, labels_kji: np.ndarray, tree: LabelTree) -> None:
    """Replace all segments by the tree's leaves sharing one labelmap with aseg label values."""
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(labels_kji.shape[2], labels_kji.shape[1], labels_kji.shape[0])
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(labels_kji).ravel(), deep=True))
    labelmap.SetImageToWorldMatrix(numpy_to_matrix(volume_ijk_to_ras(volume_node)))
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        _set_source_representation(segmentation)
        for leaf in tree.leaves:
            segment = slicer.vtkSegment()
            segment.SetName(leaf.name)
            segment.SetNameAutoGenerated(False)
            segment.SetColor(*[c / 255.0 for c in leaf.color])
            segment.SetColorAutoGenerated(False)
            segment.SetLabelValue(int(leaf.label))  # type: ignore[arg-type]
            segment.AddRepresentation(_binary_labelmap_name(), labelmap)  # the same object: one layer
            entry = terminology_entry(leaf)
            if entry:
                segment.SetTag(TERMINOLOGY_TAG, entry)
            segment.SetTag(SEGMENT_NODE_TAG, leaf.id)
            segment.SetTag(SEGMENT_GROUP_TAG, group_of(tree, leaf.id))
            segment.SetTag(SEGMENT_PATH_TAG, node_path(tree, leaf.id))
            segmentation.AddSegment(segment, leaf.id)
    finally:
        segmentation_node.EndModify(was_modifying)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def segments_of_group(segmentation_node, tree: LabelTree, group: str) -> list[str]:
    """Segment IDs whose tree path contains ``group`` (found by tag, so renamed segments still count)."""
    group_id = canonical_group(tree, group)
    segmentation = segmentation_node.GetSegmentation()
    ids = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        path = get_segment_tag(segmentation.GetSegment(segment_id), SEGMENT_PATH_TAG)
        if path is not None and group_id in path.split("/"):
            ids.append(segment_id)
    return ids


def set_group_visibility(segmentation_node, group: str, visible: bool, tree: LabelTree | None = None) -> list[str]:
    """Show or hide every segment of a group (any tree node: a hemisphere, 'left_subcortical', ...).

    One call, one display update; the group's subject-hierarchy folder (if it has one) follows, so
    the Data module's eye icon shows the same state.  Returns the affected segment IDs.
    """
    tree = tree or load_tree()
    ids = segments_of_group(segmentation_node, tree, group)
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    was_modifying = display.StartModify()
    try:
        for segment_id in ids:
            display.SetSegmentVisibility(segment_id, bool(visible))
    finally:
        display.EndModify(was_modifying)
    folder_display = group_folder_display_node(segmentation_node, canonical_group(tree, group))
    if folder_display is not None and bool(folder_display.GetVisibility()) != bool(visible):
        folder_display.SetVisibility(bool(visible))
    return ids


def group_visibility(segmentation_node, group: str, tree: LabelTree | None = None) -> bool:
    """True when any segment of the group is visible."""
    tree = tree or load_tree()
    display = segmentation_node.GetDisplayNode()
    ids = segments_of_group(segmentation_node, tree, group)
    return display is not None and any(display.GetSegmentVisibility(i) for i in ids)


def show_3d(segmentation_node) -> None:
    """Closed surfaces for all segments and 3D display on: the 'Show 3D' button."""
    segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility3D(True)


# ----------------------------------------------------------------------------- uncertainty
def uncertainty_color_node_id(scene) -> str | None:
    for node_id in UNCERTAINTY_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    return None


def fill_uncertainty(node, volume_node, uncertainty: sitk.Image) -> None:
    """Voxels on the input grid, a heat colour map and a window that shows the spread of values."""
    check_same_grid(uncertainty, volume_node, what="uncertainty map")
    array = sitk.GetArrayFromImage(uncertainty).astype(np.float32, copy=False)
    _set_volume_voxels(node, array, volume_ijk_to_ras(volume_node))
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    color_id = uncertainty_color_node_id(node.GetScene())
    if color_id:
        display.SetAndObserveColorNodeID(color_id)
    upper = uncertainty_window_max(array)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, upper)
    display.SetThreshold(UNCERTAINTY_DISPLAY_THRESHOLD, max(1.0, float(array.max()) if array.size else 1.0))
    display.ApplyThresholdOn()


def uncertainty_window_max(array: np.ndarray) -> float:
    """Upper window value: the 99.5th percentile of the non-zero uncertainty, at least 0.1.

    Why not a fixed 0..1: typical uncertainties are small, and a full-range window would show an
    almost black map; the floor keeps a near-certain result from being stretched into noise.
    """
    values = array[array > 0]
    if values.size == 0:
        return 1.0
    return float(min(1.0, max(0.1, np.percentile(values, 99.5))))


# ----------------------------------------------------------------------------- volumes table
def fill_volume_table(table_node, volumes: Mapping[str, float], tree: LabelTree) -> None:
    """One row per tree node (file order): name, id, depth, aseg number, laterality, group, mL."""
    table = vtk.vtkTable()
    columns = {
        "Structure": vtk.vtkStringArray(),
        "Node ID": vtk.vtkStringArray(),
        "Level": vtk.vtkIntArray(),
        "Aseg label": vtk.vtkStringArray(),
        "Laterality": vtk.vtkStringArray(),
        "Group": vtk.vtkStringArray(),
        "Volume mL": vtk.vtkDoubleArray(),
    }
    for name in VOLUME_COLUMNS:
        columns[name].SetName(name)
    for node in tree.nodes:
        columns["Structure"].InsertNextValue(node.name)
        columns["Node ID"].InsertNextValue(node.id)
        columns["Level"].InsertNextValue(tree.depth(node.id))
        columns["Aseg label"].InsertNextValue("" if node.label is None else str(int(node.label)))
        columns["Laterality"].InsertNextValue(laterality_name(tree, node.id))
        columns["Group"].InsertNextValue("" if node.parent is None else tree[group_of(tree, node.id)].name)
        columns["Volume mL"].InsertNextValue(float(volumes[node.id]))
    for name in VOLUME_COLUMNS:
        table.AddColumn(columns[name])
    table_node.SetAndObserveTable(table)
    table_node.SetColumnUnitLabel("Volume mL", "mL")
    table_node.SetColumnDescription("Volume mL", "Structure volume; parents are the exact sum of their children")
    table_node.SetColumnDescription("Level", "Depth in the hierarchy (0 = whole brain)")
    table_node.SetColumnDescription("Aseg label", "FreeSurfer aseg label number (leaves only)")
    table_node.SetLocked(True)


def table_volumes(table_node) -> dict[str, float]:
    """node id -> mL read back from a volume table (for scripts and tests)."""
    table = table_node.GetTable()
    ids, values = table.GetColumnByName("Node ID"), table.GetColumnByName("Volume mL")
    return {ids.GetValue(r): float(values.GetValue(r)) for r in range(table.GetNumberOfRows())}


# ----------------------------------------------------------------------------- finding old results
def result_nodes_of(scene, input_volume, role: str) -> list:
    """Nodes with ``MultiscaleDiffSeg.Role == role`` that reference ``input_volume``."""
    found = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.GetAttribute(ROLE_ATTRIBUTE) != role:
            continue
        if node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) == input_volume.GetID():
            found.append(node)
    return found


def is_auto_result_of(node, input_volume) -> bool:
    """True for the segmentation the module created for ``input_volume`` (not a user-chosen node)."""
    return (node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_SEGMENTATION
            and node.GetAttribute(OUTPUT_ATTRIBUTE) == "auto"
            and node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) == input_volume.GetID())


def is_result_of_other_input(node, input_volume) -> bool:
    """True when ``node`` holds the module's automatic result of a *different* volume.

    The GUI keeps the output selection when the user switches to another input; writing the new
    input's result into the old input's node would silently destroy that result, so the widget
    treats such a selection as "create new segmentation".
    """
    return (node is not None
            and node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_SEGMENTATION
            and node.GetAttribute(OUTPUT_ATTRIBUTE) == "auto"
            and node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) not in (None, input_volume.GetID()))


def _mark(node, role: str, input_volume) -> None:
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, input_volume.GetID())


def _reuse_or_add(scene, cls: str, name: str, candidates: Iterable) -> Any:
    for node in candidates:
        if node is not None and node.IsA(cls):
            node.SetName(name)
            return node
    return scene.AddNewNodeByClass(cls, name)


# ----------------------------------------------------------------------------- subject hierarchy
def subject_hierarchy(scene):
    return slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)


def _item_for(sh, node, parent: int) -> int:
    """The node's SH item under ``parent`` (created headless, where no plugin creates items)."""
    item = sh.GetItemByDataNode(node)
    if not item:
        return sh.CreateItem(parent, node)
    if sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)
    return item


def _children(sh, parent: int) -> list[int]:
    ids = vtk.vtkIdList()
    sh.GetItemChildren(parent, ids, False)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def _all_items(sh) -> list[int]:
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def input_parent_item(sh, input_volume) -> int:
    """Where results go: the input's parent item (its study when loaded from DICOM)."""
    item = sh.GetItemByDataNode(input_volume)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), input_volume)
    return sh.GetItemParent(item) or sh.GetSceneItemID()


def result_folder(sh, segmentation_node, parent: int, name: str) -> int:
    """The results folder of this segmentation (found by attribute, created once)."""
    for item in _all_items(sh):
        if (sh.GetItemAttribute(item, ROLE_ATTRIBUTE) == ROLE_FOLDER
                and sh.GetItemAttribute(item, SEGMENTATION_ID_ATTRIBUTE) == segmentation_node.GetID()):
            if sh.GetItemParent(item) != parent:
                sh.SetItemParent(item, parent)
            sh.SetItemName(item, name)
            return item
    item = sh.CreateFolderItem(parent, name)
    sh.SetItemAttribute(item, ROLE_ATTRIBUTE, ROLE_FOLDER)
    sh.SetItemAttribute(item, SEGMENTATION_ID_ATTRIBUTE, segmentation_node.GetID())
    return item


def group_folders(sh, folder: int, segmentation_node, tree: LabelTree) -> dict[str, int]:
    """One folder per top-level group, each with a folder display node that references the segmentation."""
    existing = {sh.GetItemAttribute(i, GROUP_ATTRIBUTE): i for i in _children(sh, folder)
                if sh.GetItemAttribute(i, ROLE_ATTRIBUTE) == ROLE_GROUP}
    items = {}
    for group in tree.children(tree.root.id):
        item = existing.get(group.id) or sh.CreateFolderItem(folder, group.name)
        sh.SetItemAttribute(item, ROLE_ATTRIBUTE, ROLE_GROUP)
        sh.SetItemAttribute(item, GROUP_ATTRIBUTE, group.id)
        display = sh.GetItemDataNode(item)
        if display is None or not display.IsA("vtkMRMLFolderDisplayNode"):
            display = slicer.vtkMRMLFolderDisplayNode.AddDisplayNodeForItem(sh, item)
        display.SetName(group.name)  # the SH item shows the name of its data node
        display.SetAttribute(ROLE_ATTRIBUTE, ROLE_GROUP)
        display.SetAttribute(GROUP_ATTRIBUTE, group.id)
        display.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentation_node.GetID())
        items[group.id] = item
    return items


def group_folder_display_node(segmentation_node, group_id: str):
    """The folder display node that mirrors ``group_id`` of this segmentation, if any."""
    scene = segmentation_node.GetScene()
    if scene is None:
        return None
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLFolderDisplayNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLFolderDisplayNode")
        if (node.GetAttribute(GROUP_ATTRIBUTE) == group_id
                and node.GetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE) == segmentation_node.GetID()):
            return node
    return None


# ----------------------------------------------------------------------------- the whole import
def import_results(
    scene,
    input_volume,
    labels: sitk.Image,
    uncertainty: sitk.Image | None = None,
    segmentation_node=None,
    tree: LabelTree | None = None,
    info: Mapping[str, Any] | None = None,
) -> ResultNodes:
    """Create or update the result nodes of ``input_volume`` from the worker's output images.

    ``segmentation_node``: the node the user chose; None reuses this input's previous result or
    creates one.  Raises before touching the scene when the output does not fit the input.
    """
    tree = tree or load_tree()
    labels_kji = labels_array_on_volume_grid(labels, input_volume, tree)
    if uncertainty is not None:
        check_same_grid(uncertainty, input_volume, what="uncertainty map")
    name = input_volume.GetName()
    if segmentation_node is not None:
        segmentation = segmentation_node
        if not is_auto_result_of(segmentation, input_volume):
            segmentation.SetAttribute(OUTPUT_ATTRIBUTE, "chosen")
    else:
        previous = [n for n in result_nodes_of(scene, input_volume, ROLE_SEGMENTATION)
                    if n.GetAttribute(OUTPUT_ATTRIBUTE) == "auto"]
        segmentation = _reuse_or_add(scene, "vtkMRMLSegmentationNode", f"{name} brain structures", previous)
        segmentation.SetAttribute(OUTPUT_ATTRIBUTE, "auto")
    fill_segmentation(segmentation, input_volume, labels_kji, tree)
    _mark(segmentation, ROLE_SEGMENTATION, input_volume)
    for key, value in (info or {}).items():
        segmentation.SetAttribute(INFO_ATTRIBUTE_PREFIX + str(key), str(value))

    spacing = [float(s) for s in input_volume.GetSpacing()]
    volumes = structure_volumes(labels_kji, spacing, tree)
    table = _reuse_or_add(scene, "vtkMRMLTableNode", f"{name} structure volumes",
                          [segmentation.GetNodeReference(VOLUMES_REFERENCE_ROLE)])
    fill_volume_table(table, volumes, tree)
    _mark(table, ROLE_VOLUMES, input_volume)
    segmentation.SetNodeReferenceID(VOLUMES_REFERENCE_ROLE, table.GetID())

    old_uncertainty = segmentation.GetNodeReference(UNCERTAINTY_REFERENCE_ROLE)
    uncertainty_node = None
    if uncertainty is not None:
        uncertainty_node = _reuse_or_add(scene, "vtkMRMLScalarVolumeNode", f"{name} uncertainty", [old_uncertainty])
        fill_uncertainty(uncertainty_node, input_volume, uncertainty)
        _mark(uncertainty_node, ROLE_UNCERTAINTY, input_volume)
        segmentation.SetNodeReferenceID(UNCERTAINTY_REFERENCE_ROLE, uncertainty_node.GetID())
    elif old_uncertainty is not None:
        # a map of the previous run would be mistaken for this run's: remove it
        segmentation.RemoveNodeReferenceIDs(UNCERTAINTY_REFERENCE_ROLE)
        scene.RemoveNode(old_uncertainty)

    sh = subject_hierarchy(scene)
    parent = input_parent_item(sh, input_volume)
    folder = result_folder(sh, segmentation, parent, f"{name} MultiscaleDiffSeg")
    _item_for(sh, segmentation, folder)
    groups = group_folders(sh, folder, segmentation, tree)
    _item_for(sh, table, folder)
    if uncertainty_node is not None:
        _item_for(sh, uncertainty_node, folder)
    return ResultNodes(segmentation, table, uncertainty_node, folder, groups)


def read_image(path) -> sitk.Image:
    """Read a worker output file (labels or uncertainty)."""
    return sitk.ReadImage(str(path))
