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


def temper(probs: torch.Tensor, temperature: float, dim: int = 0) -> torch.Tensor:
    """``softmax(log p / T)`` along ``dim``; T = 1 returns the probabilities unchanged."""
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-8).log() / temperature, dim=dim)


def error_probability(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """1 - the largest class probability: how likely the voxel's label is wrong (kept dim)."""
    return 1.0 - probs.max(dim=dim, keepdim=True).values


def temperature_for(config: Mapping[str, Any], preset: str) -> float:
    """The fitted temperature of ``preset`` in a model's JSON, or 1.0 when it has none."""
    cal = config.get("calibration") or {}
    entry = (cal.get("presets") or {}).get(preset)
    return float(entry["temperature"]) if entry else 1.0
