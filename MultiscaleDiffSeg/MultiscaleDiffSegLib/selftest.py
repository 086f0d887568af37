"""The module's self-test steps and the sample T1 they use; Qt-free.

Slicer runs a module's self-test from the ``ScriptedLoadableModuleTest`` class in the module file
(Developer mode > Reload and Test, or ctest on a build machine).  That class only calls the steps
here, with itself as the ``unittest.TestCase`` that asserts, so that the same steps also run in CI
on slicer-core, where the module file (which needs Qt) cannot be imported.
"""
from __future__ import annotations

import os
import unittest
from pathlib import Path
from typing import Callable

from . import dependencies, mrml
from .logic import SELFTEST_INSTALL_ENV, MultiscaleDiffSegLogic

#: The small sample T1 the core ships for the self-test and the Sample Data module (MNI152 2009
#: template at 2 mm, see msdseg/resources/samples/README.md).  Regenerating the file means updating
#: the hash: the self-test and CI refuse a file whose SHA256 differs.
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "msdseg" / "resources" / "samples"
SAMPLE_T1_FILE = "sample_T1.nii.gz"
SAMPLE_T1_SHA256 = "8ec9a926efd42db7a795e1044d7cd9c378a4517c4e9c20880ac304804a3b0c2e"

Show = Callable[[str], None]


def sample_t1_path() -> Path | None:
    """The shipped sample T1, or None while it is not part of the package."""
    path = SAMPLE_DIR / SAMPLE_T1_FILE
    return path if path.is_file() else None


def sha256(path: Path) -> str:
    from msdseg.core.hashing import sha256_file

    return sha256_file(path)


def results_to_mrml(test: unittest.TestCase, scene, show: Show) -> None:
    """Synthetic oblique volume and aseg labels -> segmentation, groups, table (no PyTorch needed)."""
    import numpy as np
    import SimpleITK as sitk

    from msdseg.core.labels import load_tree

    show("Importing synthetic labels")
    tree = load_tree()
    image = sitk.Image([24, 20, 12], sitk.sitkInt16)
    image.SetSpacing([1.2, 0.9, 2.5])
    c, s = np.cos(0.4), np.sin(0.4)
    image.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    image.SetOrigin([10.0, -20.0, 5.0])
    volume = mrml.add_volume_from_sitk(scene, image, "SyntheticT1")
    labels_array = np.zeros((12, 20, 24), dtype=np.uint16)
    labels_array[2:6, 3:9, 4:12] = 17  # left hippocampus
    labels_array[2:6, 3:9, 12:20] = 53  # right hippocampus
    labels_array[7:10, 5:15, 8:16] = 16  # brainstem
    labels = sitk.GetImageFromArray(labels_array)
    labels.CopyInformation(image)
    nodes = mrml.import_results(scene, volume, labels)
    segmentation = nodes.segmentation.GetSegmentation()
    test.assertEqual(segmentation.GetNumberOfSegments(), len(tree.leaves))
    test.assertEqual(segmentation.GetSegment("left_hippocampus").GetName(), "Left hippocampus")
    test.assertEqual(set(nodes.group_items), {"left_hemisphere", "right_hemisphere", "midline"})
    voxel_ml = 1.2 * 0.9 * 2.5 / 1000.0
    test.assertAlmostEqual(mrml.table_volumes(nodes.table)["left_hippocampus"], 4 * 6 * 8 * voxel_ml, places=9)
    MultiscaleDiffSegLogic(scene).set_group_visibility("left_hemisphere", False, nodes.segmentation)
    display = nodes.segmentation.GetDisplayNode()
    test.assertFalse(display.GetSegmentVisibility("left_hippocampus"))
    test.assertTrue(display.GetSegmentVisibility("right_hippocampus"))
    again = mrml.import_results(scene, volume, labels)
    test.assertIs(again.segmentation, nodes.segmentation)
    test.assertEqual(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
    show("Synthetic import passed")


def sample_fast_preset(test: unittest.TestCase, scene, logic: MultiscaleDiffSegLogic, show: Show) -> None:
    """The shipped sample T1, fast preset, real worker: 32 named segments and a volume table.

    Skipped with a message naming what is missing when the packages are not installed: build
    machines run this offline and must not receive PyTorch (set :data:`SELFTEST_INSTALL_ENV`)."""
    path = sample_t1_path()
    if path is None:
        show(f"Sample T1 {SAMPLE_DIR / SAMPLE_T1_FILE} is not shipped yet: sample test skipped")
        return
    test.assertEqual(sha256(path), SAMPLE_T1_SHA256, "sample T1 file is corrupted (SHA256 mismatch)")
    plan = logic.dependencyPlan()
    if not plan.ok and os.environ.get(SELFTEST_INSTALL_ENV) != "1":
        show(f"Sample test skipped: {dependencies.missing_summary(plan)}; the self-test "
             f"installs nothing unless {SELFTEST_INSTALL_ENV}=1")
        return
    import SimpleITK as sitk

    volume = mrml.add_volume_from_sitk(scene, sitk.ReadImage(str(path)), "sample_T1")
    show("Segmenting the sample with the fast preset")
    nodes = logic.segment(volume, preset="fast", device="auto", blocking=True)
    segmentation = nodes.segmentation.GetSegmentation()
    test.assertEqual(segmentation.GetNumberOfSegments(), 32)
    for segment_id in ("left_thalamus", "right_thalamus", "brainstem"):
        test.assertIsNotNone(segmentation.GetSegment(segment_id))
    volumes = mrml.table_volumes(nodes.table)
    test.assertGreater(volumes["brain"], 0.0)
    test.assertAlmostEqual(volumes["brain"], sum(volumes[c] for c in ("left_hemisphere", "right_hemisphere", "midline")),
                           places=6)
    logic.show3D(nodes.segmentation)
    show("Sample test passed")
