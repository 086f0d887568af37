"""Hostile or mistaken inputs are refused in one line before they can exhaust memory.

The memory tests run the real command line in a child process under an address-space cap
(``ulimit -v``), where the old behaviour died with a raw allocation error.
"""
from __future__ import annotations

import resource
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn

pytestmark = pytest.mark.integration

CAP_BYTES = 8 * 2**30  # the cap the problem was found under


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


def _msdseg(*args, cap: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msdseg", *map(str, args)], capture_output=True, text=True,
                          timeout=600, preexec_fn=_capped if cap else None)


def _tiny_file_of_a_huge_volume(path, shape, zoom):
    """A valid NIfTI of zeros: a few hundred kilobytes on disk once compressed."""
    image = nib.Nifti1Image(np.zeros(shape, np.uint8), np.diag([zoom, zoom, zoom, 1.0]))
    nib.save(image, str(path))
    return path


def test_a_tiny_file_with_a_field_of_view_of_metres_is_refused(tmp_path):
    src = _tiny_file_of_a_huge_volume(tmp_path / "huge.nii.gz", (400, 400, 400), 20.0)
    assert src.stat().st_size < 1_000_000
    out = tmp_path / "out"
    run = _msdseg("segment", src, "-o", out, "--progress", "none")
    assert run.returncode == 1, run.stderr[-2000:]  # the case failed (a bad option would be 2)
    assert run.stderr.strip().splitlines() == [
        f"msdseg: error: {src}: field of view 8000 x 8000 x 8000 mm exceeds 500 mm: not a head scan "
        "(MSDSEG_MAX_FOV_MM raises the limit)"]
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_a_header_claiming_billions_of_voxels_is_refused_before_reading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((1300, 1300, 1300))
    header.set_data_dtype(np.uint8)
    header.set_zooms((0.35, 0.35, 0.35))
    header.set_qform(np.diag([0.35, 0.35, 0.35, 1.0]), code=1)
    src = tmp_path / "claims.nii"
    src.write_bytes(header.binaryblock + b"\0" * 4 + b"\1" * 1024)  # the header, and almost no data
    run = _msdseg("segment", src, "-o", tmp_path / "out", "--progress", "none")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "2,197,000,000 voxels (1300 x 1300 x 1300) exceed the limit of 134,217,728" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_the_memory_estimate_is_checked_against_the_limit(tmp_path, monkeypatch):
    src = tmp_path / "t1.nii.gz"
    sitk.WriteImage(make_image((64, 64, 64), (3.0, 3.0, 3.0), np.eye(3), fn=phantom_fn), str(src))
    monkeypatch.setenv("MSDSEG_MAX_MEMORY_GB", "1")
    run = _msdseg("segment", src, "-o", tmp_path / "out", "--progress", "none", cap=False)
    assert run.returncode == 1
    assert "needs about 1.5 GB of memory, more than the 1.0 GB available (MSDSEG_MAX_MEMORY_GB" in run.stderr


def test_a_label_map_given_as_the_t1_is_refused(tmp_path, untrained_model):
    labels = np.zeros((60, 60, 60), np.int16)
    labels[10:50, 10:50, 10:50] = 2
    labels[20:40, 20:40, 20:40] = 17
    labels[25:35, 25:35, 25:35] = 4
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((2.0, 2.0, 2.0))
    src = tmp_path / "aseg.nii.gz"
    sitk.WriteImage(image, str(src))
    run = _msdseg("segment", src, "-o", tmp_path / "out", "--model", untrained_model, "--progress", "none", cap=False)
    assert run.returncode == 1  # was: exit 0 with a plausible-looking segmentation of the labels
    assert run.stderr.strip().splitlines() == [
        f"msdseg: error: {src}: looks like a label map or mask (4 distinct integer values), not a T1-weighted image"]


def test_evaluate_refuses_a_number_outside_freesurfers_labels_without_a_huge_table(tmp_path):
    pred = np.zeros((40, 40, 40), np.int32)  # at 2 mm: an 80 mm field of view passes the input checks
    pred[10:30, 10:30, 10:30] = 17
    ref = pred.copy()
    ref[0, 0, 0] = 2_000_000_000
    paths = []
    for name, arr in (("pred", pred), ("ref", ref)):
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((2.0, 2.0, 2.0))
        paths.append(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    run = _msdseg("evaluate", *paths, "-o", tmp_path / "eval")
    assert run.returncode == 2, run.stderr[-2000:]  # was: a 7.45 GiB lookup table (MemoryError under the cap)
    assert run.stderr.strip().splitlines() == [
        "msdseg: error: reference: label 2000000000 is outside FreeSurfer's label numbers (0-14175); "
        "give --ref-labels for another numbering"]
