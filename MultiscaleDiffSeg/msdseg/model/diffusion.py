"""Label diffusion with MONAI's schedulers: noising for training, DDIM sampling with
Step-Uncertainty Fusion (SUF) and an on-the-fly ensemble for inference.

Labels live in [-1, 1] (``2 * one_hot - 1``); the network predicts x0 (``prediction_type="sample"``),
i.e. clean label logits, so every DDIM step yields a usable segmentation.  SUF (Diff-UNet) weights
each step's prediction by how late the step is and how certain it is per voxel.  Samples are
reduced on the fly into running sums (mean probability, Welford variance), so memory does not grow
with the number of samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from msdseg.core.errors import Cancelled

NUM_TRAIN_TIMESTEPS = 1000


class AlignedDDIMScheduler(DDIMScheduler):
    """MONAI's DDIM scheduler with timesteps on the same stride that its ``step`` assumes.

    MONAI's ``set_timesteps`` spaces steps with ``linspace`` while ``step`` jumps back by
    ``T // n`` — the two disagree and the sampler lands between noise levels.  Here step ``i`` is
    ``(n - i) * s - 1`` with ``s = T // n``: each step goes exactly to the next evaluated timestep
    and the last one (``s - 1``) steps to ``-1``, i.e. to x0 with alpha = 1.
    """

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)
        stride = self.num_train_timesteps // num_inference_steps
        self.timesteps = torch.tensor(
            [(num_inference_steps - i) * stride - 1 for i in range(num_inference_steps)], device=device
        )


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, schedule="linear_beta", prediction_type="sample")


def make_sampling_scheduler(steps: int) -> AlignedDDIMScheduler:
    sched = AlignedDDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, schedule="linear_beta", prediction_type="sample", clip_sample=True
    )
    sched.set_timesteps(steps)
    return sched


def to_signed(onehot: torch.Tensor) -> torch.Tensor:
    """Probabilities / one-hot in [0, 1] -> diffusion space [-1, 1]."""
    return onehot * 2.0 - 1.0


def noisy_labels(
    scheduler: DDPMScheduler, onehot: torch.Tensor, generator: torch.Generator | None = None, t_min: int = 0,
    top_prob: float = 0.0, top_min: int = 900,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training input: x_t for a timestep drawn uniformly from [t_min, T) per batch item; returns
    (x_t, t).  Sampling with at most six DDIM steps never queries t below 165, where x_t still
    shows the labels almost unchanged, so training there mostly teaches copying.

    With ``top_prob`` > 0 that share of the items draws t from [top_min, T) instead: there x_t
    holds almost no label signal, so the network must read the image.  Uniform t gives that range
    only (T - top_min) / (T - t_min) of the steps, yet every sampler's first step and the
    deterministic pass run at t = T - 1.
    """
    b = onehot.shape[0]
    t = torch.randint(int(t_min), scheduler.num_train_timesteps, (b,), generator=generator)
    if top_prob > 0.0:
        top = torch.rand((b,), generator=generator) < top_prob
        t_top = torch.randint(int(top_min), scheduler.num_train_timesteps, (b,), generator=generator)
        t = torch.where(top, t_top, t)
    noise = torch.randn(onehot.shape, generator=generator, dtype=onehot.dtype)
    x_t = scheduler.add_noise(to_signed(onehot), noise.to(onehot.device), t.to(onehot.device))
    return x_t, t.to(onehot.device)


@dataclass
class SamplingResult:
    """Reduced ensemble at the entry depth: all tensors (C or 1, X, Y, Z) on the sampling device."""

    mean: torch.Tensor  # fused probability, averaged over samples
    variance: torch.Tensor | None  # per-class variance across samples, averaged over classes (1, ...)
    samples: int
    steps: int

    @property
    def entropy(self) -> torch.Tensor:
        """Normalised entropy of ``mean`` in [0, 1] (1, ...), computed when asked for."""
        return normalised_entropy(self.mean)


class RunningEnsemble:
    """Welford accumulator over samples: memory is O(1) in the number of samples.

    ``track_variance=False`` keeps only the running mean: one label volume less, and fewer passes
    over it, when nobody reads the spread across samples (segmentation does not: its uncertainty
    is the calibrated error probability of the mean)."""

    def __init__(self, track_variance: bool = True) -> None:
        self.n = 0
        self.track_variance = track_variance
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, probs: torch.Tensor) -> None:
        self.n += 1
        if self.mean is None:
            self.mean = probs.clone()
            self.m2 = torch.zeros_like(probs) if self.track_variance else None
            return
        delta = probs - self.mean
        self.mean.add_(delta, alpha=1.0 / self.n)
        if self.m2 is not None:
            self.m2.addcmul_(delta, probs - self.mean)

    def result(self, steps: int) -> SamplingResult:
        assert self.mean is not None
        var = None if self.m2 is None else (self.m2 / max(self.n - 1, 1)).mean(dim=0, keepdim=True)
        return SamplingResult(self.mean, var, self.n, steps)


