"""Where a progress bar should stand after each stage: measured costs, not round numbers.

Costs are in units of one denoiser pass on the same grid and arithmetic path, taken from the
stage times of the balanced preset on a 256^3 1 mm T1 on the development CPU (docs/benchmarks.md,
"Where a default run's time goes"): on the fp32 path the grid and resampling took about 0.65 passes, an encoder
pass 0.45, the intensity fit 0.8 and the back-projection with the intensity model 2.1 (0.9
without it).  With bf16 the passes run about twice as fast while the other stages do not, so
those stages count double there.  The sampling share then follows the preset's own pass count,
so the fast preset's bar no longer stalls at 90 % for a third of the run.
"""
from __future__ import annotations

from dataclasses import dataclass

#: stage costs in denoiser passes on the fp32 path
PREPARE = 0.65
ENCODER = 0.45
INTENSITY_FIT = 0.8
BACKPROJECT_REFINED = 2.1
BACKPROJECT_PLAIN = 0.9
#: how much faster a pass is on the bf16 path than on fp32, against the stages that do not change
BF16_PASS_SPEEDUP = 2.0


@dataclass(frozen=True)
class StagePlan:
    """Fractions of the whole run at which each stage starts (sampling runs to ``fit``)."""

    sampling: float
    fit: float
    backproject: float

    def in_sampling(self, fraction: float) -> float:
        return min(self.fit, self.sampling + (self.fit - self.sampling) * fraction)  # never past the next stage

    def in_backprojection(self, fraction: float) -> float:
        return min(1.0, self.backproject + (1.0 - self.backproject) * fraction)


def stage_plan(encoder_passes: int, denoiser_passes: int, refined: bool, bf16: bool) -> StagePlan:
    """Stage boundaries for a run with these passes; ``refined``: the intensity model is used."""
    fixed = 2.0 if bf16 else 1.0
    prepare = PREPARE * fixed
    sampling = encoder_passes * ENCODER + max(denoiser_passes, 1)
    fit = (INTENSITY_FIT if refined else 0.0) * fixed
    backproject = (BACKPROJECT_REFINED if refined else BACKPROJECT_PLAIN) * fixed
    total = prepare + sampling + fit + backproject
    return StagePlan(prepare / total, (prepare + sampling) / total, (prepare + sampling + fit) / total)
