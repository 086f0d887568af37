"""label_confusion: a boundary moved by one layer shows up as the exact voxels one label took from
the other, in mL on the reference grid, on screen and as a CSV matrix; grids must match."""
import csv

import nibabel as nib
import numpy as np
import pytest

from msdseg.evaluation.diagnostics.label_confusion import confusion_ml, label_rows, main

pytestmark = pytest.mark.unit


def _maps():
    ref = np.zeros((20, 20, 20), np.int16)
    ref[2:18, 2:18, 2:18] = 3  # cortex shell ...
    ref[5:15, 5:15, 5:15] = 2  # ... around white matter (1000 voxels)
    pred = ref.copy()
    pred[4:16, 4:16, 4:16] = 2  # white matter one layer further out: 728 cortex voxels taken
    pred[0, 0, 0] = 4  # one background voxel called ventricle
    return pred, ref


def test_matrix_and_rows_name_who_took_what():
    pred, ref = _maps()
    labels, m = confusion_ml(pred, ref, voxel_ml=0.008)  # 2 mm voxels
    assert labels == [0, 2, 3, 4]
    assert np.isclose(m.sum(), 20**3 * 0.008)
    rows = {r["label"]: r for r in label_rows(labels, m)}
    assert np.isclose(rows[2]["extra_ml"], 728 * 0.008) and rows[2]["extra_from"] == {3: rows[2]["extra_ml"]}
    assert np.isclose(rows[3]["missing_ml"], 728 * 0.008) and list(rows[3]["missing_to"]) == [2]
    assert rows[4]["true_ml"] == 0.0 and list(rows[4]["extra_from"]) == [0]
    assert rows[0]["missing_to"] == {4: 0.008} and rows[2]["missing_ml"] == 0.0


def test_command_prints_writes_csv_and_refuses_different_grids(tmp_path, capsys):
    pred, ref = _maps()
    for name, arr in (("p", pred), ("r", ref), ("small", ref[:10])):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    assert main([str(tmp_path / "p.nii.gz"), str(tmp_path / "r.nii.gz"), "--labels", "2", "--csv", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("label") == 1 and "extra 0.73 mL (reference said 3: 0.73)" in out
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert rows[0][1:] == ["0", "2", "3", "4"] and float(rows[2][3]) == 0.728
    assert main([str(tmp_path / "p.nii.gz"), str(tmp_path / "small.nii.gz")]) == 2
    assert "one grid" in capsys.readouterr().out
