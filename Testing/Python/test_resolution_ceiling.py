"""The resolution ceiling: a structure aligned with the coarse grid survives the trip exactly, a
one-voxel sheet does not, and only 1 mm maps are accepted."""
import nibabel as nib
import numpy as np
import pytest

from msdseg.core.errors import InputError
from msdseg.evaluation.diagnostics.resolution_ceiling import ceiling_dice, ceiling_for_file

pytestmark = pytest.mark.unit


def test_a_block_on_the_coarse_grid_is_kept_and_a_thin_sheet_is_lost():
    ch = np.zeros((16, 16, 16), np.int64)
    ch[4:12, 4:12, 4:12] = 1  # whole 2 mm (and 4 mm) cells
    ch[2, 2:14, 2:14] = 2  # one voxel thick: a fraction 1/2 in its 2 mm cells at best
    dice = ceiling_dice(ch, 3, 2)
    assert dice[1] == pytest.approx(1.0, abs=0.05)
    assert dice[2] < 0.8
    assert ceiling_dice(ch, 3, 1) == {1: 1.0, 2: 1.0}


def test_the_command_wants_1mm_aseg_maps(tmp_path):
    lab = np.zeros((20, 20, 20), np.int16)
    lab[4:16, 4:16, 4:16] = 17  # left hippocampus
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "a.nii.gz"))
    res = ceiling_for_file(str(tmp_path / "a.nii.gz"), [2.0])
    assert list(res[2.0]) == ["left_hippocampus"] and res[2.0]["left_hippocampus"] > 0.9
    nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "b.nii.gz"))
    with pytest.raises(InputError, match="1 mm"):
        ceiling_for_file(str(tmp_path / "b.nii.gz"), [2.0])
    with pytest.raises(InputError, match="whole millimetres"):
        ceiling_for_file(str(tmp_path / "a.nii.gz"), [1.5])
