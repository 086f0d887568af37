"""Per-class check of one output head on synthetic training crops.

Why: the training loss can hide a head that never outputs some classes.  Soft Dice counts a class
that is absent from a crop and absent from the answer as right, so a head that has given up on
small structures still logs a good loss (an earlier model's 1 mm head never named putamen,
pallidum, amygdala, accumbens, temporal horns or 3rd/4th ventricles: docs/research/field_notes.md).  This
probe draws crops from the training generator at one spacing, runs the network once per crop at
a fixed timestep and scores the argmax of the entry head class by class, pooled over the crops.

Two ways to build x_t:

* ``--t T`` with T < 999: x_t from the *true* labels at that timestep (the head is told a lot; a
  class still at 0 is one it cannot name);
* ``--t 999``: x_t = 0, the deterministic pass's input (the head reads the image alone).

Run: ``python -m msdseg.evaluation.diagnostics.head_probe --data DATA/manifest.json [--model M] --spacing 1 --crops 10
--t 249 --seed 123``.  Prints one line per class and the mean over classes present in the crops.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class ProbeResult:
    """Pooled per-class overlap of the head's argmax with the crops' reference."""

    names: list[str]
    intersection: np.ndarray  # (C,)
    pred_voxels: np.ndarray  # (C,)
    ref_voxels: np.ndarray  # (C,)
    crops: int = 0
    sources: list[str] = field(default_factory=list)

    def dice(self) -> np.ndarray:
        """Per class; NaN for a class that no crop contains (nothing to score)."""
        denom = self.pred_voxels + self.ref_voxels
        out = np.full(len(self.names), np.nan)
        present = self.ref_voxels > 0
        out[present] = 2 * self.intersection[present] / denom[present]
        return out

    def summary(self) -> dict:
        d = self.dice()[1:]  # leaves only (channel 0 is background)
        present = np.isfinite(d)
        return {"crops": self.crops, "sources": list(self.sources), "mean_dice_present": float(np.nanmean(d)) if present.any() else float("nan"),
                "present": int(present.sum()),
                "never_predicted": [n for n, p, r in zip(self.names[1:], self.pred_voxels[1:], self.ref_voxels[1:])
                                    if r > 0 and p == 0],
                "dice": {n: (None if not np.isfinite(v) else round(float(v), 4)) for n, v in zip(self.names[1:], d)}}


def probe_head(model: torch.nn.Module, generator, names: list[str], spacing_mm: float, crops: int, t: int,
               seed: int, crop: int = 64, progress=None) -> ProbeResult:
    """Score the head of the depth at ``spacing_mm`` on ``crops`` synthetic crops (see module doc)."""
    from msdseg.model.diffusion import make_train_scheduler, to_signed

    sched = make_train_scheduler()
    last = sched.num_train_timesteps - 1
    entry = model.cfg.depth_of(spacing_mm)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(names)
    res = ProbeResult(names, np.zeros(n), np.zeros(n), np.zeros(n))
    model.eval()
    for i in range(crops):
        sample = generator.sample(rng, spacing_mm, crop_shape=(crop, crop, crop))
        target = sample.target[None]
        if t >= last:
            x_t = torch.zeros_like(target)
        else:
            noise = torch.randn(target.shape, generator=gen)
            x_t = sched.add_noise(to_signed(target), noise, torch.tensor([t]))
        with torch.no_grad():
            logits = model(sample.image[None], x_t, torch.tensor([t]), entry=entry, coords=sample.coords[None])
        pred = logits[0][0].argmax(0).numpy()  # outputs start at the entry depth
        ref = sample.target.argmax(0).numpy()
        # score only supervised voxels and the classes this map defines
        scored = (sample.weight[0].numpy() > 0)
        defined = sample.channel_mask.numpy()
        for c in np.flatnonzero(defined):
            p, r = (pred == c) & scored, (ref == c) & scored
            res.intersection[c] += np.count_nonzero(p & r)
            res.pred_voxels[c] += np.count_nonzero(p)
            res.ref_voxels[c] += np.count_nonzero(r)
        res.crops += 1
        res.sources.append(sample.source)
        if progress:
            progress(i + 1, crops, sample.source)
    return res


def main(argv: list[str] | None = None) -> int:
    from msdseg.core.errors import InputError
    from msdseg.core.labels import load_tree
    from msdseg.model.modelfile import load_model
    from msdseg.training.synth import SyntheticGenerator
    from msdseg.training.cli import load_sources

    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.diagnostics.head_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="manifest.json of prepare-data (training sources)")
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument("--spacing", type=float, default=1.0, help="entry spacing in mm (picks the head)")
    p.add_argument("--crops", type=int, default=10)
    p.add_argument("--crop", type=int, default=64, help="crop edge in voxels")
    p.add_argument("--t", type=int, default=249, help="timestep; 999 = the deterministic pass's x_t = 0")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    try:
        loaded = load_model(args.model, torch.device("cpu"))
        tree = load_tree()
        sources, _ = load_sources(Path(args.data))
        names = ["background"] + [leaf.id for leaf in tree.leaves]  # channel order (labels.py)
        res = probe_head(loaded.model, SyntheticGenerator(sources, tree), names, args.spacing, args.crops, args.t,
                         args.seed, args.crop,
                         progress=lambda d, n, s: print(f"crop {d}/{n} ({s})", file=sys.stderr, flush=True))
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = res.summary()
    for name, d in summary["dice"].items():
        print(f"{name:34s} {'-' if d is None else f'{d:.3f}'}")
    print(f"mean over {summary['present']} present classes: {summary['mean_dice_present']:.3f}; "
          f"never predicted: {', '.join(summary['never_predicted']) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
