"""The one inference entry point every front end calls (CLI, Slicer module, web app, cohorts).

The stages, each in its own module of this package:

1. grid: a RAS model grid at the plan's entry spacing around the head (:mod:`msdseg.core.geometry`);
2. sampling: the diffusion ensemble on that grid (:mod:`msdseg.inference.sampling`);
3. calibration: the preset's fitted temperature (:mod:`msdseg.inference.calibration`);
4. intensity refinement: a per-scan intensity model fitted under the ensemble's answer
   (:mod:`msdseg.inference.intensity`);
5. back-projection: labels and uncertainty at every input voxel (:mod:`msdseg.inference.backproject`);
6. volumes and checks, here; files are written by :mod:`msdseg.outputs`.

Progress goes to a callback and cancellation is polled between stages and slabs.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from msdseg.core.errors import Cancelled, InputError
from msdseg.core.geometry import finer_output_grid, head_grid
from msdseg.core.io import check_not_label_map, squeeze_to_3d, validate_image
from msdseg.core.labels import LabelTree, load_tree
from msdseg.core.settings import SegmentSettings
from msdseg.core.volumes import structure_volumes
from msdseg.inference.backproject import backproject, intensity_model_for
from msdseg.inference.calibration import error_probability, temper, temperature_field, temperature_for
from msdseg.inference.intensity import worth_refining
from msdseg.inference.sampling import preset_inputs, sample_multiscale
from msdseg.inference.stage_weights import stage_plan
from msdseg.model.devices import autocast_dtype, is_out_of_memory, resolve_device
from msdseg.model.modelfile import LoadedModel, load_model
from msdseg.core.volumes import uncertainty_by_structure

log = logging.getLogger("msdseg")

#: Plausible total brain volume (mL); outside it the input is most likely not a brain T1.
BRAIN_ML_RANGE = (400.0, 2600.0)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


@dataclass
class SegmentationResult:
    labels: sitk.Image
    uncertainty: sitk.Image | None
    volumes: dict[str, float]
    tree: LabelTree
    info: dict[str, Any] = field(default_factory=dict)


_MODEL_CACHE: dict[tuple, LoadedModel] = {}


def get_model(path: str | None, device: torch.device) -> LoadedModel:
    """Load once per (file, device): cohorts and worker processes reuse the network.  The file's
    size and modification time are part of the key, so a model file replaced during a long run is
    read again instead of being served from memory under its old name."""
    stamp = None
    if path is not None:
        try:
            st = Path(path).stat()
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None  # load_model reports the missing file
    key = (str(path), str(device), stamp)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(path, device)
    return _MODEL_CACHE[key]


def segment_image(
    image: sitk.Image,
    settings: SegmentSettings | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> SegmentationResult:
    """Segment one T1 volume; the input image is not modified."""
    settings = settings or SegmentSettings()
    report = progress or (lambda f, m: None)
    check = cancel or (lambda: False)
    t_start = time.time()
    plan = settings.resolved()
    image = squeeze_to_3d(image)
    validate_image(image, "input")
    check_not_label_map(image, "input")
    device = resolve_device(settings.device)
    loaded = get_model(settings.model, device)
    model = loaded.model
    tree = load_tree()
    spacing = plan.spacing_mm
    for mm in (spacing, plan.refine_mm):  # an unknown spacing fails before any resampling
        if mm:
            model.cfg.depth_of(float(mm))
    report(0.02, f"placing the {spacing:g} mm model grid")
    grid = head_grid(image, spacing)
    coarse, fine_grid, fine = preset_inputs(image, grid, plan)
    if check():
        raise Cancelled("cancelled")
    stages = stage_plan(*plan.passes,
                        refined=plan.intensity and worth_refining(image.GetSpacing(), grid.spacing_mm),
                        bf16=autocast_dtype(device, settings.precision) == torch.bfloat16)
    result, used_device = _sample_with_fallback(model, coarse, fine, plan, settings, device, report, check, stages)
    grid = fine_grid or grid  # the grid the result lies on
    # calibrated probabilities: same most likely label, honest confidence
    temperature = temperature_for(loaded.config, settings.preset)
    temperatures = temperature_field(result.mean, grid.spacing_mm, temperature)  # fitted near the brain only
    error_prob = error_probability(temper(result.mean, temperatures))
    source_spacing = image.GetSpacing()  # the detail the scan really has, whatever grid it is answered on
    if settings.output_mm:
        report(stages.fit, f"answering on a grid of at most {settings.output_mm:g} mm")
        image = finer_output_grid(image, settings.output_mm)
    if plan.intensity:
        report(stages.fit, "fitting this scan's intensities")
    intensity = intensity_model_for(result.mean, grid, image, plan, settings.seed, source_spacing)
    step = "labels at the scan's voxels, sharpened by its intensities" if intensity else "mapping labels back to the input grid"
    report(stages.backproject, step)

    def slab_done(fraction: float) -> None:  # the back-projection reports and can be cancelled slab by slab
        if check():
            raise Cancelled("cancelled")
        report(stages.in_backprojection(fraction), step)

    labels, unc = backproject(
        result.mean, grid, image, tree.channel_to_aseg,
        uncertainty=error_prob if settings.uncertainty else None, progress=slab_done, intensity=intensity,
        temperature=temperatures,
    )
    arr = sitk.GetArrayViewFromImage(labels)
    volumes = structure_volumes(np.asarray(arr), image.GetSpacing(), tree)
    if loaded.trained and settings.check_brain:
        _check_brain_like(volumes.get(tree.root.id, 0.0))
    # the delivered map's mean over the voxels it labels (the sidecar's brain_mean_uncertainty)
    mean_uncertainty = None if unc is None else uncertainty_by_structure(arr, sitk.GetArrayViewFromImage(unc), tree)[1]
    info = {
        "model": loaded.name,
        "trained": loaded.trained,
        "device": str(used_device),
        "preset": settings.preset,
        "spacing_mm": spacing,
        "steps": plan.steps,
        "samples": plan.samples,
        "mirror": plan.mirrored,
        "refine_mm": plan.refine_mm,
        "intensity_refined": intensity is not None,
        "output_spacing_mm": [round(float(s), 4) for s in image.GetSpacing()],
        "seed": settings.seed,
        "seconds": round(time.time() - t_start, 2),
        "calibration_temperature": temperature,
        "mean_uncertainty": mean_uncertainty,
        "grid_origin_ras": list(grid.origin_ras),
        "grid_shape": list(grid.shape),
    }
    report(1.0, "done")
    return SegmentationResult(labels, unc, volumes, tree, info)


def _sample_with_fallback(model, coarse, fine, plan, settings, device, report, check, stages):
    """Sample on ``device``; on out-of-memory retry in windows, then on the CPU, with a warning.
    ``coarse``/``fine``: the tensors of :func:`preset_inputs`, made once for every attempt."""
    attempts: list[tuple[torch.device, bool | None]] = [(device, None)]
    if device.type != "cpu":
        attempts += [(device, True), (torch.device("cpu"), True)]
    else:
        attempts += [(device, True)]
    last_exc: BaseException | None = None
    for dev, windowed in attempts:
        try:
            model.to(dev)
            res = sample_multiscale(
                model, coarse, plan, settings.seed, dev, settings.precision, windowed,
                progress=lambda f, m: report(stages.in_sampling(f), m), cancel=check,
                mirror_permutation=load_tree().flip_permutation if plan.mirror else None, fine=fine,
            )
            return res, dev
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_out_of_memory(exc):
                raise
            last_exc = exc
            msg = f"out of memory on {dev}{' (windowed)' if windowed else ''}; retrying with less memory"
            warnings.warn(msg)
            log.warning(msg)
            report(stages.sampling, msg)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    raise InputError(f"out of memory even with windowed inference on the CPU ({last_exc})")


def _check_brain_like(brain_ml: float) -> None:
    lo, hi = BRAIN_ML_RANGE
    if not lo <= brain_ml <= hi:
        raise InputError(
            f"segmented brain volume {brain_ml:.0f} mL is implausible ({lo:.0f}-{hi:.0f} mL expected): "
            "the input does not look like a T1-weighted brain MRI"
        )
