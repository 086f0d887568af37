"""Calibrated voxel-wise uncertainty: one temperature per preset, fitted on synthetic cases.

Why: the averaged diffusion samples are over-confident on real scans (on the held-out T1 the most
likely label had mean probability 0.83 where it was right 72% of the time), so a map that says "this
label is wrong with probability u" needs a correction.  Temperature scaling (Guo et al., 2017) is
the standard one: ``p_T = softmax(log p / T)``.  It keeps every voxel's most likely label, so labels,
Dice and volumes do not change; only the stated confidence does.

The temperature minimises the negative log-likelihood of the reference labels on two kinds of
data that are not held out, each given half the weight:

* *synthetic* cases drawn from the training label maps by the training generator (complete maps
  only, so that every voxel has a true label).  Their corruption is deliberately broader than real
  scans, so the model is less accurate on them and alone they ask for too high a temperature;
* the *real* T1 images that come with a training label map (IBSR).  The network never saw these
  images, but it did train on their label shapes, so alone they ask for too low a temperature.

No held-out reference enters the fit.  Each preset gets its own value because more samples and
mirrored views already soften the average; a preset that was not fitted (``--presets`` names
the ones to fit, by default all) borrows the balanced value and the JSON says so.  The result is
stored in the model JSON under ``calibration`` and applied by :func:`msdseg.inference.segment_image`;
a model without it gets temperature 1.

Run: ``python -m msdseg.calibration --data DATA/manifest.json [--model M] [--write]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

#: voxels kept per case for the fit (a random subsample of the evaluated region)
VOXELS_PER_CASE = 150_000


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


def fit_temperature(
    log_probs: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None,
    bounds: tuple[float, float] = (0.25, 8.0),
) -> float:
    """Temperature minimising the (weighted) mean negative log-likelihood of ``target`` (N,) under
    ``softmax(log_probs / T)`` with ``log_probs`` (N, C)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    rows = np.arange(len(target))
    w = np.ones(len(target)) if weights is None else np.asarray(weights, dtype=float)
    w = w / w.sum()

    def nll(t: float) -> float:
        return float(-(w * log_softmax(log_probs / t, axis=1)[rows, target]).sum())

    return float(minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-3}).x)


def _ece(log_probs: np.ndarray, target: np.ndarray, temperature: float) -> float:
    from scipy.special import softmax

    from .evaluate import expected_calibration_error

    p = softmax(log_probs / temperature, axis=1)
    return float(expected_calibration_error(p.max(1), p.argmax(1) == target)["ece"])


