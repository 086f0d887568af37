"""Thick voxels take the label that covers most of their extent: in the answer (back-projection
averages the probabilities over each voxel's footprint) and in the reference the answer is scored
against on its own grid (majority vote of the 1 mm map)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from msdseg.core.geometry import ModelGrid
from msdseg.evaluation.diagnostics.resolution_ceiling import majority_on_grid
from msdseg.evaluation.robustness import GridScores, _thick_slices
from msdseg.inference.backproject import backproject, footprint
from msdseg.inference.intensity import IntensityModel

pytestmark = pytest.mark.unit

#: along z, 1 mm rows of one class each; thick voxel k covers rows 5k..5k+4 (centre row 5k+2)
ROWS = [0, 1, 1, 1, 0,   # 3 of 5 rows: class 1 wins
        0, 2, 2, 0, 0,   # 2 of 5, the centre among them: background wins
        1, 1, 2, 2, 2,   # 3 of 5: class 2 wins
        0, 0, 0, 0, 1]   # background
MAJORITY = [1, 0, 2, 0]


def _grid_and_probs() -> tuple[ModelGrid, torch.Tensor]:
    """A 1 mm model grid holding ``ROWS`` one-hot along RAS z (S), the same in every (x, y)."""
    grid = ModelGrid((0.0, 0.0, 0.0), 1.0, (6, 5, len(ROWS)))
    probs = torch.zeros(3, *grid.shape)
    for z, c in enumerate(ROWS):
        probs[c, :, :, z] = 1.0
    return grid, probs


def _thick_scan(values: np.ndarray | None = None) -> sitk.Image:
    """A 1 x 1 x 5 mm scan whose voxel (i, j, k) is centred on grid index (i, j, 5k + 2)."""
    arr = np.zeros((4, 5, 6), np.float32) if values is None else values  # (k, j, i)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 5.0))
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))  # index i, j run towards R, A
    img.SetOrigin((0.0, 0.0, 2.0))
    return img


def test_only_axes_longer_than_the_grid_are_subdivided():
    assert footprint((1.0, 1.0, 1.0), 2.0) == (1, 1, 1)
    assert footprint((2.0, 2.0, 2.0), 2.0) == (1, 1, 1)  # as fine as the answer: its centre is enough
    assert footprint((1.0, 1.0, 5.0), 2.0) == (1, 1, 5)
    assert footprint((3.0, 3.0, 3.0), 2.0) == (3, 3, 3)
    assert footprint((0.5, 2.5, 1.0), 2.0) == (1, 3, 1)  # sub-points at most 1 mm apart


def test_a_thin_slab_wins_a_thick_voxel_only_when_it_covers_most_of_it():
    grid, probs = _grid_and_probs()
    img = _thick_scan()
    lut = np.array([0, 17, 53])
    labels, unc = backproject(probs, grid, img, lut, uncertainty=probs[1:2])
    got = sitk.GetArrayFromImage(labels)  # (k, j, i)
    assert got.shape == (4, 5, 6)
    assert np.array_equal(got[:, 2, 3], lut[MAJORITY])
    assert (got == got[:, :1, :1]).all()  # the same in every column
    centre = [ROWS[5 * k + 2] for k in range(4)]
    assert centre != MAJORITY, "the centre rows must tell a different story"
    # without an intensity model the interpolated map is averaged over the footprint: here class
    # 1's share of each voxel
    share = [np.mean([r == 1 for r in ROWS[5 * k:5 * k + 5]]) for k in range(4)]
    assert sitk.GetArrayFromImage(unc)[:, 2, 3] == pytest.approx(share, abs=1e-5)


def test_voxels_no_longer_than_the_grid_are_labelled_at_their_centre():
    grid, probs = _grid_and_probs()
    fine = sitk.GetImageFromArray(np.zeros((len(ROWS), 5, 6), np.float32))
    fine.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    labels, _ = backproject(probs, grid, fine, np.array([0, 17, 53]))
    assert list(sitk.GetArrayFromImage(labels)[:, 2, 3]) == [[0, 17, 53][c] for c in ROWS]


def test_with_the_intensity_model_each_voxel_is_judged_by_its_own_intensity():
    """The network leans towards class 2 in the upper half of the first voxel and is unsure
    elsewhere; each slice's own intensity decides its label (class 1 at 40, class 2 at 100), never a
    neighbouring slice's, and the uncertainty follows the averaged posterior."""
    grid, _ = _grid_and_probs()
    probs = torch.zeros(3, *grid.shape)
    probs[0], probs[1], probs[2] = 0.02, 0.49, 0.49
    probs[1, :, :, 3:5], probs[2, :, :, 3:5] = 0.3, 0.68  # the network's doubt inside voxel 0
    values = np.repeat(np.array([40.0, 40.0, 100.0, 100.0], np.float32), 30).reshape(4, 5, 6)
    model = IntensityModel(torch.tensor([0.0, 40.0, 100.0]), torch.tensor([100.0, 100.0, 100.0]))
    temperature = torch.full((1, *grid.shape), 1.5)  # a field, as the pipeline passes it
    scan, lut = _thick_scan(values), np.array([0, 17, 53])
    labels, unc = backproject(probs, grid, scan, lut, uncertainty=probs[:1], intensity=model, temperature=temperature)
    assert list(sitk.GetArrayFromImage(labels)[:, 2, 3]) == [17, 17, 53, 53]
    labels_only, _ = backproject(probs, grid, scan, lut, intensity=model, temperature=temperature)
    assert np.array_equal(sitk.GetArrayFromImage(labels_only), sitk.GetArrayFromImage(labels))
    u = sitk.GetArrayFromImage(unc)
    assert 0.0 <= u.min() and u.max() <= 1.0
    assert u[0, 2, 3] > u[1, 2, 3]  # where the network doubted, the averaged posterior is less sure


