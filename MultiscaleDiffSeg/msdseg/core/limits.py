"""Resource limits checked from an image's header, before any voxel is read or any grid is built.

Why: a file of a few hundred kilobytes can describe a volume of billions of voxels or a field of
view of metres; reading it, or placing the model grid on it, would then ask for tens of gigabytes
and die with a raw allocation error (or take the machine down with it).  A brain T1 has a field
of view below half a metre and rarely more than a few hundred million voxels, so anything beyond
the limits is refused with one line that names the figure and the limit.  The limits can be raised
through the environment for unusual but genuine data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from msdseg.core.errors import InputError

#: Memory a segmentation needs besides the input-sized arrays (PyTorch, the model, the model grid
#: and its ensemble), and per input voxel (the image as float32, labels, uncertainty, slabs of the
#: back-projection): estimates that match the peak measured on a 256^3 volume (docs/benchmarks.md).
FIXED_BYTES = 1_536 * 2**20
BYTES_PER_VOXEL = 40


def _physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not available (Windows): no memory limit
        return None


@dataclass(frozen=True)
class Limits:
    """What one input may ask for; ``from_environment`` reads the overrides."""

    max_voxels: int = 512**3
    max_fov_mm: float = 500.0
    max_memory_bytes: int | None = None  # None: the machine's physical memory

    @classmethod
    def from_environment(cls) -> "Limits":
        env = os.environ
        memory = env.get("MSDSEG_MAX_MEMORY_GB")
        try:
            return cls(
                max_voxels=int(float(env.get("MSDSEG_MAX_VOXELS", cls.max_voxels))),
                max_fov_mm=float(env.get("MSDSEG_MAX_FOV_MM", cls.max_fov_mm)),
                max_memory_bytes=int(float(memory) * 2**30) if memory else _physical_memory_bytes(),
            )
        except ValueError as exc:
            raise InputError(f"a MSDSEG_MAX_* environment variable is not a number ({exc})") from None


def estimated_peak_bytes(size: Sequence[int]) -> int:
    voxels = 1
    for n in size:
        voxels *= int(n)
    return FIXED_BYTES + BYTES_PER_VOXEL * voxels


def check_limits(size: Sequence[int], spacing: Sequence[float], name: str, limits: Limits | None = None) -> None:
    """Raise :class:`InputError` when an image of ``size`` voxels at ``spacing`` mm exceeds a limit."""
    limits = limits or Limits.from_environment()
    size3, spacing3 = [int(n) for n in size[:3]], [float(s) for s in spacing[:3]]
    voxels = 1
    for n in size3:
        voxels *= n
    if voxels > limits.max_voxels:
        raise InputError(f"{name}: {voxels:,} voxels ({' x '.join(map(str, size3))}) exceed the limit of "
                         f"{limits.max_voxels:,} (MSDSEG_MAX_VOXELS raises it)")
    fov = [n * s for n, s in zip(size3, spacing3)]
    if max(fov) > limits.max_fov_mm:
        raise InputError(f"{name}: field of view {' x '.join(f'{f:.0f}' for f in fov)} mm exceeds "
                         f"{limits.max_fov_mm:.0f} mm: not a head scan (MSDSEG_MAX_FOV_MM raises the limit)")
    need = estimated_peak_bytes(size3)
    if limits.max_memory_bytes is not None and need > limits.max_memory_bytes:
        raise InputError(f"{name}: segmenting it needs about {need / 2**30:.1f} GB of memory, more than the "
                         f"{limits.max_memory_bytes / 2**30:.1f} GB available (MSDSEG_MAX_MEMORY_GB sets the limit)")
