"""Calibration: temperature scaling keeps every label, recovers a known over-confidence, is stored
in the model JSON and is what the uncertainty map reports."""
import json
import shutil

import numpy as np
import pytest
import torch

from msdseg.core.settings import Preset
from msdseg.evaluation.calibrate import fit_temperature, write_calibration
from msdseg.inference.calibration import error_probability, temper, temperature_for

pytestmark = pytest.mark.unit


def test_temper_keeps_the_most_likely_label_and_softens_with_temperature():
    probs = torch.softmax(torch.randn(5, 4, 3, 2) * 3, dim=0)
    assert torch.equal(temper(probs, 1.0), probs)
    soft = temper(probs, 2.0)
    torch.testing.assert_close(soft.sum(0), torch.ones(4, 3, 2))
    assert torch.equal(soft.argmax(0), probs.argmax(0))
    assert bool((error_probability(soft) >= error_probability(probs) - 1e-6).all())
    assert error_probability(probs).shape == (1, 4, 3, 2)


def _single_corner(log_probs: np.ndarray, correct: np.ndarray):
    """Voxels that sit exactly on a model-grid point (one corner carries all the weight)."""
    from msdseg.evaluation.calibration_voxels import InputGridVoxels

    n, c = log_probs.shape
    corners = np.repeat(log_probs[:, None, :], 8, axis=1).astype(np.float32)
    weights = np.zeros((n, 8), np.float32)
    weights[:, 0] = 1.0
    return InputGridVoxels(torch.from_numpy(corners), torch.from_numpy(weights), correct, log_probs.argmax(1))


def test_fit_recovers_a_known_overconfidence():
    """Labels drawn from softmax(z / 2) while the model claims softmax(z): the fit finds T = 2."""
    from msdseg.evaluation.calibration_voxels import InputGridVoxels

    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (40_000, 6))
    true_p = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    target = np.array([rng.choice(6, p=p) for p in true_p])
    claimed = z - np.log(np.exp(z).sum(1, keepdims=True))
    overconfident = _single_corner(claimed, claimed.argmax(1) == target)
    assert fit_temperature(overconfident) == pytest.approx(2.0, abs=0.1)
    # weights: a part that is right about itself pulls the pooled value toward 1
    calibrated = _single_corner(z / 2 - np.log(np.exp(z / 2).sum(1, keepdims=True)), claimed.argmax(1) == target)
    honest = fit_temperature(calibrated)
    assert honest == pytest.approx(1.0, abs=0.1)
    pooled = fit_temperature(InputGridVoxels.concat([overconfident, calibrated]))
    assert honest < pooled < 2.0


def test_input_grid_voxels_interpolate_like_the_uncertainty_map():
    """A voxel between model-grid points states the trilinear blend of its corners' confidence
    (what backproject writes), and its label is the argmax of the blended probabilities."""
    from msdseg.inference.calibration import error_probability, temper
    from msdseg.evaluation.calibration_voxels import gather, inside

    probs = torch.softmax(torch.randn(4, 5, 6, 7) * 3, dim=0)
    points = np.array([[1.0, 2.0, 3.0], [1.5, 2.25, 3.75], [0.2, 4.9, 5.5], [4.0, 5.0, 6.0]])
    assert inside(points, probs.shape[1:]).all() and not inside(points + 0.5, probs.shape[1:]).all()
    ref = np.array([0, 1, 2, 3])
    vox = gather(probs, points, ref)
    norm = torch.from_numpy(points / (np.array(probs.shape[1:]) - 1) * 2 - 1).float()
    grid = norm.flip(-1)[None, None, None]  # grid_sample order (z, y, x)
    for t in (1.0, 2.5):
        unc = torch.nn.functional.grid_sample(error_probability(temper(probs, t))[None], grid,
                                              mode="bilinear", align_corners=True)[0, 0, 0, 0]
        np.testing.assert_allclose(vox.confidence(t), 1 - unc.numpy(), atol=1e-5)
    mean = torch.nn.functional.grid_sample(probs[None], grid, mode="bilinear", align_corners=True)[0, :, 0, 0]
    assert np.array_equal(vox.predicted, mean.argmax(0).numpy())
    assert np.array_equal(vox.correct, vox.predicted == ref)
    kept = vox.subset(vox.predicted != vox.predicted[0])
    assert len(kept) == int((vox.predicted != vox.predicted[0]).sum()) and kept.log_corners.shape[1:] == (8, 4)


