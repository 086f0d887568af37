"""missed_parts: a reference structure in two pieces, one found and one labelled as a neighbour,
is reported piece by piece with what the prediction called the missed one; grids must match."""
import json

import nibabel as nib
import numpy as np
import pytest

from msdseg.evaluation.diagnostics.missed_parts import main, missed_parts

pytestmark = pytest.mark.unit


def _maps():
    ref = np.zeros((30, 30, 30), np.int16)
    ref[2:8, 2:8, 2:8] = 5  # 216 voxels, found
    ref[20:25, 20:25, 20:25] = 5  # 125 voxels, called lateral ventricle
    ref[12, 12, 12] = 5  # a speck below --min-voxels
    pred = np.zeros_like(ref)
    pred[2:8, 2:8, 2:8] = 5
    pred[20:25, 20:25, 20:25] = 4
    return pred, ref


def test_each_part_is_scored_and_the_substitute_named():
    pred, ref = _maps()
    parts = missed_parts(pred, ref, np.eye(4), 5, min_voxels=50)
    assert [p["voxels"] for p in parts] == [216, 125]
    assert parts[0]["found"] == 1.0 and parts[1]["found"] == 0.0 and parts[1]["predicted"] == {4: 125}
    assert parts[1]["centroid_ras"] == [22.0, 22.0, 22.0]


def test_command_reads_files_and_refuses_different_grids(tmp_path, capsys):
    pred, ref = _maps()
    nib.save(nib.Nifti1Image(pred, np.eye(4)), str(tmp_path / "p.nii.gz"))
    nib.save(nib.Nifti1Image(ref, np.eye(4)), str(tmp_path / "r.nii.gz"))
    assert main([str(tmp_path / "p.nii.gz"), str(tmp_path / "r.nii.gz"), "--labels", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["found"] for p in out["5"]] == [1.0, 0.0]
    nib.save(nib.Nifti1Image(ref[:20], np.eye(4)), str(tmp_path / "small.nii.gz"))
    assert main([str(tmp_path / "p.nii.gz"), str(tmp_path / "small.nii.gz"), "--labels", "5"]) == 2
    assert "one grid" in capsys.readouterr().out
