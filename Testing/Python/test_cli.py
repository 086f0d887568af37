"""The command line: bad inputs give one line on stderr, a non-zero exit and no output files;
a good input honours the output contract on the exact input grid."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn, rotation

pytestmark = pytest.mark.integration

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msdseg", *args], capture_output=True, text=True, env=ENV, timeout=600)


def write(img: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(img, str(path))
    return path


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    good = make_image((40, 48, 40), (4.0, 4.0, 4.0), np.eye(3), fn=phantom_fn)
    arr = sitk.GetArrayFromImage(good)
    files = {}
    files["2d"] = write(sitk.GetImageFromArray(np.random.rand(64, 64).astype(np.float32)), tmp / "flat.nii.gz")
    files["4d"] = write(sitk.GetImageFromArray(np.random.rand(3, 20, 20, 20).astype(np.float32)), tmp / "series.nii.gz")
    nan = arr.copy()
    nan[5, 5, 5] = np.nan
    nan_img = sitk.GetImageFromArray(nan)
    nan_img.CopyInformation(good)
    files["nan"] = write(nan_img, tmp / "nan.nii.gz")
    (tmp / "empty.nii.gz").write_bytes(b"")
    files["empty"] = tmp / "empty.nii.gz"
    full = write(good, tmp / "full.nii.gz").read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(full[: len(full) // 3])
    files["truncated"] = tmp / "truncated.nii.gz"
    (tmp / "notes.nii.gz").write_bytes(gzip.compress(b"this is not an image at all\n" * 50))
    files["non-image"] = tmp / "notes.nii.gz"
    tiny = make_image((40, 48, 40), (0.001, 0.001, 0.001), np.eye(3), fn=phantom_fn)
    files["absurd-spacing"] = write(tiny, tmp / "tiny.nii.gz")
    const = sitk.Image(40, 40, 40, sitk.sitkFloat32)
    const.SetSpacing((4, 4, 4))
    files["constant"] = write(const, tmp / "constant.nii.gz")
    return files


@pytest.mark.parametrize("kind", ["2d", "4d", "nan", "empty", "truncated", "non-image", "absurd-spacing", "constant"])
def test_bad_input_one_line_error_and_no_outputs(tmp_path, kind, untrained_model):
    files = _bad_inputs(tmp_path)
    before = {p: p.read_bytes() for p in files.values()}
    out = tmp_path / "out"
    res = run_cli("segment", str(files[kind]), "-o", str(out), "--preset", "fast", "--progress", "none",
                  "--model", untrained_model)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and lines[0].startswith("msdseg: error:")
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    assert all(p.read_bytes() == b for p, b in before.items()), "inputs must never be modified"


@pytest.mark.slow
def test_missing_file_and_bad_option():
    res = run_cli("segment", "/nonexistent/t1.nii.gz", "-o", "/tmp/never", "--progress", "none")
    assert res.returncode != 0 and "not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("segment", "x.nii.gz", "-o", "/tmp/never", "--samples", "0")
    assert res.returncode != 0 and "samples" in res.stderr
    res = run_cli("train", "--data", "/nonexistent/manifest.json", "--out", "/tmp/never", "--ventricle-change", "2")
    assert res.returncode != 0 and "--ventricle-change" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("train", "--data", "/nonexistent/manifest.json", "--out", "/tmp/never", "--nuclei-change", "-0.1")
    assert res.returncode != 0 and "--nuclei-change" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("train", "--data", "/nonexistent/manifest.json", "--out", "/tmp/never", "--horn-scale", "1.5")
    assert res.returncode != 0 and "--horn-scale" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_segment_output_contract_on_oblique_input(tmp_path, untrained_model):
    d = rotation(0.2, -0.1, 0.3) @ np.diag([-1, 1, 1])
    img = make_image((56, 64, 44), (3.0, 2.5, 3.5), d, (4.0, -6.0, 10.0), phantom_fn)
    noise = sitk.AdditiveGaussianNoise(img * 10, standardDeviation=20.0, seed=1)  # stored as a scanner would
    src = write(sitk.Cast(noise, sitk.sitkInt16), tmp_path / "sub-01_T1w.nii.gz")
    out = tmp_path / "out"
    res = run_cli("segment", str(src), "-o", str(out), "--preset", "fast", "--uncertainty", "--progress", "json",
                  "--model", untrained_model)
    assert res.returncode == 0, res.stderr
    # progress is machine-readable JSON lines, ending at 1.0
    import json
    events = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    assert events and events[-1]["progress"] == 1.0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sub-01_T1w.seg.nrrd", "sub-01_T1w_labels.nii.gz", "sub-01_T1w_provenance.json",
                     "sub-01_T1w_uncertainty.nii.gz", "sub-01_T1w_volumes.csv"]
    labels = sitk.ReadImage(str(out / "sub-01_T1w_labels.nii.gz"))
    assert labels.GetSize() == img.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(labels.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), img.GetDirection(), atol=1e-5)
    unc = sitk.ReadImage(str(out / "sub-01_T1w_uncertainty.nii.gz"))
    assert unc.GetSize() == img.GetSize()
    # resume: a second run skips the finished case and leaves its files untouched
    mtime = (out / "sub-01_T1w_labels.nii.gz").stat().st_mtime_ns
    res2 = run_cli("segment", str(src), "-o", str(out), "--preset", "fast", "--uncertainty", "--progress", "none",
                   "--model", untrained_model)
    assert res2.returncode == 0 and (out / "sub-01_T1w_labels.nii.gz").stat().st_mtime_ns == mtime


def test_info_reports_model_and_tree():
    res = run_cli("info")
    assert res.returncode == 0 and "32 leaves" in res.stdout


@pytest.mark.unit
def test_progress_bar_renders_each_update_once(capsys):
    """A log file of a CLI run gets one bar line per progress update, not two."""
    from msdseg.core.progress import progress_printer

    update = progress_printer("bar", "demo: ")
    for i, msg in enumerate(("sample 1/2, step 1/4", "sample 1/2, step 2/4", "mapping back")):
        update(0.2 * (i + 1), msg)
    update(1.0, "done")
    err = capsys.readouterr().err
    for msg in ("sample 1/2, step 1/4", "sample 1/2, step 2/4", "mapping back"):
        assert err.count(msg) == 1, err
    assert "demo:" in err and "demo::" not in err  # tqdm adds the colon after the prefix itself
