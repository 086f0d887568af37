"""3D Slicer's Python has no matplotlib: segmentation and cohorts must work without it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn

pytestmark = pytest.mark.integration

#: Runs the CLI in a Python where ``import matplotlib`` fails, as it does in Slicer's Python.
NO_MATPLOTLIB = (
    "import sys\n"
    "sys.modules['matplotlib'] = None  # any import of it now raises ImportError\n"
    "from msdseg.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_a_cohort_completes_without_matplotlib(tmp_path, untrained_model):
    inputs = []
    for name, shift in (("a", 0.0), ("b", 6.0)):
        image = make_image((40, 48, 40), (4.0, 4.0, 4.0), np.eye(3), (shift, 0.0, 0.0), phantom_fn)
        path = tmp_path / f"{name}_T1w.nii.gz"
        sitk.WriteImage(image, str(path))
        inputs.append(str(path))
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", NO_MATPLOTLIB, "segment", *inputs, "-o", str(out), "--model", untrained_model,
         "--preset", "fast", "--steps", "0", "--progress", "none"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for stem in ("a_T1w", "b_T1w"):
        assert (out / f"{stem}_labels.nii.gz").exists() and (out / f"{stem}_volumes.csv").exists()
    assert (out / "cohort_volumes.csv").exists()
    assert not (out / "cohort_report.html").exists()
    assert "cohort_report.html not written: it needs matplotlib" in run.stderr
