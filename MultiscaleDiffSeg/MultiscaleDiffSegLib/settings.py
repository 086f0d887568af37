"""Run settings of the Slicer module: presets, devices, the worker command line and time estimates.

Qt-free and Slicer-free on purpose: the widget, the console API and the tests all build the same
command line from the same settings object, so what the tests check is what the module runs.
"""
from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from msdseg.core.settings import DEFAULT_PRESET, PRESETS, SegmentSettings, option_name, preset_label


class Preset(enum.Enum):
    """Speed/accuracy trade-off; the values are the core CLI's ``--preset`` names."""

    fast = "fast"
    balanced = "balanced"
    accurate = "accurate"

    def label(self) -> str:
        """Text shown in the preset combo box (Slicer's enum connector calls ``label``)."""
        return PRESET_LABELS[self.value]


class Device(enum.Enum):
    """Where the network runs; the values are the core CLI's ``--device`` names."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"

    def label(self) -> str:
        return DEVICE_LABELS[self.value]


PRESET_LABELS = {name: preset_label(name) for name in PRESETS}
DEVICE_LABELS = {
    "auto": "auto (CUDA GPU > Apple MPS > CPU)",
    "cpu": "CPU",
    "cuda": "NVIDIA GPU (CUDA)",
    "mps": "Apple GPU (MPS)",
}

#: Spin-box values that mean "use the preset's own value" (their special value text in the .ui).
STEPS_PRESET_DEFAULT = -1
SAMPLES_PRESET_DEFAULT = 0

#: File the input volume is written to; the core names its outputs after the file stem.
INPUT_FILE_NAME = "input.nrrd"


def settings_from_widgets(
    preset: Any = DEFAULT_PRESET,
    device: Any = "auto",
    steps: int | None = None,
    samples: int | None = None,
    uncertainty: bool = False,
    seed: int = 0,
    model: str | None = None,
    **more: Any,
) -> SegmentSettings:
    """The core's settings from widget values: enums or strings, and the spin boxes' "preset
    default" values (:data:`STEPS_PRESET_DEFAULT`, :data:`SAMPLES_PRESET_DEFAULT`); ``more`` takes
    any other :class:`~msdseg.core.settings.SegmentSettings` field.  Validated: a bad value raises
    :class:`ValueError` naming it."""
    return SegmentSettings(
        preset=preset,
        device=device,
        steps=None if steps is None or steps <= STEPS_PRESET_DEFAULT else int(steps),
        samples=None if samples is None or samples <= SAMPLES_PRESET_DEFAULT else int(samples),
        uncertainty=bool(uncertainty),
        seed=int(seed),
        model=str(model) if model else None,
        **more,
    ).validate()


# --------------------------------------------------------------------------- worker command
def segment_command(
    python: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    settings: SegmentSettings,
    overwrite: bool = True,
) -> list[str]:
    """``[python, -m, msdseg, segment, IN..., -o, OUT, --progress, json, ...]``.

    ``overwrite`` defaults to True for interactive runs (a temporary folder is never a resume);
    cohorts pass False so that a second run skips finished cases.
    """
    cmd = [str(python), "-m", "msdseg", "segment", *[str(p) for p in inputs], "-o", str(output_dir)]
    cmd += ["--progress", "json", *settings.cli_options()]
    if overwrite:
        cmd.append("--overwrite")
    return cmd


def worker_environment(
    module_dir: str | os.PathLike,
    base: Mapping[str, str] | None = None,
    threads: int | None = None,
) -> dict[str, str]:
    """Environment of the worker: ``module_dir`` first on PYTHONPATH, unbuffered UTF-8 output.

    Why: the core package ``msdseg`` is installed next to the module file, which the worker's
    Python (PythonSlicer) does not search by itself; unbuffered output makes progress lines arrive
    as they are printed instead of when a 4 kB buffer fills.
    """
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(module_dir) + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(int(threads)))
    return env


def output_files(output_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The core's per-case output contract (``docs/cohorts.md``, outputs): kind -> path."""
    out = Path(output_dir)
    return {
        "labels": out / f"{stem}_labels.nii.gz",
        "segmentation": out / f"{stem}.seg.nrrd",
        "volumes": out / f"{stem}_volumes.csv",
        "uncertainty": out / f"{stem}_uncertainty.nii.gz",
    }


def python_executable() -> str:
    """The Python to run the worker with: Slicer's ``PythonSlicer`` launcher, else this Python.

    Why PythonSlicer: inside Slicer ``sys.executable`` is the application itself, not a Python
    interpreter; the launcher sets up the library paths of Slicer's Python.
    """
    import shutil

    found = shutil.which("PythonSlicer")
    return found or sys.executable


# --------------------------------------------------------------------------- device and time
#: Keys of the device probe's JSON line (see :data:`DEVICE_PROBE_CODE`).
DEVICE_PROBE_CODE = (
    "import json, torch\n"
    "cuda = bool(torch.cuda.is_available())\n"
    "mps_backend = getattr(torch.backends, 'mps', None)\n"
    "mps = bool(mps_backend is not None and mps_backend.is_available())\n"
    "print(json.dumps({'torch': torch.__version__, 'cuda': cuda,"
    " 'cuda_name': torch.cuda.get_device_name(0) if cuda else '', 'mps': mps}), flush=True)\n"
)


