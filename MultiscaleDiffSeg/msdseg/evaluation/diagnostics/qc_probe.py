"""Measure where the cohort QC's uncertainty thresholds should sit for a model.

Why: the QC rule (``msdseg.batch.qc.QCRules``) flags a case whose mean brain uncertainty, or one
structure's, is high.  What "high" means depends on the model: a better or differently calibrated
model is less uncertain on good scans.  This probe segments good T1 scans (the held-out fsaverage
T1, the IBSR T1, the embedded MNI152 sample) and degraded copies of the fsaverage T1 (heavy noise,
4 mm blur, inverted contrast) with the default settings and prints, for each, the mean
uncertainty over all labelled voxels and the largest per-structure mean.  The thresholds belong
between the good scans and the ones that should be reviewed; re-run it whenever the model changes.

Usage: ``python -m msdseg.evaluation.diagnostics.qc_probe --data DATA/manifest.json [--model M] [--preset balanced]
[-o probe.json]``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk


def _with_array(image: sitk.Image, arr: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(image)
    return out


def _noisy(image: sitk.Image, fraction: float = 0.3, seed: int = 0) -> sitk.Image:
    """Gaussian noise with a standard deviation of ``fraction`` of the 99th intensity percentile."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    scale = float(np.percentile(arr, 99)) * fraction
    return _with_array(image, arr + np.random.default_rng(seed).normal(0.0, scale, arr.shape))


def _blurred(image: sitk.Image, sigma_mm: float = 4.0) -> sitk.Image:
    return sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma_mm)


def _inverted(image: sitk.Image) -> sitk.Image:
    """Bright becomes dark inside the head (a crude T2-like contrast); air stays dark."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    top = float(np.percentile(arr, 99.5))
    head = arr > 0.05 * top
    return _with_array(image, np.where(head, np.clip(top - arr, 0.0, None), 0.0))


VARIANTS: dict[str, Callable[[sitk.Image], sitk.Image]] = {
    "noise 30%": _noisy,
    "blur 4 mm": _blurred,
    "inverted contrast": _inverted,
}


def probe_image(image: sitk.Image, model: str | None, preset: str) -> dict[str, object]:
    """Segment ``image`` with uncertainty and summarise it as the QC rule sees it."""
    from msdseg.core.settings import SegmentSettings
    from msdseg.inference.pipeline import segment_image
    from msdseg.core.labels import load_tree
    from msdseg.core.volumes import uncertainty_by_structure

    result = segment_image(image, SegmentSettings(preset=preset, model=model, uncertainty=True,
                                                  check_brain=False))
    labels = sitk.GetArrayFromImage(result.labels)
    unc = sitk.GetArrayFromImage(result.uncertainty)
    by_leaf, brain = uncertainty_by_structure(labels, unc, load_tree())
    present = {k: v for k, v in by_leaf.items() if v is not None}
    worst = max(present, key=present.get) if present else None
    return {"brain_mean_uncertainty": brain, "max_structure": worst,
            "max_structure_uncertainty": present.get(worst) if worst else None,
            "seconds": result.info.get("seconds")}


def good_scans(manifest: Path, workdir: Path) -> dict[str, Path]:
    """The real T1 images at hand: every manifest T1 (held-out and training) and the demo sample."""
    from msdseg.resources import sample_t1_path

    data = json.loads(manifest.read_text())
    scans = {Path(m["t1"]).name.split("_t1")[0]: manifest.parent / m["t1"]
             for m in data["maps"] if m.get("t1")}
    scans["mni152 sample"] = sample_t1_path()
    return scans


def main(argv: list[str] | None = None) -> int:
    from msdseg.core.io import load_volume

    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.diagnostics.qc_probe", description=__doc__.split("\n\n")[1])
    p.add_argument("--data", type=Path, required=True, help="manifest.json of prepare-data")
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument("--preset", default="balanced")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scans = good_scans(args.data, Path(tmp))
        images = {name: load_volume(path) for name, path in scans.items()}
        for name, image in images.items():
            rows[name] = probe_image(image, args.model, args.preset)
            _print_row(name, rows[name])
        # degrade the held-out scan (any scan when a manifest has none)
        reference = images.get("fsaverage", next(iter(images.values())))
        for name, make in VARIANTS.items():
            rows[name] = probe_image(make(reference), args.model, args.preset)
            _print_row(name, rows[name])
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))
    return 0


def _print_row(name: str, row: dict[str, object]) -> None:
    print(f"{name:20s} brain {row['brain_mean_uncertainty']:.3f}  "
          f"worst structure {row['max_structure']} {row['max_structure_uncertainty']:.3f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
