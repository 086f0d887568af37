"""Voxels for the temperature fit, taken on the grid the user's uncertainty map lives on.

Why: the uncertainty map a user gets is not the model-grid error probability.  It is that
probability interpolated trilinearly onto the input grid (:mod:`msdseg.inference.backproject`), scored
against labels that are the argmax of the interpolated mean.  Fitting the temperature on the
(2 mm) model grid against a nearest-neighbour reference measures something else: at 2 mm every
boundary voxel is a partial-volume coin flip, so the fit asks for more softening than the 1 mm
map needs (the two fits compared: docs/research/field_notes.md).

So each voxel of the fit is an input-grid voxel, stored as the model-grid probabilities at its 8
trilinear corners plus their weights.  For a temperature ``T`` its stated confidence is
``sum_k w_k max softmax(log p_k / T)``, exactly what the map reports, and whether its label is
right does not depend on ``T`` (labels come from the untempered mean).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: input-grid voxels kept per case (a random subsample of the evaluated region)
VOXELS_PER_CASE = 100_000

_OFFSETS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.int64)  # (8, 3)


@dataclass
class InputGridVoxels:
    """Input-grid voxels of one or more cases, ready for any temperature."""

    log_corners: torch.Tensor  # (N, 8, C) log-probabilities at the 8 model-grid corners
    weights: torch.Tensor  # (N, 8) trilinear weights (rows sum to 1)
    correct: np.ndarray  # (N,) bool: the label (interpolated mean's or refined posterior's argmax) is the reference
    predicted: np.ndarray  # (N,) int: that argmax (the label the user sees)

    def __len__(self) -> int:
        return int(self.correct.size)

    def confidence(self, temperature: float, chunk: int = 20_000) -> np.ndarray:
        """What the uncertainty map says, as confidence (1 - uncertainty), at ``temperature``."""
        out = []
        for s in range(0, len(self), chunk):
            peak = torch.softmax(self.log_corners[s:s + chunk] / temperature, dim=2).amax(2)
            out.append((peak * self.weights[s:s + chunk]).sum(1))
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    def subset(self, keep: np.ndarray) -> "InputGridVoxels":
        t = torch.from_numpy(np.asarray(keep, dtype=bool))
        return InputGridVoxels(self.log_corners[t], self.weights[t], self.correct[keep], self.predicted[keep])

    @staticmethod
    def concat(parts: Sequence["InputGridVoxels"]) -> "InputGridVoxels":
        return InputGridVoxels(torch.cat([p.log_corners for p in parts]), torch.cat([p.weights for p in parts]),
                               np.concatenate([p.correct for p in parts]), np.concatenate([p.predicted for p in parts]))


def gather(probs: torch.Tensor, points: np.ndarray, ref: np.ndarray) -> InputGridVoxels:
    """Corner probabilities and weights of ``points`` (N, 3 continuous model-grid indices, all
    inside the grid) in ``probs`` (C, X, Y, Z), and whether each point's label matches ``ref`` (N,)."""
    shape = np.array(probs.shape[1:])
    base = np.clip(np.floor(points).astype(np.int64), 0, shape - 2)
    frac = np.clip(points - base, 0.0, 1.0)
    idx = base[:, None, :] + _OFFSETS[None]  # (N, 8, 3)
    w = np.prod(np.where(_OFFSETS[None] == 1, frac[:, None, :], 1.0 - frac[:, None, :]), axis=2)  # (N, 8)
    p = probs.float()[:, idx[..., 0], idx[..., 1], idx[..., 2]].permute(1, 2, 0)  # (N, 8, C)
    weights = torch.from_numpy(w.astype(np.float32))
    predicted = (p * weights[..., None]).sum(1).argmax(1).numpy()
    return InputGridVoxels(p.clamp_min(1e-8).log(), weights, predicted == np.asarray(ref), predicted)


def interpolated(voxels: InputGridVoxels) -> torch.Tensor:
    """(N, C) probabilities of the voxels: their corners blended by the trilinear weights."""
    return (voxels.log_corners.exp() * voxels.weights[..., None]).sum(1)


def gather_refined(probs: torch.Tensor, points: np.ndarray, ref: np.ndarray, values: np.ndarray,
                   intensity) -> InputGridVoxels:
    """:func:`gather` for labels sharpened by an :class:`~msdseg.inference.intensity.IntensityModel`
    at the voxels' intensities ``values`` (N,): what the map states is then the refined posterior
    at the voxel itself, stored as a single corner of weight 1, and its argmax is the label."""
    p = interpolated(gather(probs, points, ref))
    q = intensity.posterior(p.T.contiguous(), torch.as_tensor(np.asarray(values), dtype=torch.float32)).T
    predicted = q.argmax(1).numpy()
    return InputGridVoxels(q.clamp_min(1e-8).log()[:, None, :], torch.ones(len(predicted), 1),
                           predicted == np.asarray(ref), predicted)


def inside(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Points whose 8 corners all lie in a grid of ``shape`` (so their weights sum to 1)."""
    return ((points >= 0) & (points <= np.asarray(shape) - 1)).all(axis=1)


def evaluated_region(pred: np.ndarray, ref: np.ndarray, scored: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Scored voxels of the foreground union dilated by 3 mm: the region :mod:`msdseg.evaluation.metrics`
    scores, so the fit sees the same mix of easy and hard voxels."""
    from scipy import ndimage

    iterations = max(1, int(round(3.0 / spacing_mm)))
    region = ndimage.binary_dilation((pred > 0) | (ref > 0), iterations=iterations)
    return region & scored


def pick(region: np.ndarray, rng: np.random.Generator, limit: int = VOXELS_PER_CASE) -> np.ndarray:
    """Flat indices of at most ``limit`` voxels of ``region``, sorted."""
    idx = np.flatnonzero(region)
    return np.sort(rng.choice(idx, size=min(limit, idx.size), replace=False))


def binary_nll(voxels: InputGridVoxels, temperature: float, weights: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of "this voxel's label is right" under the stated confidence:
    a proper score of the uncertainty map itself."""
    conf = np.clip(voxels.confidence(temperature), 1e-6, 1 - 1e-6)
    ll = np.where(voxels.correct, np.log(conf), np.log1p(-conf))
    w = np.full(ll.size, 1.0 / max(1, ll.size)) if weights is None else weights / weights.sum()
    return float(-(w * ll).sum())
