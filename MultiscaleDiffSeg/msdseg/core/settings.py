"""The settings of one segmentation run, and the presets they start from.

One typed object, :class:`SegmentSettings`, describes a run for every front end: the CLI parses
into it, the Slicer logic and the browser app build it from their widgets, cohorts pass it to
their workers, and the Slicer module turns it back into the worker's command line with
:meth:`SegmentSettings.cli_options`.  Kept free of torch so that front ends (the Slicer GUI
process, the CLI's argument parser) can show and validate settings without loading the network.
"""
from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass, fields, replace
from typing import Any

from msdseg.core.errors import InputError


@dataclass(frozen=True)
class Preset:
    """A sampling plan: where the network enters and how many passes it makes.

    ``steps=0`` means one deterministic pass.  ``refine_mm`` finishes the sampling at a finer
    spacing (coarse to fine), starting at schedule step ``refine_start`` (default: the last) with
    ``refine_samples`` chains.  ``intensity`` sharpens the answer with the scan's own intensities
    at its own resolution (:mod:`msdseg.inference.intensity`).
    """

    name: str
    spacing_mm: float
    steps: int
    samples: int
    mirror: bool
    intensity: bool
    refine_mm: float | None = None
    refine_start: int | None = None
    refine_samples: int = 1

    @property
    def mirrored(self) -> bool:
        """Whether a mirrored view really joins the ensemble (it needs a second sample and steps)."""
        return self.mirror and self.samples > 1 and self.steps > 0

    @property
    def passes(self) -> tuple[int, int]:
        """(image-encoder passes, denoiser passes) at the entry spacing: one encoder pass per view."""
        return (2 if self.mirrored else 1), max(self.steps, 1) * self.samples

    def label(self) -> str:
        """``'balanced (2 mm, 4 steps, 2 samples)'``, ``'accurate (2 → 1 mm, ...)'``: what a menu shows."""
        spacing = f"{self.spacing_mm:g}"
        if self.refine_mm:
            spacing += f" → {self.refine_mm:g}"
        plural = "s" if self.samples != 1 else ""
        return f"{self.name} ({spacing} mm, {self.steps} steps, {self.samples} sample{plural})"


#: The shipped presets.  ``accurate`` stays at 2 mm: with the shipped model, finishing at 1 mm does
#: not beat the 2 mm answer (docs/model_card.md); ``--refine 1`` tries it.
PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        Preset("fast", spacing_mm=2.0, steps=2, samples=1, mirror=False, intensity=True),
        Preset("balanced", spacing_mm=2.0, steps=4, samples=2, mirror=True, intensity=True),
        Preset("accurate", spacing_mm=2.0, steps=4, samples=4, mirror=True, intensity=True),
    )
}

#: The preset every front end starts with.
DEFAULT_PRESET = "balanced"

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def preset_label(name: str) -> str:
    """The menu text of a preset by name."""
    return PRESETS[name].label()


