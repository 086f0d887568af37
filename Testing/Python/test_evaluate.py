"""Evaluation: Dice/HD95 per leaf and node, exclusions, L/R swaps, calibration, report files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.evaluation.metrics import (STRUCTURE_COLUMNS, evaluate, expected_calibration_error, freesurfer_cortex_map,
                             write_report)
from shared import TREE

pytestmark = pytest.mark.unit

LEFTS = [leaf for leaf in TREE.leaves if leaf.id.startswith("left_")]
MIDS = [leaf for leaf in TREE.leaves if TREE.twin(leaf.id) is None]


def phantom(spacing=(2.0, 2.0, 2.0), n=(40, 36, 44)) -> sitk.Image:
    """Symmetric box phantom with all 32 leaves: each left box mirrors its right twin across i's midplane."""
    ni, nj, nk = n
    arr = np.zeros((nk, nj, ni), np.uint16)
    for m, leaf in enumerate(LEFTS):
        right = TREE[TREE.twin(leaf.id)]
        k0, j0, i0 = 4 + (m // 4) * 9, 4 + (m % 4) * 7, ni // 2 + 2 + (m % 3) * 4
        # identity direction: +i is +x in LPS, i.e. toward patient left
        arr[k0:k0 + 7, j0:j0 + 6, i0:i0 + 5] = leaf.label
        arr[k0:k0 + 7, j0:j0 + 6, ni - i0 - 5:ni - i0] = right.label
    for m, leaf in enumerate(MIDS):
        arr[4 + m * 9:11 + m * 9, 30:34, ni // 2 - 1:ni // 2 + 1] = leaf.label
    # dense like a brain: the rest of the head block is white matter (left half 2, right half 41)
    block = np.zeros_like(arr, dtype=bool)
    block[3:nk - 3, 3:nj - 1, 3:ni - 3] = True
    left_half = np.zeros_like(block)
    left_half[:, :, ni // 2:] = True
    arr[block & (arr == 0) & left_half] = 2
    arr[block & (arr == 0) & ~left_half] = 41
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-(ni - 1) * spacing[0] / 2, -40.0, -30.0))
    return img


def like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


@pytest.fixture(scope="module")
def ref() -> sitk.Image:
    return phantom()


def test_perfect_prediction(ref: sitk.Image) -> None:
    report = evaluate(ref, ref, TREE)
    for s in report.structures:
        assert s.dice == 1.0 and s.hd95_mm == 0.0 and s.volume_diff_ml == 0.0, s.node_id
    assert len(report.structures) == len(TREE.nodes)
    assert report.summary["n_swapped_pairs"] == 0 and report.summary["n_pairs_checked"] == 14
    assert report.summary["resampled"] is False and report.notes == []
    assert report.by_id("left_hippocampus").ref_ml == pytest.approx(7 * 6 * 5 * 8 / 1000)


def test_mirrored_prediction_is_detected_as_swaps(ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(ref)
    mirrored = like(np.ascontiguousarray(arr[:, :, ::-1]), ref)  # image flipped, labels not swapped
    report = evaluate(mirrored, ref, TREE)
    assert report.summary["n_swapped_pairs"] == 14
    assert "left_hemisphere/right_hemisphere" in report.summary["swapped_pairs"]
    assert report.by_id("left_caudate").dice == 0.0
    assert report.by_id("brainstem").dice == 1.0  # midline is unaffected by a mirror
    # a correct L/R relabelling of the mirror image is perfect again: swaps, not shape errors
    relabel = np.zeros(int(TREE.channel_to_aseg.max()) + 1, np.uint16)
    relabel[TREE.channel_to_aseg] = TREE.channel_to_aseg[TREE.flip_permutation]
    fixed = evaluate(like(relabel[arr[:, :, ::-1]], ref), ref, TREE)
    assert fixed.summary["n_swapped_pairs"] == 0 and fixed.summary["dice_mean_leaves"] == 1.0


def test_single_swapped_pair(ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(ref).copy()
    left, right = arr == 11, arr == 50
    arr[left], arr[right] = 50, 11
    report = evaluate(like(arr, ref), ref, TREE)
    assert report.summary["n_swapped_pairs"] == 1
    assert report.summary["swapped_pairs"] == ["left_caudate/right_caudate"]
    # the caudates swapped sides but stayed inside the subcortical node of the *other* hemisphere
    assert report.by_id("left_caudate").dice == 0.0
    assert report.by_id("left_subcortical").dice < 1.0


def test_hd95_uses_anisotropic_spacing() -> None:
    ref = phantom(spacing=(1.0, 1.5, 3.0))
    arr = sitk.GetArrayFromImage(ref)
    shifted_k = like(np.roll(arr, 1, axis=0), ref)  # one voxel along k (3 mm)
    shifted_i = like(np.roll(arr, 1, axis=2), ref)  # one voxel along i (1 mm)
    assert evaluate(shifted_k, ref, TREE).by_id("left_thalamus").hd95_mm == pytest.approx(3.0)
    assert evaluate(shifted_i, ref, TREE).by_id("left_thalamus").hd95_mm == pytest.approx(1.0)


def test_missing_structures_are_nan_not_zero(ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(ref)
    ref_missing = like(np.where(arr == 17, 0, arr).astype(np.uint16), ref)  # no left hippocampus in ref
    report = evaluate(ref, ref_missing, TREE)
    row = report.by_id("left_hippocampus")
    assert math.isnan(row.dice) and math.isnan(row.hd95_mm) and math.isnan(row.volume_diff_pct)
    assert report.summary["excluded_leaves"] == ["left_hippocampus"]
    assert report.summary["dice_mean_leaves"] == 1.0  # excluded, not averaged in as 0
    pred_missing = like(np.where(arr == 18, 0, arr).astype(np.uint16), ref)  # prediction lost amygdala
    report = evaluate(pred_missing, ref, TREE)
    row = report.by_id("left_amygdala")
    assert row.dice == 0.0 and row.pred_empty and math.isnan(row.hd95_mm)
    assert row.volume_diff_pct == -100.0
    assert report.summary["n_leaves_missing_in_pred"] == 1


def test_foreign_reference_numbering(ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(ref)
    # a foreign scheme that labels only the hippocampi and amygdalae (as 1, 2, 3, 4)
    foreign_map = {1: 17, 2: 53, 3: 18, 4: 54}
    foreign = np.zeros_like(arr)
    for src, dst in foreign_map.items():
        foreign[arr == dst] = src
    report = evaluate(ref, like(foreign, ref), TREE, ref_label_map=foreign_map)
    for leaf_id in ("left_hippocampus", "right_hippocampus", "left_amygdala", "right_amygdala"):
        assert report.by_id(leaf_id).dice == 1.0
    assert math.isnan(report.by_id("left_caudate").dice)
    assert math.isnan(report.by_id("left_subcortical").dice)  # not all of its leaves are defined
    assert report.summary["n_leaves_evaluated"] == 4
    assert report.summary["n_pairs_checked"] == 2
    assert any("mapped" in n for n in report.notes)


def test_aparc_aseg_map() -> None:
    assert freesurfer_cortex_map([0, 2, 1035, 2001, 17]) == {2: 2, 1035: 3, 2001: 42, 17: 17}


def test_prediction_on_another_grid_is_resampled(ref: sitk.Image, tmp_path: Path) -> None:
    fine = sitk.Resample(ref, [2 * s for s in ref.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         [o - 0.5 for o in ref.GetOrigin()], [s / 2 for s in ref.GetSpacing()],
                         ref.GetDirection(), 0, ref.GetPixelID())
    sitk.WriteImage(fine, str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    report = evaluate(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", TREE)  # paths work too
    assert report.summary["resampled"] is True
    assert any("nearest neighbour" in n for n in report.notes)
    assert report.summary["dice_mean_leaves"] > 0.99


def _brain(ref: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(ref) > 0


def _corrupt(arr: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Predict background on ``wrong`` voxels (an error that adds no false positive elsewhere)."""
    out = arr.copy()
    out[wrong] = 0
    return out


def test_ece_near_zero_when_calibrated(ref: sitk.Image) -> None:
    rng = np.random.default_rng(0)
    arr = sitk.GetArrayFromImage(ref)
    brain = _brain(ref)
    # each leaf gets its own uncertainty level (plus noise); errors happen with exactly that probability
    level = np.zeros(int(arr.max()) + 1)
    level[TREE.channel_to_aseg[1:]] = rng.permutation(np.linspace(0.02, 0.6, len(TREE.leaves)))
    unc = (level[arr] + rng.uniform(-0.02, 0.02, arr.shape) * brain).astype(np.float32)
    wrong = brain & (rng.random(arr.shape) < unc)  # P(error) == uncertainty: calibrated
    pred = like(_corrupt(arr, wrong), ref)
    report = evaluate(pred, ref, TREE, uncertainty=like(unc, ref))
    cal = report.calibration["uncertainty"]
    assert cal["ece"] < 0.03
    assert cal["n_bins"] == 15 and 0 < cal["n_voxels"] < arr.size  # brain mask, not the whole grid
    assert cal["spearman_uncertainty_vs_error_voxels"] > 0.2
    assert cal["spearman_mean_uncertainty_vs_dice"] < -0.9  # uncertain structures have lower Dice
    assert cal["n_structures_for_correlation"] == 32
    assert report.summary["ece"] == cal["ece"]


def test_ece_large_when_overconfident_and_wrong(ref: sitk.Image) -> None:
    rng = np.random.default_rng(1)
    arr = sitk.GetArrayFromImage(ref)
    brain = _brain(ref)
    wrong = brain & (rng.random(arr.shape) < 0.7)  # 70 % of the brain wrong at 99 % confidence
    unc = np.full(arr.shape, 0.01, np.float32)
    report = evaluate(like(_corrupt(arr, wrong), ref), ref, TREE, uncertainty=like(unc, ref))
    # the 3 mm shell of correct background around the brain dilutes the error rate (0.7 -> ~0.52)
    assert report.calibration["uncertainty"]["ece"] > 0.4


def test_probabilities_give_max_probability_ece(ref: sitk.Image) -> None:
    arr = sitk.GetArrayFromImage(ref)
    n = TREE.n_classes
    probs = np.full((n,) + arr.shape, 0.2 / (n - 1), np.float32)
    channels = np.asarray(TREE.aseg_lookup(int(arr.max())))[arr]
    np.put_along_axis(probs, channels[None].astype(np.int64), 0.8, axis=0)
    report = evaluate(ref, ref, TREE, probabilities=probs)
    cal = report.calibration["max_probability"]
    assert cal["accuracy"] == 1.0
    assert cal["ece"] == pytest.approx(0.2, abs=1e-6)  # confidence 0.8, always right: underconfident
    assert math.isnan(cal["spearman_uncertainty_vs_error_voxels"])  # no errors: undefined, not 0


def test_ece_function_matches_hand_computation() -> None:
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, True, True, False])
    out = expected_calibration_error(conf, correct, n_bins=10)
    assert out["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)


def test_write_report(ref: sitk.Image, tmp_path: Path) -> None:
    arr = sitk.GetArrayFromImage(ref)
    unc = like(np.random.default_rng(2).random(arr.shape).astype(np.float32), ref)
    report = evaluate(like(np.ascontiguousarray(arr[:, :, ::-1]), ref), ref, TREE, uncertainty=unc)
    paths = write_report(report, tmp_path, "S", TREE, image=sitk.Cast(ref, sitk.sitkFloat32), title="TEST")
    assert set(paths) == {"csv", "json", "overlay", "dice", "reliability"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    header, *rows = paths["csv"].read_text().splitlines()
    assert header == ",".join(STRUCTURE_COLUMNS) and len(rows) == len(TREE.nodes)
    doc = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert doc["summary"]["n_swapped_pairs"] == 14
    assert doc["calibration"]["uncertainty"]["n_bins"] == 15
    assert paths["overlay"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
