"""Calibrated confidence at inference: the fitted temperature of a preset applied to probabilities.

Why temperature scaling: the averaged diffusion samples are over-confident on real scans, and
``p_T = softmax(log p / T)`` corrects the stated confidence without changing any voxel's most likely
label, so labels, Dice and volumes stay the same.  The temperatures are fitted offline by
:mod:`msdseg.evaluation.calibrate` and stored in the model JSON under ``calibration``; a model
without them gets temperature 1.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch


def temper(probs: torch.Tensor, temperature: float | torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``softmax(log p / T)`` along ``dim``; T = 1 returns the probabilities unchanged.  ``temperature``
    may be a per-voxel field that broadcasts against ``probs`` (see :func:`temperature_field`)."""
    if not isinstance(temperature, torch.Tensor) and temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-8).log() / temperature, dim=dim)


#: the fitted temperature holds up to this distance from the brain (the fit and its check score
#: voxels within 3 mm of the foreground on the input grid; a 2 mm grid voxel adds up to 1.8 mm) ...
CALIBRATED_MM = 6.0
#: ... and from this distance on the network's own probabilities are stated (T = 1)
UNCALIBRATED_MM = 12.0


def temperature_field(probs: torch.Tensor, spacing_mm: float, temperature: float) -> float | torch.Tensor:
    """Per-voxel temperature (1, X, Y, Z) on a model grid: ``temperature`` near the brain, 1 far from it.

    Why: the temperature is fitted where the labels are (within 3 mm of the foreground) and corrects
    over-confidence there.  Applied to empty space it turns the network's near-certain background
    (error probability around 1e-5 on real scans) into a few per cent, because softening lifts
    all 32 other classes' tiny probabilities at once: a map that is unsure of air everywhere points
    a reader nowhere.  So the temperature fades linearly to 1 between :data:`CALIBRATED_MM` and
    :data:`UNCALIBRATED_MM` from the nearest voxel labelled brain; ``probs`` is (C, X, Y, Z), channel
    0 background.  A plain number when nothing needs fading."""
    if temperature == 1.0:
        return 1.0
    from scipy import ndimage

    brain = (probs.argmax(0) != 0).cpu().numpy()
    if not brain.any():
        return temperature
    distance = torch.from_numpy(ndimage.distance_transform_edt(~brain).astype("float32")) * float(spacing_mm)
    fade = ((UNCALIBRATED_MM - distance) / (UNCALIBRATED_MM - CALIBRATED_MM)).clamp(0.0, 1.0)
    return (1.0 + (temperature - 1.0) * fade)[None].to(probs.device)


def error_probability(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """1 - the largest class probability: how likely the voxel's label is wrong (kept dim)."""
    return 1.0 - probs.max(dim=dim, keepdim=True).values


def temperature_for(config: Mapping[str, Any], preset: str) -> float:
    """The fitted temperature of ``preset`` in a model's JSON, or 1.0 when it has none."""
    cal = config.get("calibration") or {}
    entry = (cal.get("presets") or {}).get(preset)
    return float(entry["temperature"]) if entry else 1.0
