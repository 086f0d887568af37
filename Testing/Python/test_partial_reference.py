"""Scoring against a partial reference (an atlas of a few structures, such as AAL on Colin27).

Small synthetic maps: a reference that labels the hippocampi and thalami only, and predictions
that add labels the reference does not have.  Those extra labels must not change the score, the
mean is over the defined leaves, and calibration is judged only around the defined structures.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.evaluation import cli as eval_cli
from msdseg.evaluation.metrics import evaluate, partial_label_map
from msdseg.evaluation.peer_compare import compare_maps, format_table, scored_leaves
from shared import TREE

pytestmark = pytest.mark.unit

SCORED = [17, 53, 10, 49]  # left/right hippocampus, left/right thalamus


def image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.uint16))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def reference() -> np.ndarray:
    """(k, j, i) map: four 6-voxel cubes, left structures at high i (LPS +x is patient left)."""
    arr = np.zeros((30, 30, 64), np.uint16)  # 64 mm: the CLI reads it as a head
    arr[5:11, 5:11, 25:31] = 17
    arr[5:11, 5:11, 9:15] = 53
    arr[18:24, 15:21, 25:31] = 10
    arr[18:24, 15:21, 9:15] = 49
    return arr


def with_extra_labels(arr: np.ndarray) -> np.ndarray:
    """The same map with white matter, cortex and a caudate the reference does not label."""
    out = arr.copy()
    head = np.zeros(arr.shape, bool)
    head[2:28, 2:28, 3:37] = True
    out[head & (arr == 0)] = 2
    out[2:4, 2:28, 3:37] = 3
    out[12:16, 22:26, 24:28] = 11
    return out


def test_extra_labels_do_not_lower_the_score() -> None:
    ref = image(reference())
    shifted = np.roll(reference(), 1, axis=0)  # an imperfect prediction: every structure off by 1 voxel
    plain = evaluate(image(shifted), ref, TREE, only_labels=SCORED)
    extra = evaluate(image(with_extra_labels(shifted)), ref, TREE, only_labels=SCORED)
    assert 0.7 < plain.summary["dice_mean_leaves"] < 0.9
    assert extra.summary["dice_mean_leaves"] == plain.summary["dice_mean_leaves"]
    for row, other in zip(plain.structures, extra.structures):
        assert row.dice == other.dice or (math.isnan(row.dice) and math.isnan(other.dice))
    assert extra.summary["n_leaves_evaluated"] == 4 and extra.summary["reference"] == "partial"
    assert extra.summary["scored_leaves"] == ["left_thalamus", "left_hippocampus", "right_thalamus",
                                              "right_hippocampus"]
    assert math.isnan(extra.by_id("left_caudate").dice) and math.isnan(extra.by_id("left_cerebral_white_matter").dice)


def test_mean_is_over_the_defined_leaves() -> None:
    pred = reference().copy()
    pred[pred == 53] = 0  # right hippocampus missed entirely
    report = evaluate(image(with_extra_labels(pred)), image(reference()), TREE, only_labels=SCORED)
    assert report.by_id("right_hippocampus").dice == 0.0
    assert report.summary["dice_mean_leaves"] == pytest.approx(0.75)
    assert report.summary["n_swapped_pairs"] == 0 and report.summary["n_pairs_checked"] == 2


def uncertainty(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def uncertainty(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def test_calibration_judges_only_around_the_defined_structures() -> None:
    ref_arr = reference()
    pred = with_extra_labels(ref_arr)
    sure = np.zeros(ref_arr.shape, np.float32)  # certain everywhere, right on the defined structures
    report = evaluate(image(pred), image(ref_arr), TREE, uncertainty=uncertainty(sure), only_labels=SCORED)
    cal = report.calibration["uncertainty"]
    assert cal["ece"] == pytest.approx(0.0, abs=1e-9)  # white matter, cortex, caudate are not errors
    region = sitk.BinaryDilate(sitk.Cast(image(ref_arr) > 0, sitk.sitkUInt8), [3, 3, 3], sitk.sitkBall, 0, 1)
    assert cal["n_voxels"] == int(sitk.GetArrayFromImage(region).sum())  # the dilated defined structures only
    assert "defined structures" in report.calibration["mask"]

    wrong = pred.copy()
    wrong[ref_arr == 17] = 2  # left hippocampus called white matter, with full confidence
    cal = evaluate(image(wrong), image(ref_arr), TREE, uncertainty=uncertainty(sure),
                   only_labels=SCORED).calibration["uncertainty"]
    assert cal["ece"] == pytest.approx(216 / cal["n_voxels"])  # exactly the 6^3 missed voxels are wrong


def test_a_complete_reference_is_judged_as_before() -> None:
    """Without ``only_labels`` the reference is complete: our extra labels are errors in calibration."""
    ref_arr = reference()
    report = evaluate(image(with_extra_labels(ref_arr)), image(ref_arr), TREE,
                      uncertainty=uncertainty(np.zeros(ref_arr.shape)))
    assert "reference" not in report.summary and "foreground" in report.calibration["mask"]
    assert report.calibration["uncertainty"]["ece"] > 0.5


def test_only_labels_refuses_numbers_that_are_not_leaves() -> None:
    with pytest.raises(InputError, match=r"\[9999\]"):
        partial_label_map(TREE, [17, 9999])
    with pytest.raises(InputError, match="none given"):
        partial_label_map(TREE, [])


def test_only_labels_composes_with_a_foreign_numbering() -> None:
    assert partial_label_map(TREE, [17], {37: 17, 38: 53, 71: 11}) == {37: 17}


def test_evaluate_cli_only_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sitk.WriteImage(image(with_extra_labels(reference())), str(tmp_path / "pred.nii.gz"))
    sitk.WriteImage(image(reference()), str(tmp_path / "ref.nii.gz"))
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "pred.nii.gz"), str(tmp_path / "ref.nii.gz"), "-o", str(tmp_path),
                              "--only-labels", *map(str, SCORED)])
    assert eval_cli.run(args) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["dice_mean_leaves"] == 1.0 and summary["n_leaves_evaluated"] == 4
    assert summary["reference"] == "partial"


def test_peer_table_against_a_partial_reference() -> None:
    ref = image(reference())
    ours = image(with_extra_labels(reference()))
    peer = image(np.roll(with_extra_labels(reference()), 1, axis=0))
    result = compare_maps({"ours": ours, "peer": peer}, ref, only_labels=SCORED, tree=TREE)
    assert [r.node_id for r in result.rows] == ["left_thalamus", "left_hippocampus", "right_thalamus",
                                                "right_hippocampus"]
    assert result.mean_dice["ours"] == 1.0 and 0.7 < result.mean_dice["peer"] < 0.9
    assert result.mean_agreement == pytest.approx(result.mean_dice["peer"])  # ours equals the reference here
    row = result.rows[1]
    assert row.ref_ml == pytest.approx(0.216) and row.ml["ours"] == pytest.approx(0.216)
    table = format_table(result)
    assert table.splitlines()[0] == ("| structure | ref mL | ours mL | peer mL | ours Dice | peer Dice "
                                     "| ours vs peer Dice |")
    assert "| Left hippocampus | 0.22 | 0.22 |" in table and table.splitlines()[-1].startswith("| **mean**")


def test_peer_leaves_can_exclude_a_leaf() -> None:
    assert 24 not in scored_leaves(TREE, None, exclude=[24]) and len(scored_leaves(TREE, None, [24])) == 31
    with pytest.raises(InputError):
        scored_leaves(TREE, [24], exclude=[24])