@pytest.mark.integration
def test_temperature_is_read_from_the_model_json(tmp_path):
    from msdseg.model.modelfile import default_model_path

    assert temperature_for({}, "balanced") == 1.0
    shipped = default_model_path()
    weights = tmp_path / "m.safetensors"
    shutil.copy(shipped, weights)
    shutil.copy(shipped.with_suffix(".json"), tmp_path / "m.json")
    write_calibration(weights, {"presets": {"balanced": {"temperature": 3.0}}})
    cfg = json.loads((tmp_path / "m.json").read_text())
    assert temperature_for(cfg, "balanced") == 3.0 and temperature_for(cfg, "fast") == 1.0
    assert cfg["sha256"] == json.loads(shipped.with_suffix(".json").read_text())["sha256"]


@pytest.mark.slow
def test_uncertainty_map_is_the_calibrated_error_probability(tmp_path, oblique_phantom):
    """Same labels with any temperature; a hotter model says it is less sure everywhere."""
    import SimpleITK as sitk

    from msdseg.core.settings import SegmentSettings

    from msdseg.inference.pipeline import segment_image
    from msdseg.model.modelfile import default_model_path

    shipped = default_model_path()
    maps = {}
    for t in (1.0, 3.0):
        weights = tmp_path / f"t{t:g}.safetensors"
        shutil.copy(shipped, weights)
        shutil.copy(shipped.with_suffix(".json"), weights.with_suffix(".json"))
        write_calibration(weights, {"presets": {"fast": {"temperature": t}}})
        res = segment_image(oblique_phantom, SegmentSettings(preset="fast", model=str(weights), uncertainty=True,
                                                          check_brain=False))
        assert res.info["calibration_temperature"] == t
        maps[t] = (sitk.GetArrayFromImage(res.labels), sitk.GetArrayFromImage(res.uncertainty))
    assert np.array_equal(maps[1.0][0], maps[3.0][0])
    inside = maps[1.0][1] > 0  # voxels the model grid covers
    assert inside.any() and maps[3.0][1][inside].mean() > maps[1.0][1][inside].mean()
    assert bool((maps[3.0][1] >= maps[1.0][1] - 1e-5).all())
    assert 0.0 <= maps[1.0][1].min() and maps[3.0][1].max() < 1.0


@pytest.mark.slow
def test_calibration_refuses_sources_without_a_complete_map():
    """Voxels of a partial map have no true label, so such maps cannot calibrate; say so."""
    from msdseg.evaluation.calibrate import collect_cases
    from msdseg.core.errors import InputError
    from msdseg.model.network import MultiscaleDiffUNet
    from test_training import MODEL, _generator

    params = Preset("test", spacing_mm=4.0, steps=1, samples=1, mirror=False, intensity=False)
    with pytest.raises(InputError, match="complete label maps"):
        collect_cases(MultiscaleDiffUNet(MODEL), _generator(), 1, params, seed=0, mirror_permutation=None)


def test_real_cases_leave_painted_only_leaves_unscored(tmp_path):
    """A training map's painted-only leaves (IBSR's cortex) are not a reference the model is meant
    to match, so the real-image part of the fit does not score their voxels."""
    from msdseg.evaluation.calibrate import real_training_cases

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"maps": [
        {"source": "deepmriprep", "name": "ibsr", "role": "train", "path": "a.nii.gz", "t1": "a_t1.nii.gz",
         "painted_only": [3, 42], "merged": [[4, 5], [43, 44]]},
        {"source": "x", "name": "y", "role": "train", "path": "b.nii.gz", "t1": "b_t1.nii.gz"},
        {"source": "x", "name": "z", "role": "train", "path": "c.nii.gz"},
        {"source": "fsaverage", "name": "fsaverage", "role": "heldout", "path": "d.nii.gz", "t1": "d_t1.nii.gz"},
    ]}))
    cases = real_training_cases(manifest)
    assert [c["name"] for c in cases] == ["deepmriprep/ibsr", "x/y"]
    assert cases[0]["unscored"] == [3, 42, 4, 5, 43, 44] and cases[1]["unscored"] == []


