"""The QC probe's degraded copies: each keeps geometry, degrades the way its name says, and the
probe summarises a segmentation as the QC rule reads it."""
import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.evaluation.diagnostics.qc_probe import VARIANTS, good_scans

pytestmark = pytest.mark.unit


def _head() -> sitk.Image:
    shape = (30, 36, 28)
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    arr = 100.0 * ((x / 11) ** 2 + (y / 14) ** 2 + (z / 12) ** 2 < 1) + 50.0 * ((x / 5) ** 2 + (y / 6) ** 2 + (z / 5) ** 2 < 1)
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((1.5, 1.5, 1.5))
    img.SetOrigin((3.0, -4.0, 7.0))
    return img


def test_variants_keep_geometry_and_degrade_as_named():
    head = _head()
    ref = sitk.GetArrayFromImage(head)
    out = {name: make(head) for name, make in VARIANTS.items()}
    for name, img in out.items():
        assert img.GetSize() == head.GetSize() and img.GetOrigin() == head.GetOrigin(), name
        assert img.GetSpacing() == head.GetSpacing(), name
    noisy = sitk.GetArrayFromImage(out["noise 30%"])
    assert 0.2 * 150 < np.std(noisy - ref) < 0.4 * 150  # 30 % of the 99th percentile (150)
    blurred = sitk.GetArrayFromImage(out["blur 4 mm"])
    assert np.abs(np.diff(blurred, axis=2)).max() < 0.5 * np.abs(np.diff(ref, axis=2)).max()
    inv = sitk.GetArrayFromImage(out["inverted contrast"])
    assert inv[ref == 0].max() == 0.0  # air stays dark
    assert inv[ref == 150].mean() < inv[ref == 100].mean()  # bright became dark inside the head
    assert np.array_equal(sitk.GetArrayFromImage(head), ref)  # input untouched


def test_good_scans_are_the_manifest_t1s_and_the_sample(tmp_path, monkeypatch):
    import json

    from msdseg.resources import sample_t1_path

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"maps": [
        {"path": "a/a_labels.nii.gz", "t1": None},
        {"path": "fsaverage/fsaverage_labels.nii.gz", "t1": "fsaverage/fsaverage_t1.nii.gz"},
        {"path": "deepmriprep/ibsr_labels.nii.gz", "t1": "deepmriprep/ibsr_t1.nii.gz"}]}))
    scans = good_scans(manifest, tmp_path)
    assert scans == {"fsaverage": tmp_path / "fsaverage/fsaverage_t1.nii.gz",
                     "ibsr": tmp_path / "deepmriprep/ibsr_t1.nii.gz",
                     "mni152 sample": sample_t1_path()}
