"""``msdseg demo``: the whole job on the sample T1 that ships with the package, plus an overlay PNG.

The sample (the MNI152 template at 1 mm, ``msdseg/resources/samples``) is copied into the output
folder as ``mni152_t1.nii.gz``, so the run is exactly ``msdseg segment`` on a file.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from msdseg.core.progress import PROGRESS_MODES
from msdseg.core.settings import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="msdseg_demo")
    p.add_argument("--preset", default="fast", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="bar", choices=list(PROGRESS_MODES))


def run(args: argparse.Namespace) -> int:
    return run_demo(Path(args.output), preset=args.preset, device=args.device, progress_mode=args.progress)


def copy_sample(outdir: Path) -> Path:
    """The shipped sample T1, copied into ``outdir`` (once); its path there."""
    from msdseg.resources import SAMPLE_T1, sample_t1_path

    path = outdir / SAMPLE_T1
    if not path.exists():
        shutil.copyfile(sample_t1_path(), path)
    return path


def run_demo(outdir: Path, preset: str = "fast", device: str = "auto", progress_mode: str = "bar") -> int:
    from msdseg.core.io import load_volume
    from msdseg.core.progress import progress_printer
    from msdseg.core.settings import SegmentSettings
    from msdseg.inference.pipeline import segment_image
    from msdseg.outputs.overlay import save_overlay_png
    from msdseg.outputs.writers import write_case_outputs

    outdir.mkdir(parents=True, exist_ok=True)
    t1 = copy_sample(outdir)
    image = load_volume(t1)
    settings = SegmentSettings(preset=preset, device=device, uncertainty=True)
    result = segment_image(image, settings, progress=progress_printer(progress_mode, "demo: "))
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