def test_synthetic_cases_are_whole_brain_1mm_t1_scans_from_nearly_complete_maps():
    """The fit's synthetic part keeps the training ranges except thick slices, cut fields of view
    and random contrasts, and takes maps lacking one leaf (SAMSEG has no CSF leaf) but not partial ones."""
    from dataclasses import asdict

    from msdseg.evaluation.calibrate import calibration_synth_config, missing_leaves
    from msdseg.training.synth import SynthConfig

    cal, train = asdict(calibration_synth_config()), asdict(SynthConfig())
    changed = ("thick_slice_prob", "fov_prob", "t1_prior_prob")
    assert cal["thick_slice_prob"] == 0.0 and cal["fov_prob"] == 0.0 and cal["t1_prior_prob"] == 1.0
    assert train["t1_prior_prob"] < 1.0  # training does draw random contrasts
    assert {k: v for k, v in cal.items() if k not in changed} == {k: v for k, v in train.items() if k not in changed}
    complete = np.ones(33, bool)
    assert not missing_leaves(complete).any()
    no_csf = complete.copy()
    no_csf[[0, 32]] = False  # background is marked undefined whenever a leaf is
    assert np.flatnonzero(missing_leaves(no_csf)).tolist() == [32]
    no_cortex = complete.copy()
    no_cortex[[0, 1, 15]] = False
    assert missing_leaves(no_cortex) is None


def test_calibration_runs_of_different_presets_merge_when_fitted_on_the_same_cases():
    from msdseg.evaluation.calibrate import merge_calibration

    first = {"fitted_on": "8 cases, seed 1", "command": "python -m msdseg.evaluation.calibrate --data D --presets balanced --cases 8 --seed 1",
             "presets": {"balanced": {"temperature": 2.0}, "fast": {"temperature": 2.0, "borrowed_from": "balanced"},
                         "accurate": {"temperature": 2.0, "borrowed_from": "balanced"}}}
    second = {"fitted_on": "8 cases, seed 1", "command": "python -m msdseg.evaluation.calibrate --data D --presets fast accurate --cases 8 --seed 1",
              "presets": {"fast": {"temperature": 2.2}, "accurate": {"temperature": 1.8},
                          "balanced": {"temperature": 2.2, "borrowed_from": "fast"}}}
    merged = merge_calibration(first, second)
    assert merged["presets"] == {"balanced": {"temperature": 2.0}, "fast": {"temperature": 2.2},
                                 "accurate": {"temperature": 1.8}}
    assert "--presets fast accurate balanced --cases 8" in merged["command"]
    # other cases: nothing of the earlier run is kept
    assert merge_calibration(first, {**second, "fitted_on": "8 cases, seed 2"})["presets"] == second["presets"]
    # a run that fits balanced itself replaces the earlier balanced value
    again = {**first, "presets": {**first["presets"], "balanced": {"temperature": 1.5}}}
    assert merge_calibration(first, again)["presets"]["balanced"] == {"temperature": 1.5}


@pytest.mark.unit
def test_the_temperature_fades_to_one_far_from_the_brain():
    """Fitted near the labels, the temperature must not soften empty space: at 12 mm and beyond
    the network's own probabilities are stated, within 6 mm the fitted temperature holds."""
    import torch

    from msdseg.inference.calibration import (CALIBRATED_MM, UNCALIBRATED_MM, error_probability, temper,
                                              temperature_field)

    probs = torch.zeros(3, 40, 8, 8)
    probs[0] = 0.99999
    probs[1:] = 0.000005
    probs[:, :4] = torch.tensor([0.1, 0.8, 0.1])[:, None, None, None]  # brain in the first 4 columns (2 mm)
    field = temperature_field(probs, 2.0, 3.0)
    assert field.shape == (1, 40, 8, 8)
    distance_mm = (torch.arange(40) - 3).clamp(min=0) * 2.0
    near, far = distance_mm <= CALIBRATED_MM, distance_mm >= UNCALIBRATED_MM
    assert torch.allclose(field[0, near, 0, 0], torch.tensor(3.0))
    assert torch.allclose(field[0, far, 0, 0], torch.tensor(1.0))
    assert (field[0, 1:, 0, 0] <= field[0, :-1, 0, 0] + 1e-6).all()
    u = error_probability(temper(probs, field))[0, :, 0, 0]
    assert u[far].max() < 1e-4 and u[:4].min() > 0.2
    assert temperature_field(probs, 2.0, 1.0) == 1.0
