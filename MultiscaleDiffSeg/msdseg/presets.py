"""The inference presets, in one table that the core, the CLI, the Slicer module and the web app read.

Kept free of torch so that front ends (the Slicer GUI process, the CLI's argument parser) can show
and validate presets without loading the network.
"""
from __future__ import annotations

#: entry spacing (mm), DDIM steps, samples, mirrored samples; optionally ``refine_mm`` (finish
#: coarse to fine at that spacing), ``refine_start`` (the schedule step the fine chains start at,
#: default the last) and ``refine_samples`` (default 1).  ``steps=0`` means one deterministic pass.
#: ``accurate`` stays at 2 mm: the shipped model's 1 mm head refines the 2 mm answer, but finishing
#: the balanced ensemble at 1 mm scored 0.802 mean Dice on the held-out T1 against 0.807 unrefined
#: (its run at step 3,691; the stage-3 candidate: 0.795 against 0.801).  8 DDIM steps were no
#: better than 4.  ``--refine 1`` tries it; give a preset ``refine_mm`` once a model's refinement
#: beats its coarse answer.  ``intensity``: sharpen the answer with the scan's own intensities at
#: its own resolution (:mod:`msdseg.intensity_refine`; skipped on scans coarser than 1.5 mm).
PRESETS: dict[str, dict[str, float | int | bool]] = {
    "fast": {"spacing_mm": 2.0, "steps": 2, "samples": 1, "mirror": False, "intensity": True},
    "balanced": {"spacing_mm": 2.0, "steps": 4, "samples": 2, "mirror": True, "intensity": True},
    "accurate": {"spacing_mm": 2.0, "steps": 4, "samples": 4, "mirror": True, "intensity": True},
}


def preset_label(name: str) -> str:
    """``'balanced (2 mm, 4 steps, 2 samples)'``, ``'accurate (2 → 1 mm, ...)'``: what a menu shows."""
    p = PRESETS[name]
    samples = int(p["samples"])
    spacing = f"{float(p['spacing_mm']):g}"
    if p.get("refine_mm"):
        spacing += f" → {float(p['refine_mm']):g}"
    return f"{name} ({spacing} mm, {int(p['steps'])} steps, {samples} sample{'s' if samples != 1 else ''})"


def add_intensity_argument(parser) -> None:
    """``--no-intensity`` on an argparse parser (``intensity``: False, or None for the preset's
    choice); the CLI and the evaluation tools share it so their runs can be compared."""
    parser.add_argument("--no-intensity", dest="intensity", action="store_const", const=False, default=None,
                        help="keep the network's interpolated answer: do not sharpen it with the scan's own "
                             "intensities (msdseg.intensity_refine)")
