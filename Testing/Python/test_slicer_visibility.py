"""Hemisphere folders' eye icons on real MRML (slicer-core): in a saved scene loaded before the
module was ever opened, in results made after the watcher started, and no observer left behind
when the scene closes or the watcher stops.

Clicking a folder's eye icon in the Data module sets the visibility of the folder's display node
(Slicer's qSlicerSubjectHierarchyFolderPlugin::setDisplayVisibility), which is what these tests do.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiscaleDiffSeg"
sys.path.insert(0, str(MODULE_DIR))

from MultiscaleDiffSegLib import mrml, visibility  # noqa: E402
from shared import TREE  # noqa: E402

pytestmark = pytest.mark.integration

LEFT = [n.id for n in TREE.descendant_leaves("left_hemisphere")]
RIGHT = [n.id for n in TREE.descendant_leaves("right_hemisphere")]
MIDLINE = [n.id for n in TREE.descendant_leaves("midline")]


def new_scene():
    """A scene with the segmentations logic, which Slicer attaches to its scene: it registers the
    segmentation storage and conversion that saving and loading the scene use."""
    scene = slicer.vtkMRMLScene()
    scene._test_logic = slicer.vtkSlicerSegmentationsModuleLogic()  # lives as long as the scene
    scene._test_logic.SetMRMLScene(scene)
    return scene


@pytest.fixture
def scenes():
    """Scenes made by a test; each is unwatched and cleared afterwards."""
    made = []
    yield lambda: made.append(new_scene()) or made[-1]
    for scene in made:
        visibility.unwatch_scene(scene)
        scene.Clear()


def add_result(scene):
    """A T1 volume and the module's result nodes (segmentation, table, result and group folders)."""
    image = sitk.Image([20, 22, 18], sitk.sitkInt16)
    image.SetSpacing([1.5, 1.4, 1.6])
    volume = mrml.add_volume_from_sitk(scene, image, "T1")
    labels = np.zeros((18, 22, 20), np.uint16)
    labels[2:8, 2:10, 2:9] = 17  # left hippocampus
    labels[2:8, 2:10, 11:18] = 53  # right hippocampus
    labels[10:14, 5:15, 6:14] = 16  # brainstem
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return mrml.import_results(scene, volume, label_image)


def save_scene(scene, folder: Path) -> Path:
    """Write every storable node with its default storage node, then the .mrml file."""
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if not node.IsA("vtkMRMLStorableNode") or node.GetStorageNode() is not None:
            continue
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
        storage.SetFileName(str(folder / f"{node.GetID()}.{storage.GetDefaultWriteFileExtension()}"))
        assert storage.WriteData(node), node.GetID()
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    return folder / "scene.mrml"


def visible(segmentation_node, ids) -> list[bool]:
    display = segmentation_node.GetDisplayNode()
    return [bool(display.GetSegmentVisibility(i)) for i in ids]


@pytest.mark.parametrize("load", ["Connect", "Import"])  # File > Load Scene clears first; Add Data does not
def test_eye_icons_work_in_a_saved_scene_loaded_before_the_module_is_opened(scenes, tmp_path, load):
    saved = scenes()
    add_result(saved)
    path = save_scene(saved, tmp_path)

    scene = scenes()
    visibility.watch_scene(scene)  # what the module class does when the application has started
    scene.SetURL(str(path))
    assert getattr(scene, load)()
    segmentation = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert segmentation.GetSegmentation().GetNumberOfSegments() == len(TREE.leaves)
    left_folder = mrml.group_folder_display_node(segmentation, "left_hemisphere")
    assert left_folder is not None and all(visible(segmentation, LEFT + RIGHT))

    left_folder.SetVisibility(False)  # the eye icon of "Left hemisphere"
    assert not any(visible(segmentation, LEFT)) and all(visible(segmentation, RIGHT + MIDLINE))
    left_folder.SetVisibility(True)
    assert all(visible(segmentation, LEFT))
    mrml.group_folder_display_node(segmentation, "midline").SetVisibility(False)
    assert not any(visible(segmentation, MIDLINE)) and all(visible(segmentation, LEFT + RIGHT))


def test_results_made_after_watching_need_no_other_call(scenes):
    """The folders are created before their attributes are set; the watcher still catches them."""
    scene = scenes()
    visibility.watch_scene(scene)
    nodes = add_result(scene)
    sh = mrml.subject_hierarchy(scene)
    sh.GetItemDataNode(nodes.group_items["right_hemisphere"]).SetVisibility(False)
    assert not any(visible(nodes.segmentation, RIGHT)) and all(visible(nodes.segmentation, LEFT))


def test_only_a_change_of_the_folder_is_passed_on(scenes):
    scene = scenes()
    nodes = add_result(scene)
    watcher = visibility.watch_scene(scene)
    assert visibility.watch_scene(scene) is watcher and watcher.attach() == 3  # watching twice observes once
    folder = mrml.group_folder_display_node(nodes.segmentation, "midline")
    nodes.segmentation.GetDisplayNode().SetSegmentVisibility("brainstem", False)  # hidden by hand
    folder.SetName("renamed")  # an unrelated modification of the folder
    assert not visible(nodes.segmentation, ["brainstem"])[0]
    assert len([n for n, _ in watcher.observed_folders() if visibility.is_group_folder(n)]) == 3


def test_closing_the_scene_removes_every_folder_observer(scenes):
    scene = scenes()
    watcher = visibility.watch_scene(scene)
    nodes = add_result(scene)
    observed = watcher.observed_folders()
    assert len(observed) == 3
    scene.Clear()  # File > Close Scene: StartCloseEvent ... EndCloseEvent
    assert watcher.observed_folders() == []
    assert all(node.GetCommand(tag) is None for node, tag in observed)
    assert nodes.segmentation.GetScene() is None
    # the watcher itself stays: a result made in the next scene works at once
    again = add_result(scene)
    mrml.group_folder_display_node(again.segmentation, "left_hemisphere").SetVisibility(False)
    assert not any(visible(again.segmentation, LEFT))


def test_a_removed_folder_is_no_longer_observed(scenes):
    scene = scenes()
    watcher = visibility.watch_scene(scene)
    nodes = add_result(scene)
    folder = mrml.group_folder_display_node(nodes.segmentation, "left_hemisphere")
    tag = dict(watcher.observed_folders())[folder]
    scene.RemoveNode(folder)
    assert folder.GetCommand(tag) is None and len(watcher.observed_folders()) == 2


def test_unwatching_removes_the_scene_and_folder_observers(scenes):
    scene = scenes()
    watcher = visibility.watch_scene(scene)
    nodes = add_result(scene)
    scene_tags, observed = watcher.scene_observer_tags(), watcher.observed_folders()
    assert len(scene_tags) == 5 and len(observed) == 3
    visibility.unwatch_scene(scene)
    assert visibility.watcher_of(scene) is None
    assert all(scene.GetCommand(tag) is None for tag in scene_tags)
    assert all(node.GetCommand(tag) is None for node, tag in observed)
    mrml.group_folder_display_node(nodes.segmentation, "left_hemisphere").SetVisibility(False)
    assert all(visible(nodes.segmentation, LEFT))  # nothing listens any more