@dataclass(frozen=True)
class DeviceChoice:
    """The device a run will use and a sentence for the UI."""

    device: str
    text: str
    usable: bool = True


def resolve_device(requested: str, probe: Mapping[str, Any] | None) -> DeviceChoice:
    """Predict the device the core will pick (same rule as ``msdseg.model.devices.resolve_device``).

    ``probe`` is the JSON printed by :data:`DEVICE_PROBE_CODE` in the worker's Python, or None
    while it is unknown.  Probing in the worker keeps torch (and its GPU libraries) out of Slicer's
    own process.
    """
    requested = option_name(requested)
    if probe is None:
        return DeviceChoice(requested if requested != "auto" else "unknown", "detecting the device...", True)
    cuda, mps = bool(probe.get("cuda")), bool(probe.get("mps"))
    name = str(probe.get("cuda_name") or "").strip()
    if requested == "auto":
        if cuda:
            return DeviceChoice("cuda", f"NVIDIA GPU{f' ({name})' if name else ''} via CUDA")
        if mps:
            return DeviceChoice("mps", "Apple GPU via MPS")
        return DeviceChoice("cpu", "CPU (no CUDA or MPS GPU found)")
    if requested == "cuda" and not cuda:
        return DeviceChoice("cuda", "CUDA was requested but no CUDA GPU is available: choose auto or CPU", False)
    if requested == "mps" and not mps:
        return DeviceChoice("mps", "MPS was requested but Apple MPS is not available: choose auto or CPU", False)
    labels = {"cpu": "CPU", "cuda": f"NVIDIA GPU{f' ({name})' if name else ''} via CUDA", "mps": "Apple GPU via MPS"}
    return DeviceChoice(requested, labels[requested])


#: Rough wall-clock seconds for a 1 mm whole-head T1 (about 200 x 230 x 190 voxels), including
#: the worker's start-up (Python, torch, model: :data:`STARTUP_SECONDS`).  These are rough
#: estimates, only good enough for the UI to say "seconds" versus "minutes": the CPU rows are
#: rounded from ``msdseg segment`` runs on the MNI152 1 mm T1 on one development machine
#: ("accurate" scaled from a run of it beside "balanced"), and the GPU rows are assumptions, not
#: measurements.  The measured times, with the commands that made them: docs/benchmarks.md.
TIME_TABLE_SECONDS: dict[str, dict[str, float]] = {
    "cpu": {"fast": 30.0, "balanced": 55.0, "accurate": 85.0},
    "mps": {"fast": 20.0, "balanced": 35.0, "accurate": 50.0},
    "cuda": {"fast": 15.0, "balanced": 20.0, "accurate": 25.0},
}
#: Network passes of each preset (steps x samples), to scale the table for custom steps/samples.
PRESET_STEPS = {name: p.steps for name, p in PRESETS.items()}
PRESET_SAMPLES = {name: p.samples for name, p in PRESETS.items()}
PRESET_PASSES = {name: max(1, PRESET_STEPS[name]) * PRESET_SAMPLES[name] for name in PRESETS}
STARTUP_SECONDS = 18.0
REFERENCE_VOXELS = 200 * 230 * 190


def estimate_seconds(settings: SegmentSettings, device: str, n_voxels: int | None = None) -> float | None:
    """A rough time for one volume, or None when the device is not known yet.

    Scales the table by the number of network passes when steps/samples are overridden; the
    voxel count matters only weakly (the network runs on a fixed-resolution head grid), so it is
    used only to stretch the mapping back to the input grid for unusually large inputs.
    """
    if device not in TIME_TABLE_SECONDS:
        return None
    base = TIME_TABLE_SECONDS[device][settings.preset]
    steps = settings.steps
    samples = settings.samples
    if steps is not None or samples is not None:
        passes = max(1, steps if steps is not None else PRESET_STEPS[settings.preset])
        passes *= samples or PRESET_SAMPLES[settings.preset]
        compute = max(base - STARTUP_SECONDS, 1.0)
        base = STARTUP_SECONDS + compute * passes / PRESET_PASSES[settings.preset]
    if n_voxels and n_voxels > 2 * REFERENCE_VOXELS:
        base += 5.0 * (n_voxels / REFERENCE_VOXELS - 2.0)
    return base


def format_duration(seconds: float | None) -> str:
    """'about 40 s' / 'about 3 min' / 'unknown' for the UI."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"about {max(5, int(round(seconds / 5.0)) * 5)} s"
    if seconds < 3600:
        return f"about {int(round(seconds / 60.0))} min"
    return f"about {seconds / 3600.0:.1f} h"


def estimate_text(settings: SegmentSettings, choice: DeviceChoice, n_voxels: int | None = None) -> str:
    """One line for the UI: device and time, saying that the time is an estimate."""
    if not choice.usable:
        return f"Device: {choice.text}"
    seconds = estimate_seconds(settings, choice.device, n_voxels)
    if seconds is None:
        return f"Device: {choice.text}"
    return f"Device: {choice.text}. Estimated time: {format_duration(seconds)} (rough estimate)."
