"""Held-out anatomy in many contrasts: the held-out label map rendered as synthetic 1 mm scans.

Why a second held-out score: the real held-out T1 (fsaverage) is a single image, and an average of
40 brains at that: its cortex fades into the sulcal and extracerebral CSF, so one number mixes what
the model knows about anatomy with how it reads that one blurred picture, and two close models
cannot be ranked on it (docs/research/field_notes.md). Here the same held-out label map (never used
in training) is drawn ``--cases`` times by the training generator — random deformation, contrast,
bias field, noise and resolution, without thick slices or cut fields of view (:func:`render_config`) —
and each render is segmented through the user's path (:func:`msdseg.inference.pipeline.segment_image` on a
1 mm image) and scored against the deformed map. Fixed seeds give every model the same renders, so
the per-case differences between two models are paired. The distance between this score and the real
T1's is the synthetic-to-real gap.

:func:`render_cases` also draws any other maps of the manifest (leave-one-source-out evaluation,
:mod:`msdseg.evaluation.loso`, renders a training source's maps). A map labels only its ``defined``
leaves: the reference keeps exactly those, everything else becomes the ignore number and is not
scored. Maps whose entry says ``"reference": "partial"`` (a handful of structures drawn on a real
scan, for scoring that scan only) are never rendered: the generator would paint the rest of the
brain as one unlabelled tissue, not as anatomy.

Usage: ``python -m msdseg.evaluation.heldout_synth --data DATA/manifest.json [--model M] [--preset P]
[--cases 6] [--seed 7] -o OUT``; writes ``synthetic_heldout.json`` and per-case reports.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.settings import add_intensity_argument
from msdseg.core.io import image_from_ras_affine
from msdseg.training.synth import IGNORE

RENDER_MM = 1.0


def render_config():
    """The training generator's ranges without thick slices or cut fields of view, random contrasts
    included: how well anatomy the model never saw is read across the contrasts it was trained on."""
    from msdseg.training.synth import SynthConfig

    return SynthConfig().whole_brain_scan()


def renderable_maps(manifest: Path, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Manifest entries to render: the held-out maps, or the maps named in ``names``; entries
    marked ``"reference": "partial"`` never."""
    doc = json.loads(manifest.read_text())
    entries = [m for m in doc.get("maps", []) if m.get("reference") != "partial"]
    if names is None:
        maps = [m for m in entries if m.get("role") == "heldout"]
        if not maps:
            raise InputError(f"{manifest}: no held-out label map")
        return maps
    wanted = list(names)
    by_name = {m["name"]: m for m in entries}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise InputError(f"{manifest}: no renderable label map named {missing[0]}")
    return [by_name[n] for n in wanted]


def render_cases(
    manifest: Path, n_cases: int, seed: int, maps: Iterable[str] | None = None,
) -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
    """(name, image, reference labels in aseg numbers) for ``n_cases`` renders of each map in
    ``maps`` (manifest names; default: the held-out maps).  Reference voxels of leaves the map does
    not define (see :func:`renderable_maps`) carry the ignore number."""
    from msdseg.core.labels import load_tree
    from msdseg.training.synth import LabelSource, SyntheticGenerator

    entries = renderable_maps(manifest, maps)
    tree = load_tree()
    for m in entries:
        src = LabelSource.from_file(manifest.parent / m["path"], set(m["defined"]), m.get("merged", []))
        src.name = m["name"]
        gen = SyntheticGenerator([src], tree, render_config())
        rng = np.random.default_rng(seed)
        for k in range(n_cases):
            sample = gen.sample(rng, RENDER_MM)
            channels = sample.target.argmax(0).numpy()
            labels = tree.channel_to_aseg[channels]
            # voxels of none of our classes (vessels, chiasm: 255 in the map) keep that number, so
            # they are scored exactly as on the real held-out T1; so do leaves the map leaves
            # undefined (a partial map's white matter, a merged ventricle's split)
            scored = sample.channel_mask.numpy().copy()
            scored[0] = True
            labels[(sample.weight[0].numpy() <= 0) | ~scored[channels]] = IGNORE
            # the generator's grid is RAS-aligned at RENDER_MM; where it sits does not matter here
            affine = np.diag([RENDER_MM, RENDER_MM, RENDER_MM, 1.0])
            yield (f"{m['name']}_synth{k}", image_from_ras_affine(sample.image[0].numpy(), affine),
                   image_from_ras_affine(labels.astype(np.int16), affine))


def evaluate_synthetic(
    model: str | None, manifest: Path, outdir: Path, preset: str = "balanced", n_cases: int = 6,
    seed: int = 7, device: str = "auto", write_reports: bool = True, progress=print, intensity: bool | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``n_cases`` renders of every held-out map; returns (and writes) a summary."""
    from msdseg.evaluation.metrics import _json_safe
    from msdseg.evaluation.heldout import segment_and_score
    from msdseg.core.settings import SegmentSettings
    from msdseg.core.labels import load_tree

    if n_cases < 1:
        raise InputError("--cases must be at least 1")
    tree = load_tree()
    outdir.mkdir(parents=True, exist_ok=True)
    settings = SegmentSettings(preset=preset, device=device, uncertainty=True, model=model, check_brain=False,
                               intensity=intensity)
    cases: dict[str, Any] = {}
    for name, image, ref in render_cases(manifest, n_cases, seed):
        cases[name] = segment_and_score(image, ref, settings, tree, outdir if write_reports else None, name,
                                        f"{model or 'shipped'} - {name} ({preset})")
        progress(f"{name}: mean Dice {cases[name]['dice_mean_leaves']:.3f}, "
                 f"min {cases[name]['min_dice_leaves']:.3f} ({cases[name]['seconds']:.0f} s)")
    results = {"model": model or "shipped", "preset": preset, "seed": seed, "render_mm": RENDER_MM,
               "cases": cases, "summary": summarise(cases)}
    (outdir / "synthetic_heldout.json").write_text(json.dumps(_json_safe(results), indent=1))
    return results


def summarise(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over renders of the mean leaf Dice, and each leaf's mean Dice."""
    means = [c["dice_mean_leaves"] for c in cases.values()]
    leaves: dict[str, list[float]] = {}
    for c in cases.values():
        for leaf, d in c["dice_by_leaf"].items():
            if d is not None and math.isfinite(d):
                leaves.setdefault(leaf, []).append(d)
    by_leaf = {k: statistics.fmean(v) for k, v in leaves.items()}
    eces = [c["ece"] for c in cases.values() if c.get("ece") is not None and math.isfinite(c["ece"])]
    return {
        "n_cases": len(means),
        "dice_mean": statistics.fmean(means),
        "dice_sd": statistics.stdev(means) if len(means) > 1 else 0.0,
        "dice_by_leaf": by_leaf,
        "leaves_below_0_70": sorted(k for k, v in by_leaf.items() if v < 0.70),
        "ece_mean": statistics.fmean(eces) if eces else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.heldout_synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="manifest.json of prepare-data")
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--cases", type=int, default=6, help="renders per held-out map")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-reports", action="store_true", help="only the summary JSON")
    p.add_argument("-o", "--output", required=True)
    add_intensity_argument(p)
    args = p.parse_args(argv)
    try:
        res = evaluate_synthetic(args.model, Path(args.data), Path(args.output), args.preset, args.cases,
                                 args.seed, args.device, not args.no_reports, intensity=args.intensity)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    s = res["summary"]
    print(f"{s['n_cases']} renders: mean Dice {s['dice_mean']:.3f} (sd {s['dice_sd']:.3f}); "
          f"leaves under 0.70: {', '.join(s['leaves_below_0_70']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
