"""Sharpen the network's answer with the scan's own intensities, at the scan's own resolution.

Why: the presets answer on a 2 mm grid, and probabilities interpolated from it blur every border
a 1 mm scan shows (sulci, the ventricles' walls, the 0.5 mL temporal horns).  The scan itself still
holds that detail.  So the interpolated ensemble mean is used as a spatial prior and each structure's
intensities as a Gaussian fitted to this very scan by expectation-maximisation, as SAMSEG does with
its atlas, with the network in the atlas's place:

    q_k(v)  ∝  p_k(v)^a · N(I(v); mu_k, sigma_k^2)

``a`` (:data:`PRIOR_POWER`) > 1 keeps the network in charge where a structure's intensity says
little (pallidum against white matter): the Gaussian treats neighbouring voxels as independent,
so on its own it is far more sure of itself than it should be.  Being fitted per scan, the model
needs no assumption about contrast, scanner or intensity scale.  Voxels the network calls background
with at least :data:`BAND` probability (most of the head) keep its answer.

Only used where the scan is finer than the network's grid along at least two axes
(:func:`worth_refining`): within the slices of a thick-slice scan the intensities still carry detail
the 2 mm answer lacks; a scan coarse in every direction has none to add.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: exponent of the network's probabilities in the posterior (chosen on held-out renders, model card)
PRIOR_POWER = 2.0
#: voxels whose background probability is at least this keep the network's answer
BAND = 0.98
#: EM iterations of the fit (the first one starts from the network's own probabilities)
ITERATIONS = 3
#: voxels drawn for the fit: the Gaussians' moments are settled long before a whole scan
FIT_VOXELS = 1_000_000
#: a voxel axis carries detail the entry grid lacks when its spacing is at most this fraction of it
MAX_INPUT_SPACING_SHARE = 0.75
#: refine inputs with at least this many such axes: a thick-slice scan still has in-plane detail
MIN_DETAILED_AXES = 2


@dataclass(frozen=True)
class IntensityModel:
    """Per-class Gaussian intensities of one scan (in its own units) and how to combine them."""

    means: torch.Tensor  # (C,)
    variances: torch.Tensor  # (C,)
    prior_power: float = PRIOR_POWER
    band: float = BAND

    def posterior(self, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Refined probabilities (C, N) for the network's ``probs`` (C, N) at voxels of intensity
        ``values`` (N,); voxels outside the band are returned as they came."""
        out = probs.clone()
        band = probs[0] < self.band
        if bool(band.any()):
            out[:, band] = _combine(probs[:, band], values[band], self)
        return out


def _combine(probs: torch.Tensor, values: torch.Tensor, model: IntensityModel) -> torch.Tensor:
    x = values[None].float()
    mu, var = model.means[:, None], model.variances[:, None]
    log_lik = -0.5 * (x - mu) ** 2 / var - 0.5 * var.log()
    return torch.softmax(model.prior_power * probs.clamp_min(1e-6).log() + log_lik, dim=0)


def fit_intensity_model(
    probs: torch.Tensor, values: torch.Tensor, prior_power: float = PRIOR_POWER, band: float = BAND,
    iterations: int = ITERATIONS,
) -> IntensityModel | None:
    """Fit each class's intensity mean and variance to voxels (``probs`` (C, N), ``values`` (N,)).

    The first M-step weighs the voxels by the network's probabilities, later ones by the refined
    posterior.  A class with (almost) no weight keeps the scan's overall moments, so it neither
    attracts nor repels voxels by accident.  Returns None when no voxel lies in the band.
    """
    inside = probs[0] < band
    if int(inside.sum()) < 100:
        return None
    p, x = probs[:, inside].float(), values[inside].float()
    floor = 1e-4 * float(x.var()) + 1e-12
    q = p
    model = None
    for _ in range(max(1, iterations)):
        w = q.sum(1)
        safe = w.clamp_min(1e-6)
        mu = (q * x[None]).sum(1) / safe
        var = (q * (x[None] - mu[:, None]) ** 2).sum(1) / safe
        empty = w < 1.0  # less than one voxel's worth of weight
        mu = torch.where(empty, x.mean(), mu)
        var = torch.where(empty, x.var(), var) + floor
        model = IntensityModel(mu, var, prior_power, band)
        q = _combine(p, x, model)
    return model


def worth_refining(input_spacing: tuple[float, ...], entry_mm: float) -> bool:
    """True when the input resolves detail the entry grid does not along at least
    :data:`MIN_DETAILED_AXES` voxel axes.

    Why per axis: a clinical 1 x 1 x 5 mm scan blurs across its slices but is sharp within them,
    and each voxel's own intensity still says which side of an in-plane border it lies on; an
    isotropic 3 mm scan is coarser than the entry grid everywhere and has nothing to add."""
    fine = sum(float(s) <= MAX_INPUT_SPACING_SHARE * float(entry_mm) for s in input_spacing)
    return fine >= MIN_DETAILED_AXES


def draw_fit_voxels(box_start: tuple[int, int, int], box_stop: tuple[int, int, int], n: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(n, 3) random input indices (i, j, k) inside a half-open box; every voxel if it holds fewer."""
    start, stop = np.asarray(box_start), np.asarray(box_stop)
    count = int(np.prod(np.maximum(stop - start, 0)))
    if count <= n:
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1)
    return start + (rng.random((n, 3)) * (stop - start)).astype(np.int64)