def normalised_entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Shannon entropy divided by log(C): 0 = certain, 1 = uniform (``-p log p`` is 0 at p = 0)."""
    c = probs.shape[dim]
    return torch.special.entr(probs).sum(dim=dim, keepdim=True).div_(math.log(c))


def suf_weight(step_index: int, steps: int, probs: torch.Tensor) -> torch.Tensor:
    """Step-Uncertainty Fusion weight per voxel: later steps and more certain voxels count more."""
    time_w = math.exp(1.0 / (1.0 + math.exp(-(step_index + 1) / steps)))
    return time_w * (1.0 - normalised_entropy(probs))


def ddim_step_from_probs(sched: DDIMScheduler, timestep: int, probs: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """MONAI's deterministic DDIM step (``eta = 0``, x0 prediction) for x0 = ``2 * probs - 1``, in place
    on ``x_t``.

    The step is linear in x0 and x_t: ``x_prev = k0 * x0 + k1 * x_t`` with
    ``k0 = sqrt(a_prev) - sqrt(1 - a_prev) * sqrt(a_t) / sqrt(1 - a_t)`` and
    ``k1 = sqrt(1 - a_prev) / sqrt(1 - a_t)`` (``a`` = cumulative alpha).  Written that way it is
    three passes over the label volume instead of the dozen of the general step; clipping x0 to
    [-1, 1] changes nothing for probabilities.  Equal to ``sched.step`` (tested)."""
    prev = timestep - sched.num_train_timesteps // sched.num_inference_steps
    a_t = float(sched.alphas_cumprod[timestep])
    a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
    k1 = math.sqrt(1.0 - a_prev) / math.sqrt(1.0 - a_t)
    k0 = math.sqrt(a_prev) - k1 * math.sqrt(a_t)
    return x_t.mul_(k1).add_(probs[None], alpha=2.0 * k0).sub_(k0)


DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_sample(
    denoise: DenoiseFn | Sequence[DenoiseFn],
    shape: tuple[int, ...],
    *,
    steps: int,
    samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    fuse_steps: bool = True,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    init: torch.Tensor | None = None,
    start_step: int = 0,
    track_variance: bool = True,
) -> SamplingResult:
    """Run ``samples`` independent DDIM chains of ``steps`` steps and reduce them on the fly.

    With ``init`` (probabilities of ``shape``, e.g. a coarser answer upsampled) each chain starts
    at step ``start_step`` of the ``steps``-step schedule from ``init`` noised to that step's
    timestep (as SDEdit does) instead of from pure noise at step 0; SUF still weighs each step by
    its place in the whole schedule.

    ``denoise(x_t, t)`` must return x0 *probabilities* (softmax over channel 0) of ``shape`` (C, ...)
    for a batch of one.  With ``steps == 0`` a single deterministic pass is made from x_t = 0 at the
    last timestep (the baseline the ensemble is compared with).  Each sample's noise comes from its
    own generator seeded ``seed + sample``, so results do not depend on the device's RNG state.

    ``denoise`` may be a sequence of denoisers that all answer in the same frame (for example one
    that sees the image as stored and one that sees it mirrored and maps its answer back): sample
    ``s`` uses ``denoise[s % len(denoise)]``, so the ensemble mixes views as well as noise draws.
    The deterministic pass uses the first.  A list is used in place: each view is set to None after
    its last sample, so whatever it holds (image features) can go before the next view starts.
    """
    views = denoise if isinstance(denoise, list) else list(denoise) if isinstance(denoise, tuple) else [denoise]
    ensemble = RunningEnsemble(track_variance)
    total = max(samples * max(steps, 1), 1)
    done = 0
    if steps == 0:
        t = torch.full((1,), NUM_TRAIN_TIMESTEPS - 1, device=device, dtype=torch.long)
        probs = views[0](torch.zeros((1, *shape), device=device), t)[0]
        ensemble.add(probs.float())
        return ensemble.result(0)
    sched = make_sampling_scheduler(steps)
    if init is not None and not 0 <= start_step < steps:
        raise ValueError(f"start_step {start_step} outside the {steps}-step schedule")
    first = start_step if init is not None else 0
    total = max(samples * (steps - first), 1)
    for s in range(samples):
        gen = torch.Generator(device="cpu").manual_seed(int(seed) * 1000 + s)
        x = torch.randn((1, *shape), generator=gen).to(device)
        if init is not None:
            t0 = torch.full((1,), int(sched.timesteps[first]), dtype=torch.long)
            x = sched.add_noise(to_signed(init.float().to(device))[None], x, t0.to(device))
        fused = torch.zeros(shape, device=device)
        weights = torch.zeros((1, *shape[1:]), device=device)
        for i, t_val in enumerate(sched.timesteps):
            if i < first:
                continue
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            t = torch.full((1,), int(t_val), device=device, dtype=torch.long)
            probs = views[s % len(views)](x, t)[0].float()
            if fuse_steps:
                w = suf_weight(i, steps, probs)
                fused.addcmul_(w, probs)
                weights += w
            else:
                fused = probs
            if i < steps - 1:  # the last step's x_{t-1} would be thrown away
                x = ddim_step_from_probs(sched, int(t_val), probs, x)
            done += 1
            if progress is not None:
                progress(done / total, f"sample {s + 1}/{samples}, step {i + 1 - first}/{steps - first}")
        if fuse_steps:
            fused = fused / weights.clamp_min(1e-8)
        ensemble.add(fused)
        del fused, weights, x
        if s + len(views) >= samples:  # no later sample uses this view: let its image features go
            views[s % len(views)] = None  # type: ignore[call-overload]
    return ensemble.result(steps)