def _evaluated_voxels(pred: np.ndarray, ref: np.ndarray, weight: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Supervised voxels of the foreground union dilated by 3 mm: the region the evaluation scores
    (:mod:`msdseg.evaluate`), so the fit sees the same mix of easy and hard voxels."""
    from scipy import ndimage

    iterations = max(1, int(round(3.0 / spacing_mm)))
    region = ndimage.binary_dilation((pred > 0) | (ref > 0), iterations=iterations)
    return region & (weight > 0)


def _subsample(probs: np.ndarray, ref: np.ndarray, region: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(region)
    idx = rng.choice(idx, size=min(VOXELS_PER_CASE, idx.size), replace=False)
    flat = probs.reshape(probs.shape[0], -1)[:, idx].T
    return np.log(np.clip(flat, 1e-8, None)).astype(np.float32), ref.ravel()[idx]


def collect_real_cases(
    model: torch.nn.Module, cases: list[dict[str, str]], params: Mapping[str, Any], seed: int,
    mirror_permutation: np.ndarray | None, progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`collect_cases` for real T1 images with reference label maps (``t1``/``labels`` paths),
    compared on the model grid (reference resampled with nearest neighbour)."""
    import SimpleITK as sitk

    from .geometry import head_grid, resample_to_grid, to_ras_array
    from .inference import preset_inputs, sample_multiscale
    from .io import load_volume, read_image
    from .labels import load_tree
    from .sources.labelmap import IGNORE  # brain voxels of none of our classes: not scored

    tree = load_tree()
    lut = np.zeros(65536, dtype=np.int64)  # labels outside the tree count as background
    for label, channel in tree.aseg_to_channel.items():
        lut[label] = channel
    rng = np.random.default_rng(seed)
    spacing = float(params["spacing_mm"])
    logs, targets = [], []
    for i, case in enumerate(cases):
        image = load_volume(case["t1"])
        grid = head_grid(image, spacing)
        coarse, fine_grid, fine = preset_inputs(image, grid, params)
        res = sample_multiscale(
            model, coarse, dict(params), seed=seed + i, device="cpu",
            mirror_permutation=mirror_permutation if params["mirror"] else None, fine=fine,
        )
        grid = fine_grid or grid  # a refining preset is scored on its fine grid
        probs = res.mean.numpy()
        ref_img = resample_to_grid(read_image(case["labels"]), grid, interpolator=sitk.sitkNearestNeighbor)
        raw = to_ras_array(ref_img).astype(np.int64).clip(0, 65535)
        ref = lut[raw]  # head tissue (>= 1000) is background
        # painted-only leaves (IBSR's cortex) are not a reference the model is meant to match
        scored = (raw != IGNORE) & ~np.isin(raw, case.get("unscored", []))
        region = _evaluated_voxels(probs.argmax(0), ref, scored, grid.spacing_mm)
        lp, tg = _subsample(probs, ref, region, rng)
        logs.append(lp)
        targets.append(tg)
        if progress:
            progress(i + 1, len(cases), case["name"])
    return np.concatenate(logs), np.concatenate(targets)


def collect_cases(
    model: torch.nn.Module, generator, n_cases: int, params: Mapping[str, Any], seed: int,
    mirror_permutation: np.ndarray | None, progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities (N, C) and reference classes (N,) from ``n_cases`` complete synthetic cases."""
    from .inference import sample_multiscale

    rng = np.random.default_rng(seed)
    refine = float(params["refine_mm"]) if params.get("refine_mm") else None
    spacing = refine or float(params["spacing_mm"])  # a refining preset is scored on its fine grid
    factor = int(round(float(params["spacing_mm"]) / spacing))
    logs, targets = [], []
    done, draws = 0, 0
    while done < n_cases:
        if draws >= 20 * n_cases:
            from .errors import InputError

            raise InputError("calibration needs complete label maps; the training sources gave none")
        draws += 1
        sample = generator.sample(rng, spacing)
        if not bool(sample.channel_mask.all()):
            continue  # a partial map (abagen) leaves some voxels without a true label
        image, coords = sample.image[None], sample.coords[None]
        pool = (lambda x: torch.nn.functional.avg_pool3d(x, factor)) if factor > 1 else (lambda x: x)
        res = sample_multiscale(
            model, (pool(image), pool(coords)), dict(params), seed=seed + done, device="cpu",
            windowed=None if refine else False,
            mirror_permutation=mirror_permutation if params["mirror"] else None,
            fine=(image, coords) if refine else None,
        )
        probs = res.mean.numpy()
        ref = sample.target.argmax(0).numpy()
        region = _evaluated_voxels(probs.argmax(0), ref, sample.weight[0].numpy(), spacing)
        lp, tg = _subsample(probs, ref, region, rng)
        logs.append(lp)
        targets.append(tg)
        done += 1
        if progress:
            progress(done, n_cases, sample.source)
    return np.concatenate(logs), np.concatenate(targets)


def real_training_cases(manifest: Path) -> list[dict[str, str]]:
    """Training label maps of the manifest that come with their own real T1 image."""
    doc = json.loads(manifest.read_text())
    return [{"name": f"{m['source']}/{m['name']}", "t1": str(manifest.parent / m["t1"]),
             "labels": str(manifest.parent / m["path"]), "unscored": list(m.get("painted_only", []))}
            for m in doc.get("maps", []) if m.get("role") == "train" and m.get("t1")]


def calibrate_model(
    model_path: str | None, manifest: Path, presets: list[str], n_cases: int, seed: int,
    progress=None,
) -> dict[str, Any]:
    """Fit one temperature per preset; returns the ``calibration`` block for the model JSON."""
    from .inference import PRESETS
    from .labels import load_tree
    from .modelfile import load_model
    from .synth import SyntheticGenerator
    from .train_cli import load_sources

    loaded = load_model(model_path, torch.device("cpu"))
    tree = load_tree()
    sources, _ = load_sources(manifest)
    generator = SyntheticGenerator(sources, tree)
    real = real_training_cases(manifest)
    block: dict[str, Any] = {
        "method": "temperature scaling of the averaged probabilities, softmax(log p / T)",
        "fitted_on": (f"{n_cases} synthetic cases from complete training label maps (seed {seed})"
                      + (f" and the real T1 of {', '.join(c['name'] for c in real)}, half the weight each"
                         if real else "") + "; no held-out reference"),
        "command": f"python -m msdseg.calibration --data {manifest} --presets {' '.join(presets)} "
                   f"--cases {n_cases} --seed {seed}",
        "presets": {},
    }
    say = progress or (lambda msg: None)
    for preset in presets:
        params = PRESETS[preset]
        t0 = time.time()
        parts = {"synthetic": collect_cases(
            loaded.model, generator, n_cases, params, seed, tree.flip_permutation,
            progress=lambda d, n, s, p=preset: say(f"{p}: synthetic case {d}/{n} ({s})"))}
        if real:
            parts["real"] = collect_real_cases(
                loaded.model, real, params, seed, tree.flip_permutation,
                progress=lambda d, n, s, p=preset: say(f"{p}: real case {d}/{n} ({s})"))
        log_probs = np.concatenate([lp for lp, _ in parts.values()])
        target = np.concatenate([tg for _, tg in parts.values()])
        weights = np.concatenate([np.full(len(tg), 1.0 / len(tg)) for _, tg in parts.values()])
        temperature = fit_temperature(log_probs, target, weights)
        entry: dict[str, Any] = {"temperature": round(temperature, 4), "seconds": 0.0}
        for name, (lp, tg) in parts.items():
            entry[name] = {"voxels": int(tg.size), "temperature_alone": round(fit_temperature(lp, tg), 4),
                           "ece_before": round(_ece(lp, tg, 1.0), 4),
                           "ece_after": round(_ece(lp, tg, temperature), 4)}
        entry["seconds"] = round(time.time() - t0, 1)
        block["presets"][preset] = entry
    donor = "balanced" if "balanced" in block["presets"] else next(iter(block["presets"]), None)
    for preset in PRESETS:
        if preset not in block["presets"] and donor is not None:
            block["presets"][preset] = {"temperature": block["presets"][donor]["temperature"], "borrowed_from": donor}
    return block


def write_calibration(model_path: Path, block: Mapping[str, Any]) -> None:
    """Store ``block`` in the model JSON (atomic replace; the weights file is untouched)."""
    from .modelfile import config_path

    cfg_file = config_path(model_path)
    config = json.loads(cfg_file.read_text())
    config["calibration"] = dict(block)
    tmp = cfg_file.with_name(cfg_file.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    tmp.replace(cfg_file)


def main(argv: list[str] | None = None) -> int:
    from .errors import InputError
    from .modelfile import default_model_path
    from .inference import PRESETS

    p = argparse.ArgumentParser(prog="python -m msdseg.calibration", description=__doc__,
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
