"""New whole-head label maps drawn from SAMSEG's atlas priors.

The SAMSEG atlas argmax is one head.  Its priors say how far each boundary may move across the 20
subjects the atlas was built from, so they can produce many plausible heads: every class's log
prior, sharpened or softened by a random temperature, gets its own smooth random field, and the
per-voxel argmax is a new label map.  Where one class dominates (prior near 1) nothing changes;
where the atlas is uncertain (cortex/CSF/skull borders, small nuclei) boundaries move by a few
millimetres, coherently over the field's correlation length, not voxel by voxel (independent
per-voxel draws would give salt and pepper, not anatomy).

Maps are built at 1 mm, one class at a time (memory stays at a few volumes), and a sampler reuses
each map for several draws: building one costs more than a training step (timings in
docs/research/field_notes.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from msdseg.training.synth import LabelSource

_EPS = 1e-4
#: Training-source name of the maps drawn here ("source/map", like the manifest's maps).
SOURCE_NAME = "samseg_priors/sampled"
#: Manifest source whose ``extras`` name a priors file -> training-source name of its draws.  Each
#: atlas is its own source, so the generator's per-source balance gives each of them equal weight.
PRIOR_SOURCES: dict[str, str] = {"samseg": SOURCE_NAME, "gca": "gca_priors/sampled"}


@dataclass
class PriorSampleConfig:
    """Ranges of the prior-sampling randomness."""

    temperature: tuple[float, float] = (0.6, 1.4)
    noise_std: tuple[float, float] = (0.3, 1.5)
    noise_grid: int = 12  # control points per axis of each class's smooth field
    reuse: int = 16  # draws served by one map before a new one is built


def sample_label_map(
    priors: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: PriorSampleConfig | None = None,
    upsample: int = 2,
) -> np.ndarray:
    """One label map (label values, int32) at ``upsample`` times the priors' resolution.

    ``priors`` is (L, X, Y, Z) with voxels summing to 1; ``labels`` gives each channel's label.
    """
    cfg = cfg or PriorSampleConfig()
    if priors.ndim != 4 or priors.shape[0] != len(labels):
        raise ValueError(f"priors {priors.shape} do not match {len(labels)} labels")
    shape = tuple(int(s) * upsample for s in priors.shape[1:])
    temperature = rng.uniform(*cfg.temperature)
    noise_std = rng.uniform(*cfg.noise_std)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    best = torch.full(shape, -torch.inf)
    arg = torch.zeros(shape, dtype=torch.int16)
    for c in range(priors.shape[0]):
        logit = torch.log(torch.from_numpy(priors[c].astype(np.float32)) + _EPS) / temperature
        n = cfg.noise_grid
        field = torch.randn((1, 1, n, n, n), generator=gen) * noise_std
        field = F.interpolate(field, size=logit.shape, mode="trilinear", align_corners=True)[0, 0]
        fine = F.interpolate((logit + field)[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
        better = fine > best
        best = torch.where(better, fine, best)
        arg[better] = c
    return np.asarray(labels, dtype=np.int32)[arg.numpy().astype(np.intp)]


class PriorMapSampler:
    """A label source whose map is redrawn from the priors every ``cfg.reuse`` draws.

    :class:`~msdseg.training.synth.SyntheticGenerator` treats it like a list entry of label sources: it asks
    :meth:`label_source` for the map to use now.
    """

    def __init__(self, npz_path: str | Path, name: str = SOURCE_NAME, cfg: PriorSampleConfig | None = None):
        data = np.load(str(npz_path))
        self.priors = data["priors"]
        self.labels = data["labels"].astype(np.int32)
        self.affine_1mm = np.asarray(data["affine_1mm"], dtype=float)
        self.name = name
        self.cfg = cfg or PriorSampleConfig()
        self._current: LabelSource | None = None
        self._served = 0
        # every label present in the priors is defined; 0, ignore and head tissue are not leaves
        self.defined_labels = {int(v) for v in self.labels if 0 < v < 1000 and v != 255}

    def label_source(self, rng: np.random.Generator) -> LabelSource:
        if self._current is None or self._served >= self.cfg.reuse:
            labels = sample_label_map(self.priors, self.labels, rng, self.cfg)
            self._current = LabelSource.from_array(self.name, labels, self.affine_1mm, self.defined_labels)
            self._served = 0
        self._served += 1
        return self._current