@dataclass
class SegmentSettings:
    """Everything a segmentation run needs besides the image.

    ``None`` in an override means "the preset's value".  Every field has a ``msdseg segment``
    option (:meth:`cli_options` / :meth:`from_cli`), so a run started from the console API, the
    Slicer module or the browser app can be repeated on the command line.
    """

    preset: str = DEFAULT_PRESET
    device: str = "auto"
    steps: int | None = None
    samples: int | None = None
    uncertainty: bool = False
    seed: int = 0
    model: str | None = None
    precision: str = "auto"
    spacing_mm: float | None = None  # override the preset's entry resolution
    check_brain: bool = True  # reject results whose brain volume is implausible
    mirror: bool | None = None  # every other sample sees the left/right-mirrored image
    refine_mm: float | None = None  # finish at this finer spacing (0 = no refinement)
    intensity: bool | None = None  # sharpen with the scan's own intensities
    output_mm: float | None = None  # answer on a grid this fine over the input's box (None: the input's grid)

    def __post_init__(self) -> None:
        # front ends hand over enums (the Slicer parameter node) or strings: store the names
        self.preset = option_name(self.preset)
        self.device = option_name(self.device)
        self.precision = option_name(self.precision)

    def validate(self) -> "SegmentSettings":
        """Raise :class:`InputError` naming the first bad option; return self."""
        self.resolved()
        return self

    def resolved(self) -> Preset:
        """The preset with this run's overrides applied: the plan the sampler follows."""
        if self.preset not in PRESETS:
            raise InputError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        if self.device not in DEVICES and not self.device.startswith(("cuda:", "mps:")):
            raise InputError(f"unknown device '{self.device}' (choose from {', '.join(DEVICES)})")
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        plan = PRESETS[self.preset]
        changes: dict[str, Any] = {}
        if self.steps is not None:
            if self.steps < 0:
                raise InputError("--steps must be 0 (one deterministic pass) or more")
            changes["steps"] = int(self.steps)
        if self.samples is not None:
            if self.samples < 1:
                raise InputError("--samples must be at least 1")
            changes["samples"] = int(self.samples)
        if self.spacing_mm is not None:
            if self.spacing_mm <= 0:
                raise InputError("--spacing must be a positive spacing in mm")
            changes["spacing_mm"] = float(self.spacing_mm)
        if self.mirror is not None:
            changes["mirror"] = bool(self.mirror)
        if self.refine_mm is not None:
            if self.refine_mm < 0:
                raise InputError("--refine must be a spacing in mm, or 0 for no refinement")
            changes["refine_mm"] = float(self.refine_mm) or None
        if self.intensity is not None:
            changes["intensity"] = bool(self.intensity)
        if self.output_mm is not None and not 0.2 <= self.output_mm <= 4.0:
            raise InputError("--output-spacing must be between 0.2 and 4 mm")
        plan = replace(plan, **changes)
        if plan.refine_mm and (plan.refine_mm >= plan.spacing_mm or plan.steps == 0):
            plan = replace(plan, refine_mm=None)  # nothing finer to go to, or a deterministic pass
        return plan

    # ------------------------------------------------------------------ command line
    def cli_options(self) -> list[str]:
        """The ``msdseg segment`` options that reproduce these settings (defaults left out)."""
        args = ["--preset", self.preset, "--device", self.device, "--seed", str(self.seed)]
        if self.steps is not None:
            args += ["--steps", str(self.steps)]
        if self.samples is not None:
            args += ["--samples", str(self.samples)]
        if self.uncertainty:
            args.append("--uncertainty")
        if self.model:
            args += ["--model", str(self.model)]
        if self.precision != "auto":
            args += ["--precision", self.precision]
        if self.spacing_mm is not None:
            args += ["--spacing", f"{self.spacing_mm:g}"]
        if not self.check_brain:
            args.append("--no-brain-check")
        if self.mirror is not None:
            args.append("--mirror" if self.mirror else "--no-mirror")
        if self.refine_mm is not None:
            args += ["--refine", f"{self.refine_mm:g}"]
        if self.intensity is not None:
            args.append("--intensity" if self.intensity else "--no-intensity")
        if self.output_mm is not None:
            args += ["--output-spacing", f"{self.output_mm:g}"]
        return args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, default_preset: str = DEFAULT_PRESET) -> None:
        """The options of every :class:`SegmentSettings` field, on an argparse parser."""
        p = parser
        p.add_argument("--preset", default=default_preset, choices=list(PRESETS),
                       help="; ".join(PRESETS[n].label() for n in PRESETS))
        p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, mps")
        p.add_argument("--steps", type=int, default=None, help="DDIM steps (0 = one deterministic pass)")
        p.add_argument("--samples", type=int, default=None, help="diffusion samples in the ensemble")
        p.add_argument("--uncertainty", action="store_true", help="also write S_uncertainty.nii.gz")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--model", default=None, help="model .safetensors (default: the shipped model)")
        p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                       help="auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32")
        p.add_argument("--spacing", dest="spacing_mm", type=float, default=None, metavar="MM",
                       help="enter the network at this spacing instead of the preset's")
        p.add_argument("--no-brain-check", dest="check_brain", action="store_false",
                       help="keep results whose brain volume is implausible for a T1 brain scan")
        p.add_argument("--mirror", dest="mirror", action="store_const", const=True, default=None,
                       help="let every other sample see the left/right-mirrored image (preset default)")
        p.add_argument("--no-mirror", dest="mirror", action="store_const", const=False,
                       help="do not mirror (on in balanced and accurate)")
        p.add_argument("--refine", dest="refine_mm", type=float, default=None, metavar="MM",
                       help="finish the sampling at this finer spacing (coarse to fine; 0 = off)")
        add_intensity_argument(p)
        p.add_argument("--output-spacing", dest="output_mm", type=float, default=None, metavar="MM",
                       help="write the labels (and uncertainty) on a grid with voxel sides of at most MM "
                            "over the input's field of view, e.g. 1 for 1 mm labels from a thick-slice scan "
                            "(default: exactly the input's grid)")

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "SegmentSettings":
        """Settings from a namespace parsed with :meth:`add_arguments`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def add_intensity_argument(parser: argparse.ArgumentParser) -> None:
    """``--intensity`` / ``--no-intensity`` (None: the preset's choice); the CLI and the
    evaluation tools share them so their runs can be compared."""
    parser.add_argument("--intensity", dest="intensity", action="store_const", const=True, default=None,
                        help="sharpen the answer with the scan's own intensities (preset default)")
    parser.add_argument("--no-intensity", dest="intensity", action="store_const", const=False,
                        help="keep the network's interpolated answer: do not sharpen it with the scan's "
                             "own intensities")


def option_name(value: Any) -> str:
    """The option name of an enum member or a string, lower case (``Preset.fast`` -> ``'fast'``)."""
    return str(value.value if isinstance(value, enum.Enum) else value).lower()
