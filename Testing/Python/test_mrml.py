"""The MRML layer against real MRML from slicer-core: oblique, anisotropic volume -> labels ->
segmentation node -> .seg.nrrd -> read back with slicerio and slicer-core.

What must survive: segment names, colours, terminology (with laterality), label values, every voxel,
the geometry of the input; plus subject hierarchy placement, re-run replacement, volume tables,
group visibility (the folders' eye icons: test_slicer_visibility.py) and the uncertainty map.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
import slicerio  # noqa: E402 - a core dependency: missing is an error, not a skip
import vtk  # noqa: E402 - comes with slicer-core

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiscaleDiffSeg"
sys.path.insert(0, str(MODULE_DIR))

from MultiscaleDiffSegLib import mrml  # noqa: E402
from msdseg.core.volumes import structure_volumes  # noqa: E402
from conftest import rotation
from shared import TREE  # noqa: E402

pytestmark = pytest.mark.integration

LEAF_BY_LABEL = {int(n.label): n for n in TREE.leaves}
#: Structures left out of the synthetic labels, to check that empty segments are kept.
ABSENT = {5, 44, 26, 58, 24}


# ----------------------------------------------------------------------------- fixtures
def oblique_grid(size=(34, 40, 22), spacing=(1.1, 0.85, 2.6)) -> sitk.Image:
    """An oblique (rotated and flipped) grid with anisotropic spacing, centred off the origin."""
    direction = rotation(0.35, -0.25, 0.6) @ np.diag([1.0, -1.0, 1.0])
    image = sitk.Image([int(s) for s in size], sitk.sitkInt16)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection(direction.ravel().tolist())
    half = (np.array(size) - 1) / 2.0
    origin = np.array([4.0, -12.0, 21.0]) - direction @ (np.array(spacing) * half)
    image.SetOrigin(origin.tolist())
    return image


def lps_points(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel, (k, j, i, 3)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], -1).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return idx * np.array(image.GetSpacing()) @ direction.T + np.array(image.GetOrigin())


def synthetic_aseg(grid: sitk.Image) -> sitk.Image:
    """Aseg numbers by position: left leaves where LPS x > 0 (left), right leaves where x < 0,
    midline structures in a slab around x = 0; a few structures absent on purpose."""
    pts = lps_points(grid)
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    inside = (x / 18) ** 2 + (y / 16) ** 2 + ((z - 21) / 26) ** 2 < 1
    left = [n for n in TREE.leaves if n.id.startswith("left_") and int(n.label) not in ABSENT]
    right = [n for n in TREE.leaves if n.id.startswith("right_") and int(n.label) not in ABSENT]
    mid = [n for n in TREE.leaves if n.laterality is None and int(n.label) not in ABSENT]
    band = np.clip(((y + 16) / 32 * len(left)).astype(int), 0, len(left) - 1)
    labels = np.zeros(x.shape, np.uint16)
    left_lab = np.array([int(n.label) for n in left])[np.clip(band, 0, len(left) - 1)]
    right_lab = np.array([int(n.label) for n in right])[np.clip(band, 0, len(right) - 1)]
    mid_lab = np.array([int(n.label) for n in mid])[np.clip(((z - 21 + 26) / 52 * len(mid)).astype(int), 0, len(mid) - 1)]
    labels = np.where(x > 1.5, left_lab, np.where(x < -1.5, right_lab, mid_lab))
    labels = np.where(inside, labels, 0).astype(np.uint16)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(grid)
    return out


@pytest.fixture
def scene():
    """A scene with the logics that register segmentation converters and colour tables."""
    sc = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerColorLogic()]
    for logic in logics:
        logic.SetMRMLScene(sc)
    sc._test_logics = logics  # keep them alive as long as the scene
    yield sc
    sc.Clear()


@pytest.fixture
def grid() -> sitk.Image:
    image = oblique_grid()
    arr = (lps_points(image)[..., 0] * 10).astype(np.int16)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


@pytest.fixture
def study_volume(scene, grid):
    """The input T1 under Patient > Study in the subject hierarchy (as DICOM import makes it)."""
    volume = mrml.add_volume_from_sitk(scene, grid, "T1 oblique")
    sh = mrml.subject_hierarchy(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, volume)
    return volume, study


@pytest.fixture
def labels(grid) -> sitk.Image:
    return synthetic_aseg(grid)


def shared_labelmap_array(segmentation_node) -> tuple[np.ndarray, np.ndarray]:
    """(k, j, i) voxels and IJK->RAS of the one shared labelmap layer."""
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 1
    image = segmentation.GetSegment(segmentation.GetNthSegmentID(0)).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    dims = image.GetDimensions()
    extent = image.GetExtent()
    assert extent[0] == 0 and extent[2] == 0 and extent[4] == 0
    from vtk.util import numpy_support

    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return arr, mrml.matrix_to_numpy(matrix)


def lps_matrix_of_volume(volume) -> np.ndarray:
    return mrml.LPS_TO_RAS @ mrml.volume_ijk_to_ras(volume)


# ----------------------------------------------------------------------------- geometry helpers
def test_volume_to_sitk_keeps_voxels_and_oblique_geometry(scene, grid):
    volume = mrml.add_volume_from_sitk(scene, grid, "T1")
    back = mrml.volume_to_sitk(volume)
    assert back.GetSize() == grid.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), grid.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), grid.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), grid.GetOrigin(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(grid))


def test_worker_input_file_matches_the_volume(scene, grid, tmp_path):
    """What the worker reads (nrrd written from the node) is the volume, voxel for voxel."""
    from msdseg.core.io import read_image

    volume = mrml.add_volume_from_sitk(scene, grid, "T1")
    path = tmp_path / "input.nrrd"
    sitk.WriteImage(mrml.volume_to_sitk(volume), str(path), useCompression=False)
    read = read_image(path, validate=False)  # the core reads it like this (small test FOV)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(grid))
    np.testing.assert_allclose(mrml.image_ijk_to_ras(read), mrml.volume_ijk_to_ras(volume), atol=1e-6)


# ----------------------------------------------------------------------------- segmentation node
def test_segmentation_has_all_leaves_with_names_colours_terminology(scene, study_volume, labels):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    segmentation = nodes.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 32
    assert segmentation.GetNumberOfLayers() == 1
    for leaf in TREE.leaves:
        segment = segmentation.GetSegment(leaf.id)
        assert segment is not None, leaf.id
        assert segment.GetName() == leaf.name
        assert segment.GetLabelValue() == leaf.label
        np.testing.assert_allclose(segment.GetColor(), np.array(leaf.color) / 255.0, atol=1e-6)
        entry = mrml.get_segment_tag(segment, mrml.TERMINOLOGY_TAG)
        assert entry == mrml.terminology_entry(leaf)
        fields = entry.rstrip("|").split("~")
        assert fields[0] == "Segmentation category and type - MultiscaleDiffSeg"
        assert fields[1] == "SCT^123037004^Anatomical Structure"
        assert fields[2] == f"{leaf.code.scheme}^{leaf.code.value}^{leaf.code.meaning}"
        if leaf.id.startswith("left_"):
            assert fields[3] == "SCT^7771000^Left"
        elif leaf.id.startswith("right_"):
            assert fields[3] == "SCT^24028007^Right"
        else:
            assert fields[3] == "^^"
        assert fields[4] == "Anatomic codes - DICOM master list"
        assert mrml.get_segment_tag(segment, mrml.SEGMENT_GROUP_TAG) == mrml.group_of(TREE, leaf.id)


def test_terminology_matches_the_core_seg_nrrd(tmp_path):
    """The Slicer module and the core's S.seg.nrrd describe each structure with the same codes."""
    from msdseg.outputs.writers import terminology_string

    for leaf in TREE.leaves:
        assert mrml.terminology_entry(leaf) == terminology_string(leaf)


