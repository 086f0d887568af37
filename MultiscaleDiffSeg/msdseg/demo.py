"""``msdseg demo``: the whole job on a T1 that ships inside a PyPI package, plus an overlay PNG.

The sample is nilearn's MNI152 (ICBM 2009) T1 template at 1 mm, read from nilearn's own package
data (no download).  It is written to the output folder as ``mni152_t1.nii.gz`` so the run is the
same as ``msdseg segment`` on a file.
"""
from __future__ import annotations

import sys
from pathlib import Path


def sample_t1_path(outdir: Path) -> Path:
    """Write the embedded sample T1 into ``outdir`` (once) and return its path."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    path = outdir / "mni152_t1.nii.gz"
    if not path.exists():
        img = load_mni152_template(resolution=1)
        nib.save(nib.Nifti1Image(img.get_fdata().astype("float32"), img.affine), str(path))
    return path


def run_demo(outdir: Path, preset: str = "fast", device: str = "auto", progress_mode: str = "bar") -> int:
    from .cli import _progress_printer
    from .inference import SegmentSettings, segment_image
    from .io import load_volume
    from .outputs import write_case_outputs
    from .overlay import save_overlay_png

    outdir.mkdir(parents=True, exist_ok=True)
    t1 = sample_t1_path(outdir)
    image = load_volume(t1)
    settings = SegmentSettings(preset=preset, device=device, uncertainty=True)
    result = segment_image(image, settings, progress=_progress_printer(progress_mode, "demo: "))
    paths = write_case_outputs(result, outdir, "mni152_t1")
    title = f"msdseg {preset} preset, {result.info['device']}, {result.info['seconds']:.0f} s"
    if not result.info.get("trained", True):
        title = "UNTRAINED MODEL (random weights: labels are meaningless) - " + title
        print("WARNING: no trained model was found; this demo runs an UNTRAINED network.", file=sys.stderr)
    png = outdir / "mni152_t1_overlay.png"
    save_overlay_png(image, result.labels, png, result.tree, uncertainty=result.uncertainty, title=title)
    brain = result.volumes.get(result.tree.root.id, 0.0)
    print(f"segmented {t1.name} in {result.info['seconds']:.1f} s on {result.info['device']} "
          f"(brain {brain:.0f} mL)")
    for key, p in {**paths, "overlay": png}.items():
        print(f"  {key}: {p}")
    return 0
