"""The one inference entry point every front end calls (CLI, Slicer module, web app, cohorts).

volume -> RAS model grid at the preset's entry depth -> normalise -> image features (once) ->
DDIM sampling with SUF, S samples reduced on the fly -> probabilities -> exact input grid ->
aseg labels + uncertainty (calibrated probability that a voxel's label is wrong) + volumes.  Progress goes to a callback, cancellation is polled.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import SimpleITK as sitk
import torch

from .backproject import backproject, fit_voxels
from .calibration import error_probability, temper, temperature_for
from .devices import autocast_dtype, is_out_of_memory, resolve_device
from .diffusion import SamplingResult, ddim_sample
from .errors import Cancelled, InputError
from .geometry import ModelGrid, head_grid, image_on_grid
from .intensity_refine import BAND, FIT_VOXELS, IntensityModel, fit_intensity_model, worth_refining
from .io import squeeze_to_3d, validate_image
from .labels import LabelTree, load_tree
from .modelfile import LoadedModel, load_model
from .presets import PRESETS
from .sidecar import uncertainty_by_structure
from .volumes import structure_volumes

log = logging.getLogger("msdseg")

#: Above this many voxels at the entry depth on a CPU, denoise in overlapping windows.
WINDOW_THRESHOLD_VOXELS = 3_000_000
WINDOW_ROI = (96, 96, 96)

#: Plausible total brain volume (mL); outside it the input is most likely not a brain T1.
BRAIN_ML_RANGE = (400.0, 2600.0)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


@dataclass
class SegmentSettings:
    preset: str = "balanced"
    device: str = "auto"
    steps: int | None = None
    samples: int | None = None
    uncertainty: bool = False
    seed: int = 0
    model: str | None = None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    spacing_mm: float | None = None  # override the preset's entry resolution
    check_brain: bool = True  # reject results whose brain volume is implausible
    mirror: bool | None = None  # every other sample sees the left/right-mirrored image (None: preset)
    refine_mm: float | None = None  # finish at this finer spacing (0 = no refinement; None: preset)
    intensity: bool | None = None  # sharpen with the scan's own intensities (msdseg.intensity_refine; None: preset)

    def resolved(self) -> dict[str, Any]:
        if self.preset not in PRESETS:
            raise InputError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        p = dict(PRESETS[self.preset])
        if self.steps is not None:
            if self.steps < 0:
                raise InputError("--steps must be 0 (one deterministic pass) or more")
            p["steps"] = self.steps
        if self.samples is not None:
            if self.samples < 1:
                raise InputError("--samples must be at least 1")
            p["samples"] = self.samples
        if self.spacing_mm is not None:
            p["spacing_mm"] = self.spacing_mm
        if self.mirror is not None:
            p["mirror"] = self.mirror
        if self.refine_mm is not None:
            if self.refine_mm < 0:
                raise InputError("--refine must be a spacing in mm, or 0 for no refinement")
            p["refine_mm"] = self.refine_mm or None
        if self.intensity is not None:
            p["intensity"] = self.intensity
        if p.get("refine_mm") and (float(p["refine_mm"]) >= float(p["spacing_mm"]) or int(p["steps"]) == 0):
            p["refine_mm"] = None  # nothing finer to go to, or a deterministic pass: no refinement
        return p


@dataclass
class SegmentationResult:
    labels: sitk.Image
    uncertainty: sitk.Image | None
    volumes: dict[str, float]
    tree: LabelTree
    info: dict[str, Any] = field(default_factory=dict)


_MODEL_CACHE: dict[tuple[str, str], LoadedModel] = {}


def get_model(path: str | None, device: torch.device) -> LoadedModel:
    """Load once per (file, device): cohorts and worker processes reuse the network."""
    key = (str(path), str(device))
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
    params = settings.resolved()
    image = squeeze_to_3d(image)
    validate_image(image, "input")
    device = resolve_device(settings.device)
    loaded = get_model(settings.model, device)
    model = loaded.model
    tree = load_tree()
    spacing = float(params["spacing_mm"])
    for mm in (spacing, params.get("refine_mm")):  # an unknown spacing fails before any resampling
        if mm:
            model.cfg.depth_of(float(mm))
    report(0.02, f"placing the {spacing:g} mm model grid")
    grid = head_grid(image, spacing)
    coarse, fine_grid, fine = preset_inputs(image, grid, params)
    if check():
        raise Cancelled("cancelled")
    result, used_device = _sample_with_fallback(model, coarse, fine, params, settings, device, report, check)
    grid = fine_grid or grid  # the grid the result lies on
    # calibrated probabilities: same most likely label, honest confidence (msdseg.calibration)
    temperature = temperature_for(loaded.config, settings.preset)
    error_prob = error_probability(temper(result.mean, temperature))
    if params.get("intensity"):
        report(0.90, "fitting this scan's intensities")
    intensity = intensity_model_for(result.mean, grid, image, params, settings.seed)
    step = "labels at the scan's voxels, sharpened by its intensities" if intensity else "mapping labels back to the input grid"
    report(0.92, step)

    def slab_done(fraction: float) -> None:  # the back-projection reports and can be cancelled slab by slab
        if check():
            raise Cancelled("cancelled")
        report(0.92 + 0.07 * fraction, step)

    labels, unc = backproject(
        result.mean, grid, image, tree.channel_to_aseg,
        uncertainty=error_prob if settings.uncertainty else None, progress=slab_done, intensity=intensity,
        temperature=temperature,
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
        "steps": int(params["steps"]),
        "samples": int(params["samples"]),
        "mirror": bool(params["mirror"]) and int(params["samples"]) > 1 and int(params["steps"]) > 0,
        "refine_mm": params.get("refine_mm"),
        "intensity_refined": intensity is not None,
        "seed": settings.seed,
        "seconds": round(time.time() - t_start, 2),
        "calibration_temperature": temperature,
        "mean_uncertainty": mean_uncertainty,
        "grid_origin_ras": list(grid.origin_ras),
        "grid_shape": list(grid.shape),
    }
    report(1.0, "done")
    return SegmentationResult(labels, unc, volumes, tree, info)


def intensity_model_for(
    probs: torch.Tensor, grid: ModelGrid, image: sitk.Image, params: Mapping[str, Any], seed: int,
) -> IntensityModel | None:
    """The scan's fitted intensity model when the preset asks for it and the scan is fine enough
    to add detail to ``grid`` (:mod:`msdseg.intensity_refine`); None otherwise."""
    if not params.get("intensity") or not worth_refining(image.GetSpacing(), grid.spacing_mm):
        return None
    voxels = fit_voxels(probs, grid, image, BAND, FIT_VOXELS, seed)
    return None if voxels is None else fit_intensity_model(*voxels)


def predict_on_grid(
    model: torch.nn.Module,
    grid: ModelGrid,
    values: np.ndarray,
    entry: int,
    steps: int,
    samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    windowed: bool | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    mirror_permutation: np.ndarray | None = None,
) -> SamplingResult:
    """Sampling on a prepared model grid (also used by evaluation and the training tests).

    With ``mirror_permutation`` (the tree's left/right channel swap) every other sample sees the
    image mirrored along the grid's x (left-right) axis; its answers are mirrored back and their
    left/right channels swapped before they join the ensemble.  The test-time augmentation costs
    one more image-encoder pass (the samples cost the same either way); on the held-out T1 it
    raised mean Dice more than a second unmirrored sample did (docs/model_card.md).
    """
    image, coords = _as_tensors(grid, values)
    return sample_ensemble(model, image, coords, entry, steps, samples, seed, device, precision, windowed,
                           progress, cancel, mirror_permutation)


def _as_tensors(grid: ModelGrid, values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 1, X, Y, Z), coordinates (1, 3, X, Y, Z)) of normalised values on ``grid``."""
    return torch.from_numpy(values)[None, None].float(), torch.from_numpy(grid.coordinates())[None]


def preset_inputs(
    image: sitk.Image, grid: ModelGrid, params: Mapping[str, Any]
) -> tuple[tuple[torch.Tensor, torch.Tensor], ModelGrid | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """What :func:`sample_multiscale` needs for ``image``: its tensors on ``grid`` and, when the
    preset refines, the finer grid of the same field of view and its tensors there."""
    coarse = _as_tensors(grid, image_on_grid(image, grid))
    if not params.get("refine_mm"):
        return coarse, None, None
    fine_grid = grid.at_spacing(float(params["refine_mm"]))
    return coarse, fine_grid, _as_tensors(fine_grid, image_on_grid(image, fine_grid))


def sample_multiscale(
    model: torch.nn.Module, coarse: tuple[torch.Tensor, torch.Tensor], params: dict[str, Any],
    seed: int = 0, device: torch.device | str = "cpu", precision: str = "auto", windowed: bool | None = None,
    progress: ProgressFn | None = None, cancel: CancelFn | None = None,
    mirror_permutation: np.ndarray | None = None, fine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SamplingResult:
    """A preset's sampling: the ensemble at ``params['spacing_mm']`` and, when the preset refines
    and ``fine`` (image, coordinates at ``params['refine_mm']``, same field of view) is given, a
    coarse-to-fine finish.

    Why coarse to fine: the coarse depth is wide and sees the whole head, so it places and names
    every structure; the fine depth resolves borders a coarse voxel cannot (the 0.5 mL temporal
    horns are a few 2 mm voxels thick).  The coarse mean, upsampled, is noised to step
    ``refine_start`` of the same schedule and the remaining steps run at the fine depth
    (``refine_samples`` chains, the first unmirrored).  Both grids come from
    :meth:`ModelGrid.at_spacing`, so every coarse voxel is an exact block of fine ones.
    """
    steps, samples = int(params["steps"]), int(params["samples"])
    image, coords = coarse
    share = 1.0 if fine is None or not params.get("refine_mm") else 0.5
    coarse_res = sample_ensemble(
        model, image, coords, model.cfg.depth_of(float(params["spacing_mm"])), steps, samples, seed, device,
        precision, windowed, _scaled(progress, 0.0, share), cancel, mirror_permutation,
    )
    if share == 1.0:
        return coarse_res
    fine_image, fine_coords = fine  # type: ignore[misc]
    init = torch.nn.functional.interpolate(
        coarse_res.mean[None].float(), size=tuple(fine_image.shape[2:]), mode="trilinear", align_corners=False
    )[0]
    del coarse_res
    return sample_ensemble(
        model, fine_image, fine_coords, model.cfg.depth_of(float(params["refine_mm"])), steps,
        int(params.get("refine_samples", 1)), seed, device, precision, windowed,
        _scaled(progress, share, 1.0), cancel, mirror_permutation,
        init=init, start_step=int(params.get("refine_start", steps - 1)),
    )


def _scaled(progress: ProgressFn | None, lo: float, hi: float) -> ProgressFn | None:
    """Progress of one part of the work mapped onto [lo, hi] of the whole."""
    if progress is None:
        return None
    return lambda f, m: progress(lo + (hi - lo) * f, m)


def sample_ensemble(
    model: torch.nn.Module,
    image: torch.Tensor,
    coords: torch.Tensor,
    entry: int,
    steps: int,
    samples: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    windowed: bool | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
    mirror_permutation: np.ndarray | None = None,
    init: torch.Tensor | None = None,
    start_step: int = 0,
) -> SamplingResult:
    """:func:`predict_on_grid` for an image (1, 1, X, Y, Z) and its coordinates (1, 3, X, Y, Z)
    already at the entry spacing (a synthetic case, for calibration).  ``init``/``start_step``:
    start from a given answer part-way through the schedule (:func:`ddim_sample`)."""
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    image = image.float().to(device)
    coords = coords.to(device)
    shape = (model.cfg.n_classes, *image.shape[2:])
    if windowed is None:
        windowed = device.type == "cpu" and int(np.prod(image.shape[2:])) > WINDOW_THRESHOLD_VOXELS
    ctx = lambda: torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    with torch.inference_mode():
        views = [_denoiser(model, image, coords, entry, ctx, windowed)]
        if mirror_permutation is not None and samples > 1 and steps > 0:
            perm = torch.as_tensor(np.asarray(mirror_permutation), device=device)
            views.append(_mirrored(_denoiser(model, image.flip(2), coords, entry, ctx, windowed), perm))
        return ddim_sample(
            views, shape, steps=steps, samples=samples, seed=seed, device=device,
            progress=progress, cancel=cancel, init=None if init is None else init.to(device), start_step=start_step,
        )


def _denoiser(model, image, coords, entry, ctx, windowed: bool):
    """x0 probabilities for (x_t, t); the image encoder runs once here, not at every step."""
    if windowed:
        return _windowed_denoiser(model, image, coords, entry, ctx)
    with ctx():
        feats = model.encode_image(image, coords, entry)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with ctx():
            logits = model.denoise(feats, x_t, t, entry)[0]
        return torch.softmax(logits.float(), dim=1)

    return denoise


def _mirrored(denoise_mirrored, perm: torch.Tensor):
    """Wrap a denoiser that sees the mirrored image so that it answers in the original frame."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoise_mirrored(x_t.flip(2)[:, perm], t).flip(2)[:, perm]

    return denoise


def _windowed_denoiser(model, image, coords, entry, ctx):
    """Denoise in overlapping windows with MONAI's sliding-window inference (bounded memory)."""
    from monai.inferers import sliding_window_inference

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        stacked = torch.cat([image, coords, x_t], dim=1)

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            with ctx():
                logits = model(patch[:, :1], patch[:, 4:], t.expand(patch.shape[0]), entry, patch[:, 1:4])[0]
            return torch.softmax(logits.float(), dim=1)

        roi = tuple(min(r, s) for r, s in zip(WINDOW_ROI, image.shape[2:]))
        return sliding_window_inference(stacked, roi, 1, predictor, overlap=0.25, mode="gaussian")

    return denoise


def _sample_with_fallback(model, coarse, fine, params, settings, device, report, check):
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
                model, coarse, params, settings.seed, dev, settings.precision, windowed,
                progress=lambda f, m: report(0.05 + 0.85 * f, m), cancel=check,
                mirror_permutation=load_tree().flip_permutation if params["mirror"] else None, fine=fine,
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
            report(0.05, msg)
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
