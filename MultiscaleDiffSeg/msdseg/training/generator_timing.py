"""Seconds per training sample of the synthetic generator, with its optional size changes off and on.

    python -m msdseg.training.generator_timing --data DATA/manifest.json --samples 40

Why: CPU time is what limits training here, and every generator option runs inside each training
step.  This times ``SyntheticGenerator.sample`` for each training mode (the trainer's default
modes, or ``--modes`` as for ``msdseg train``) under four cumulative option sets (none, ventricle
resizing, nucleus resizing, horn scaling) from the same seed, and weights the modes by their
training shares, so an option's cost can be read against a step's seconds in ``train_log.csv``.
Results go to stdout as a Markdown table (for docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from msdseg.core.errors import InputError
from msdseg.training.synth import SynthConfig, SyntheticGenerator
from msdseg.training.trainer import DEFAULT_MODES, TrainMode

#: cumulative option sets, each option at share 0.5 as in the training recipe
#: (docs/research/model_history.md)
OPTION_SETS: tuple[tuple[str, dict], ...] = (
    ("none", {}),
    ("`--ventricle-change 0.5`", {"ventricle_change_prob": 0.5}),
    ("and `--nuclei-change 0.5`", {"ventricle_change_prob": 0.5, "nuclei_change_prob": 0.5}),
    ("and `--horn-scale 0.5`", {"ventricle_change_prob": 0.5, "nuclei_change_prob": 0.5,
                                "ventricle_horn_scale": 0.5}),
)


def time_generator(sources, tree, modes: Sequence[TrainMode], samples: int, seed: int = 1,
                   base: SynthConfig | None = None) -> list[dict]:
    """One row per option set: mean seconds per sample for each mode and the share-weighted mean."""
    rows = []
    total_weight = sum(m.weight for m in modes)
    for name, changes in OPTION_SETS:
        gen = SyntheticGenerator(sources, tree, replace(base or SynthConfig(), **changes))
        gen.sample(np.random.default_rng(seed + 1000), modes[0].spacing_mm, modes[0].crop)  # warm-up
        seconds = []
        for mode in modes:
            rng = np.random.default_rng(seed)
            start = time.perf_counter()
            for _ in range(samples):
                gen.sample(rng, mode.spacing_mm, mode.crop)
            seconds.append((time.perf_counter() - start) / samples)
        weighted = sum(m.weight * s for m, s in zip(modes, seconds)) / total_weight
        rows.append({"options": name, "seconds": seconds, "weighted": weighted})
    return rows


def markdown(rows: list[dict], modes: Sequence[TrainMode]) -> str:
    """The rows as the table docs/benchmarks.md shows."""
    names = [f"{m.spacing_mm:g} mm {'whole' if m.crop is None else f'{m.crop[0]}³ crop'} s" for m in modes]
    lines = ["| generator options | " + " | ".join(names) + " | weighted s per sample |",
             "| --- | " + " | ".join("---:" for _ in modes) + " | ---: |"]
    for r in rows:
        lines.append(f"| {r['options']} | " + " | ".join(f"{s:.3f}" for s in r["seconds"]) + f" | {r['weighted']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from msdseg.core.labels import load_tree
    from msdseg.training.cli import load_sources

    p = argparse.ArgumentParser(prog="python -m msdseg.training.generator_timing", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="manifest.json of prepare-data")
    p.add_argument("--samples", type=int, default=40, help="samples per mode and option set")
    p.add_argument("--modes", nargs="+", default=None, metavar="SPACING:CROP:WEIGHT",
                   help="training modes as for 'msdseg train' (default: the trainer's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    try:
        if args.samples < 1:
            raise InputError(f"--samples {args.samples}: give at least 1")
        try:
            modes = tuple(TrainMode.parse(m) for m in args.modes) if args.modes else DEFAULT_MODES
        except ValueError as exc:
            raise InputError(str(exc)) from None
        sources, _ = load_sources(Path(args.data))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = time_generator(sources, load_tree(), modes, args.samples, args.seed)
    print(markdown(rows, modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
