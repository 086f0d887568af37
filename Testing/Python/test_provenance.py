"""Nothing lost, nothing stale: resume by what made the outputs, never replace a person's work.

Each scenario runs the real command line (in-process) on small phantoms with an untrained model.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn
from msdseg.cli.main import main

pytestmark = pytest.mark.integration


def _phantom(path, shift_mm: float):
    image = make_image((40, 48, 40), (4.0, 4.0, 4.0), np.eye(3), (shift_mm, 0.0, 0.0), phantom_fn)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _segment(model, *args) -> int:
    return main(["segment", *map(str, args), "--model", model, "--preset", "fast", "--steps", "1",
                 "--progress", "none"])


def _labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def two_subjects(tmp_path):
    """Two different heads stored under the same file name, as in two BIDS-like folders."""
    return _phantom(tmp_path / "a" / "T1w.nii.gz", 0.0), _phantom(tmp_path / "b" / "T1w.nii.gz", 14.0)


def test_same_file_name_of_another_subject_is_segmented_again(tmp_path, two_subjects, untrained_model):
    a, b = two_subjects
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert _segment(untrained_model, a, "-o", out) == 0
    assert _segment(untrained_model, b, "-o", out) == 0  # was: exit 0 in seconds, a's labels kept
    assert _segment(untrained_model, b, "-o", fresh) == 0
    assert np.array_equal(_labels(out / "T1w_labels.nii.gz"), _labels(fresh / "T1w_labels.nii.gz"))
    doc = json.loads((out / "T1w_provenance.json").read_text())
    assert doc["input"] == str(b) and len(doc["run"]["input_sha256"]) == 64


def test_identical_run_is_skipped_and_leaves_files_alone(tmp_path, two_subjects, untrained_model, capsys):
    a, _ = two_subjects
    out = tmp_path / "out"
    assert _segment(untrained_model, a, "-o", out) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _segment(untrained_model, a, "-o", out) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_a_hand_made_output_is_never_replaced_without_overwrite(tmp_path, two_subjects, untrained_model, capsys):
    a, _ = two_subjects
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "T1w_labels.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt16), str(mine))  # a person's own file
    before = mine.read_bytes()
    assert _segment(untrained_model, a, "-o", out) == 1
    err = capsys.readouterr().err
    assert "T1w_labels.nii.gz is not written by msdseg" in err and "--overwrite" in err
    assert mine.read_bytes() == before and not (out / "T1w.seg.nrrd").exists()
    assert _segment(untrained_model, a, "-o", out, "--overwrite") == 0
    backups = list(out.glob("T1w_labels.nii.gz.backup-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    assert mine.read_bytes() != before


def test_a_corrected_segmentation_survives_a_rerun_with_other_options(tmp_path, two_subjects, untrained_model, capsys):
    a, _ = two_subjects
    out = tmp_path / "out"
    assert _segment(untrained_model, a, "-o", out) == 0
    seg = out / "T1w.seg.nrrd"
    edited = seg.read_bytes() + b"\n"  # saved again after a correction in Slicer: other bytes
    seg.write_bytes(edited)
    assert _segment(untrained_model, a, "-o", out, "--uncertainty") == 1  # was: silently overwritten
    assert "T1w.seg.nrrd is changed since msdseg wrote it" in capsys.readouterr().err
    assert seg.read_bytes() == edited and not (out / "T1w_uncertainty.nii.gz").exists()


def test_no_uncertainty_map_of_an_earlier_run_stays_beside_new_labels(tmp_path, two_subjects, untrained_model):
    a, _ = two_subjects
    out = tmp_path / "out"
    assert _segment(untrained_model, a, "-o", out, "--uncertainty", "--seed", "0") == 0
    seed0 = (out / "T1w_uncertainty.nii.gz").read_bytes()
    assert _segment(untrained_model, a, "-o", out, "--overwrite", "--seed", "1") == 0
    assert not (out / "T1w_uncertainty.nii.gz").exists()  # was: the seed-0 map stayed
    assert _segment(untrained_model, a, "-o", out, "--uncertainty", "--seed", "1") == 0  # was: skipped
    fresh = tmp_path / "fresh"
    assert _segment(untrained_model, a, "-o", fresh, "--uncertainty", "--seed", "1") == 0
    assert (out / "T1w_uncertainty.nii.gz").read_bytes() != seed0
    assert np.array_equal(_labels(out / "T1w_uncertainty.nii.gz"), _labels(fresh / "T1w_uncertainty.nii.gz"))


def test_a_cohort_refuses_only_the_case_with_a_persons_file(tmp_path, two_subjects, untrained_model, capsys):
    a, b = two_subjects
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(a, inputs / "sub-a_T1w.nii.gz")
    shutil.copy(b, inputs / "sub-b_T1w.nii.gz")
    out = tmp_path / "out"
    assert _segment(untrained_model, inputs, "-o", out, "--no-report") == 0
    (out / "sub-b_T1w_volumes.csv").write_text("edited by hand\n")
    (inputs / "sub-a_T1w.nii.gz").write_bytes((inputs / "sub-b_T1w.nii.gz").read_bytes())  # a replaced
    assert _segment(untrained_model, inputs, "-o", out, "--no-report") == 1
    assert (out / "sub-b_T1w_volumes.csv").read_text() == "edited by hand\n"
    failures = (out / "cohort_failures.csv").read_text()
    assert "sub-b_T1w" in failures and "sub-a_T1w" not in failures
    doc = json.loads((out / "sub-a_T1w_provenance.json").read_text())
    assert doc["run"]["input_sha256"] == json.loads((out / "sub-b_T1w_provenance.json").read_text())["run"]["input_sha256"]