def test_terminology_strings_parse_with_slicers_own_terminology_logic():
    """Slicer's deserializer reads type and laterality back, and re-serializes to the same string."""
    logic = slicer.vtkSlicerTerminologiesModuleLogic
    for leaf in TREE.leaves:
        text = mrml.terminology_entry(leaf)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(text, entry), leaf.id
        assert entry.GetCategoryObject().GetCodeValue() == "123037004"
        assert entry.GetTypeObject().GetCodeValue() == leaf.code.value
        assert entry.GetTypeObject().GetCodingSchemeDesignator() == leaf.code.scheme
        modifier = entry.GetTypeModifierObject().GetCodeMeaning() or ""
        assert modifier == (leaf.laterality.meaning if leaf.laterality else "")
        assert logic.SerializeTerminologyEntry(entry) == text


def test_segmentation_voxels_and_geometry_equal_the_labels(scene, study_volume, labels):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    voxels, ijk_to_ras = shared_labelmap_array(nodes.segmentation)
    np.testing.assert_array_equal(voxels, sitk.GetArrayFromImage(labels))
    np.testing.assert_allclose(ijk_to_ras, mrml.volume_ijk_to_ras(volume), atol=1e-12)
    assert nodes.segmentation.GetNodeReference(
        nodes.segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    empty = [leaf.id for leaf in TREE.leaves if int(leaf.label) in ABSENT]
    present = set(np.unique(voxels).tolist()) - {0}
    assert not present & ABSENT and len(empty) == len(ABSENT)


def test_seg_nrrd_round_trip_slicerio_and_slicer_core(scene, study_volume, labels, tmp_path):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    path = tmp_path / "result.seg.nrrd"
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(nodes.segmentation)

    # --- slicerio (what the rest of the Python ecosystem reads)
    seg = slicerio.read_segmentation(str(path))
    assert len(seg["segments"]) == 32
    by_id = {s["id"]: s for s in seg["segments"]}
    for leaf in TREE.leaves:
        s = by_id[leaf.id]
        assert s["name"] == leaf.name
        assert s["labelValue"] == leaf.label
        np.testing.assert_allclose(s["color"], np.array(leaf.color) / 255.0, atol=1e-6)
        term = s["terminology"]
        assert term["type"] == [leaf.code.scheme, leaf.code.value, leaf.code.meaning]
        if leaf.laterality is not None:
            assert term["typeModifier"] == [leaf.laterality.scheme, leaf.laterality.value, leaf.laterality.meaning]
        else:
            assert "typeModifier" not in term or not any(term["typeModifier"])
    np.testing.assert_allclose(seg["ijkToLPS"], lps_matrix_of_volume(volume), atol=1e-9)
    offset = seg.get("referenceImageExtentOffset", [0, 0, 0])
    voxels_ijk = np.asarray(seg["voxels"])
    full = np.zeros(volume.GetImageData().GetDimensions(), voxels_ijk.dtype)  # (i, j, k)
    full[offset[0]:offset[0] + voxels_ijk.shape[0], offset[1]:offset[1] + voxels_ijk.shape[1],
         offset[2]:offset[2] + voxels_ijk.shape[2]] = voxels_ijk
    np.testing.assert_array_equal(full.transpose(2, 1, 0), sitk.GetArrayFromImage(labels))

    # --- slicer-core in a fresh scene (what Slicer itself reads)
    scene2 = slicer.vtkMRMLScene()
    logic2 = slicer.vtkSlicerSegmentationsModuleLogic()
    logic2.SetMRMLScene(scene2)
    node2 = scene2.AddNewNodeByClass("vtkMRMLSegmentationNode")
    reader = scene2.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    assert reader.ReadData(node2)
    segmentation2 = node2.GetSegmentation()
    assert segmentation2.GetNumberOfSegments() == 32
    for leaf in TREE.leaves:
        segment = segmentation2.GetSegment(leaf.id)
        assert segment.GetName() == leaf.name
        assert segment.GetLabelValue() == leaf.label
        np.testing.assert_allclose(segment.GetColor(), np.array(leaf.color) / 255.0, atol=1e-6)
        assert mrml.get_segment_tag(segment, mrml.TERMINOLOGY_TAG) == mrml.terminology_entry(leaf)
        assert mrml.get_segment_tag(segment, mrml.SEGMENT_PATH_TAG) == mrml.node_path(TREE, leaf.id)
    voxels2, ijk_to_ras2 = shared_labelmap_array(node2)
    np.testing.assert_allclose(ijk_to_ras2, mrml.volume_ijk_to_ras(volume), atol=1e-9)
    np.testing.assert_array_equal(voxels2, sitk.GetArrayFromImage(labels))


def test_labels_read_from_nifti_keep_the_exact_input_geometry(scene, study_volume, labels, tmp_path):
    """NIfTI stores geometry in single precision; the result still takes the input's exact grid."""
    volume, _ = study_volume
    path = tmp_path / "input_labels.nii.gz"
    sitk.WriteImage(labels, str(path))
    nodes = mrml.import_results(scene, volume, mrml.read_image(path))
    voxels, ijk_to_ras = shared_labelmap_array(nodes.segmentation)
    np.testing.assert_array_equal(voxels, sitk.GetArrayFromImage(labels))
    np.testing.assert_array_equal(ijk_to_ras, mrml.volume_ijk_to_ras(volume))


def test_labels_on_another_grid_are_rejected_before_touching_the_scene(scene, study_volume, labels):
    volume, _ = study_volume
    before = scene.GetNumberOfNodes()
    shifted = sitk.Image(labels)
    shifted.SetOrigin([o + 0.5 for o in labels.GetOrigin()])
    with pytest.raises(mrml.GeometryMismatchError):
        mrml.import_results(scene, volume, shifted)
    cropped = labels[1:, :, :]
    with pytest.raises(mrml.GeometryMismatchError):
        mrml.import_results(scene, volume, cropped)
    bad = sitk.Image(labels)
    bad[0, 0, 0] = 99  # not an aseg number of the tree
    with pytest.raises(ValueError, match="not structures of the label tree"):
        mrml.import_results(scene, volume, bad)
    assert scene.GetNumberOfNodes() == before


def test_parent_transform_of_the_input_is_kept(scene, study_volume, labels):
    volume, _ = study_volume
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    nodes = mrml.import_results(scene, volume, labels, uncertainty=sitk.Cast(labels, sitk.sitkFloat32) / 100.0)
    assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
    assert nodes.uncertainty.GetTransformNodeID() == transform.GetID()


# ----------------------------------------------------------------------------- subject hierarchy
def test_results_are_placed_under_the_input_study_with_group_folders(scene, study_volume, labels):
    volume, study = study_volume
    unc = sitk.Cast(labels, sitk.sitkFloat32) / 100.0
    nodes = mrml.import_results(scene, volume, labels, uncertainty=unc)
    sh = mrml.subject_hierarchy(scene)
    assert sh.GetItemParent(nodes.folder_item) == study
    assert sh.GetItemAttribute(nodes.folder_item, mrml.ROLE_ATTRIBUTE) == mrml.ROLE_FOLDER
    for node in (nodes.segmentation, nodes.table, nodes.uncertainty):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == nodes.folder_item
    names = {sh.GetItemName(item): group for group, item in nodes.group_items.items()}
    assert names == {"Left hemisphere": "left_hemisphere", "Right hemisphere": "right_hemisphere",
                     "Midline": "midline"}
    for group, item in nodes.group_items.items():
        assert sh.GetItemParent(item) == nodes.folder_item
        assert sh.GetItemAttribute(item, mrml.GROUP_ATTRIBUTE) == group
        display = sh.GetItemDataNode(item)
        assert display.IsA("vtkMRMLFolderDisplayNode")
        assert not display.GetHideFromEditors()  # else the folder is invisible in the Data module
        assert display.GetNodeReference(mrml.SEGMENTATION_REFERENCE_ROLE) is nodes.segmentation


def test_volume_without_study_gets_results_next_to_it(scene, grid, labels):
    volume = mrml.add_volume_from_sitk(scene, grid, "T1 from file")
    nodes = mrml.import_results(scene, volume, labels)
    sh = mrml.subject_hierarchy(scene)
    assert sh.GetItemParent(nodes.folder_item) == sh.GetItemParent(sh.GetItemByDataNode(volume))


# ----------------------------------------------------------------------------- re-running
def count_items_with(sh, attribute: str, value: str) -> int:
    return sum(1 for item in mrml._all_items(sh) if sh.GetItemAttribute(item, attribute) == value)


def test_rerun_replaces_the_previous_result_and_never_duplicates(scene, study_volume, labels, grid):
    volume, study = study_volume
    first = mrml.import_results(scene, volume, labels, uncertainty=sitk.Cast(labels, sitk.sitkFloat32) / 100.0,
                                info={"preset": "fast"})
    arr = sitk.GetArrayFromImage(labels)
    arr2 = np.where(arr == 17, 53, arr).astype(np.uint16)  # a different result
    labels2 = sitk.GetImageFromArray(arr2)
    labels2.CopyInformation(labels)
    second = mrml.import_results(scene, volume, labels2, info={"preset": "accurate"})
    assert second.segmentation is first.segmentation
    assert second.table is first.table
    assert second.uncertainty is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # the input only: old map removed
    assert scene.GetNumberOfNodesByClass("vtkMRMLFolderDisplayNode") == 3
    sh = mrml.subject_hierarchy(scene)
    assert count_items_with(sh, mrml.ROLE_ATTRIBUTE, mrml.ROLE_FOLDER) == 1
    assert count_items_with(sh, mrml.ROLE_ATTRIBUTE, mrml.ROLE_GROUP) == 3
    assert second.folder_item == first.folder_item
    assert second.segmentation.GetSegmentation().GetNumberOfSegments() == 32
    voxels, _ = shared_labelmap_array(second.segmentation)
    np.testing.assert_array_equal(voxels, arr2)
    assert second.segmentation.GetAttribute(mrml.INFO_ATTRIBUTE_PREFIX + "preset") == "accurate"
    assert mrml.table_volumes(second.table)["left_hippocampus"] == 0.0


def test_other_inputs_and_chosen_output_nodes_are_separate_results(scene, study_volume, labels, grid):
    volume, _ = study_volume
    other = mrml.add_volume_from_sitk(scene, grid, "second T1")
    a = mrml.import_results(scene, volume, labels)
    b = mrml.import_results(scene, other, labels)
    assert a.segmentation is not b.segmentation
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my comparison")
    c = mrml.import_results(scene, volume, labels, segmentation_node=chosen)
    assert c.segmentation is chosen
    assert chosen.GetSegmentation().GetNumberOfSegments() == 32
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3
    # the automatic result of this volume is reused, not the user's comparison node
    d = mrml.import_results(scene, volume, labels)
    assert d.segmentation is a.segmentation and c.table is not a.table
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 3
    # a selector still holding volume A's result while B is the input: not B's to overwrite
    assert mrml.is_result_of_other_input(a.segmentation, other)
    assert not mrml.is_result_of_other_input(a.segmentation, volume)
    assert not mrml.is_result_of_other_input(chosen, other)


# ----------------------------------------------------------------------------- volumes table
def test_volume_table_values(scene, study_volume, labels):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    table = nodes.table.GetTable()
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == list(mrml.VOLUME_COLUMNS)
    assert table.GetNumberOfRows() == len(TREE.nodes)
    got = mrml.table_volumes(nodes.table)
    arr = sitk.GetArrayFromImage(labels)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    for leaf in TREE.leaves:
        assert got[leaf.id] == pytest.approx(np.count_nonzero(arr == leaf.label) * voxel_ml, rel=0, abs=1e-12)
    for node in TREE.internal:
        assert got[node.id] == pytest.approx(sum(got[c.id] for c in TREE.children(node.id)), rel=1e-12, abs=1e-12)
    assert got["brain"] == pytest.approx(np.count_nonzero(arr) * voxel_ml, rel=1e-12)
    assert got == pytest.approx(structure_volumes(arr, labels.GetSpacing(), TREE), abs=1e-12)
    rows = {table.GetValueByName(r, "Node ID").ToString(): r for r in range(table.GetNumberOfRows())}
    assert table.GetValueByName(rows["left_putamen"], "Laterality").ToString() == "Left"
    assert table.GetValueByName(rows["left_putamen"], "Aseg label").ToString() == "12"
    assert table.GetValueByName(rows["left_putamen"], "Group").ToString() == "Left hemisphere"
    assert table.GetValueByName(rows["brain"], "Level").ToInt() == 0
    assert nodes.table.GetColumnUnitLabel("Volume mL") == "mL"
    assert nodes.segmentation.GetNodeReference(mrml.VOLUMES_REFERENCE_ROLE) is nodes.table


# ----------------------------------------------------------------------------- visibility
def test_set_group_visibility_hides_a_whole_hemisphere_in_one_call(scene, study_volume, labels):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    seg = nodes.segmentation
    display = seg.GetDisplayNode()
    hidden = mrml.set_group_visibility(seg, "left_hemisphere", False)
    assert sorted(hidden) == sorted(n.id for n in TREE.descendant_leaves("left_hemisphere"))
    for leaf in TREE.leaves:
        assert bool(display.GetSegmentVisibility(leaf.id)) == (not leaf.id.startswith("left_"))
    # the Data module's eye icon on the group folder mirrors the state
    assert not mrml.group_folder_display_node(seg, "left_hemisphere").GetVisibility()
    mrml.set_group_visibility(seg, "left", True)
    assert all(display.GetSegmentVisibility(n.id) for n in TREE.leaves)
    # any subtree works too
    mrml.set_group_visibility(seg, "right_subcortical", False)
    assert not display.GetSegmentVisibility("right_putamen")
    assert display.GetSegmentVisibility("right_cerebral_cortex")
    with pytest.raises(ValueError, match="unknown group"):
        mrml.set_group_visibility(seg, "frontal lobe", False)


def test_show_3d_creates_closed_surfaces(scene, study_volume, labels):
    volume, _ = study_volume
    nodes = mrml.import_results(scene, volume, labels)
    mrml.show_3d(nodes.segmentation)
    segmentation = nodes.segmentation.GetSegmentation()
    assert segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    surface = segmentation.GetSegment("left_thalamus").GetRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert surface is not None and surface.GetNumberOfPoints() > 0
    assert nodes.segmentation.GetDisplayNode().GetVisibility3D()


# ----------------------------------------------------------------------------- uncertainty
def test_uncertainty_volume_geometry_colours_and_window(scene, study_volume, labels):
    volume, _ = study_volume
    rng = np.random.default_rng(1)
    arr = (rng.random(sitk.GetArrayFromImage(labels).shape) ** 3).astype(np.float32)
    unc = sitk.GetImageFromArray(arr)
    unc.CopyInformation(labels)
    nodes = mrml.import_results(scene, volume, labels, uncertainty=unc)
    node = nodes.uncertainty
    assert node.GetAttribute(mrml.ROLE_ATTRIBUTE) == mrml.ROLE_UNCERTAINTY
    assert node.GetNodeReference(mrml.INPUT_REFERENCE_ROLE) is volume
    np.testing.assert_allclose(mrml.volume_ijk_to_ras(node), mrml.volume_ijk_to_ras(volume), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.volume_to_sitk(node)), arr)
    display = node.GetDisplayNode()
    color_id = display.GetColorNodeID()
    assert color_id in mrml.UNCERTAINTY_COLOR_NODE_IDS and scene.GetNodeByID(color_id) is not None
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(mrml.uncertainty_window_max(arr))
    assert display.GetApplyThreshold()


def test_uncertainty_window_max_is_bounded():
    assert mrml.uncertainty_window_max(np.zeros(10, np.float32)) == 1.0
    assert mrml.uncertainty_window_max(np.full(10, 0.01, np.float32)) == 0.1
    assert mrml.uncertainty_window_max(np.linspace(0, 1, 1000, dtype=np.float32)) == pytest.approx(0.995, abs=0.01)