def _label_map(rows: list[int]) -> sitk.Image:
    """A 1 mm label map (6 x 5 x len(rows)) holding ``rows`` along its third axis."""
    arr = np.broadcast_to(np.asarray(rows, np.uint16)[:, None, None], (len(rows), 5, 6)).copy()
    return sitk.GetImageFromArray(arr)


def test_the_reference_on_a_thick_grid_is_the_majority_of_each_footprint():
    labels = _label_map([[0, 17, 53][c] for c in ROWS])
    thick = _thick_slices(sitk.Cast(labels, sitk.sitkFloat32), 2, 5.0)  # the robustness variants' grid
    assert thick.GetSize() == (6, 5, 4)
    voted = majority_on_grid(labels, thick)
    assert list(sitk.GetArrayFromImage(voted)[:, 2, 3]) == [[0, 17, 53][c] for c in MAJORITY]
    assert majority_on_grid(labels, labels) is labels


def test_unlabelled_voxels_do_not_vote():
    rows = [255, 255, 255, 17, 17,   # 17 holds 2 of 5 but every other vote is void: 17
            255, 255, 255, 255, 255]  # nobody votes: stays unlabelled
    labels = _label_map(rows)
    thick = _thick_slices(sitk.Cast(labels, sitk.sitkFloat32), 2, 5.0)
    assert list(sitk.GetArrayFromImage(majority_on_grid(labels, thick))[:, 2, 3]) == [17, 255]


def test_grid_scores_separate_what_the_grid_costs_from_what_the_input_cost():
    """The 1 mm reference as the 1 mm scan's answer scores 1 on every grid; an answer equal to the
    voted reference scores 1 on the thick grid; the ceiling is below 1 because the thin slab is lost."""
    ref = _label_map([[0, 17, 53][c] for c in ROWS])
    thick = _thick_slices(sitk.Cast(ref, sitk.sitkFloat32), 2, 5.0)
    scores = GridScores(ref, None)
    fine_row = scores(ref, ref)
    assert fine_row["grid_dice"] == fine_row["one_mm_on_grid_dice"] == fine_row["grid_ceiling_dice"] == 1.0
    perfect = scores(majority_on_grid(ref, thick), thick)
    assert perfect["grid_dice"] == perfect["one_mm_on_grid_dice"] == 1.0
    assert perfect["thick_input_cost"] == 0.0
    assert perfect["grid_ceiling_dice"] < 0.9
    centre = sitk.Resample(ref, thick, sitk.Transform(), sitk.sitkNearestNeighbor, 0)  # centre rows only
    point = scores(centre, thick)
    assert point["grid_dice"] < perfect["grid_dice"] and point["thick_input_cost"] > 0
    assert set(point["per_leaf"]) == {"grid", "one_mm_on_grid", "grid_ceiling"}


@pytest.mark.integration
def test_a_thick_scan_is_answered_on_its_own_grid_with_and_without_refinement(untrained_model):
    """The whole pipeline on a 1 x 1 x 5 mm scan: the intensity model (two detailed axes) and the
    calibrated temperature field meet the footprint average, with and without an uncertainty map."""
    from conftest import make_image, phantom_fn
    from msdseg.core.settings import SegmentSettings
    from msdseg.inference.pipeline import segment_image

    thick = make_image((150, 180, 30), (1.0, 1.0, 5.0), np.eye(3), fn=phantom_fn)
    for intensity in (True, False):
        base = dict(preset="fast", steps=0, model=untrained_model, intensity=intensity)
        plain = segment_image(thick, SegmentSettings(**base))
        with_unc = segment_image(thick, SegmentSettings(**base, uncertainty=True))
        assert plain.info["intensity_refined"] is intensity
        assert plain.labels.GetSize() == with_unc.uncertainty.GetSize() == thick.GetSize()
        assert np.array_equal(sitk.GetArrayFromImage(plain.labels), sitk.GetArrayFromImage(with_unc.labels))
        u = sitk.GetArrayFromImage(with_unc.uncertainty)
        assert 0.0 <= u.min() and u.max() <= 1.0


def test_a_partial_reference_scores_only_its_leaves():
    """Colin27's AAL atlas defines 12 deep grey leaves: our cortex where it says 'none of these'
    costs nothing, and only the defined leaves enter the mean."""
    from msdseg.evaluation.robustness import leaf_dice

    ref = _label_map([0, 17, 17, 17, 0, 0, 0, 0, 0, 0])
    answer = _label_map([3, 17, 17, 3, 3, 3, 3, 3, 3, 3])  # cortex everywhere else
    assert leaf_dice(answer, ref, None, [17, 53]) == {"left_hippocampus": pytest.approx(0.8)}
    assert set(leaf_dice(answer, ref)) == {"left_hippocampus", "left_cerebral_cortex"}
