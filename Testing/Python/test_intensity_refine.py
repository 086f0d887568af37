"""Intensity refinement: the scan's own intensities move a blurred border to where the scan has it."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_image
from msdseg.inference.backproject import backproject, fit_voxels
from msdseg.evaluation.calibration_voxels import gather, gather_refined, interpolated
from msdseg.core.geometry import ModelGrid
from msdseg.core.settings import SegmentSettings
from msdseg.inference.intensity import BAND, IntensityModel, fit_intensity_model, worth_refining

pytestmark = pytest.mark.unit


def _soft(true_class: np.ndarray, n_classes: int, sure: float) -> torch.Tensor:
    p = np.full((n_classes, true_class.size), (1 - sure) / (n_classes - 1), np.float32)
    p[true_class, np.arange(true_class.size)] = sure
    return torch.from_numpy(p)


def test_fit_recovers_each_class_intensity():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 3, 20_000)  # classes 1 and 2; background (0) has no voxel of its own
    means, sds = np.array([0.0, 30.0, 80.0]), np.array([1.0, 4.0, 6.0])
    values = torch.from_numpy((means[true] + sds[true] * rng.normal(size=true.size)).astype(np.float32))
    model = fit_intensity_model(_soft(true, 3, 0.8), values)
    assert model is not None
    assert np.allclose(model.means[1:].numpy(), means[1:], atol=0.5)
    assert np.allclose(model.variances[1:].sqrt().numpy(), sds[1:], rtol=0.1)


def test_posterior_follows_the_intensity_where_the_network_hesitates_and_not_where_it_is_sure():
    model = IntensityModel(torch.tensor([0.0, 30.0, 80.0]), torch.tensor([1.0, 16.0, 36.0]))
    probs = torch.tensor([[0.01, 0.01, 0.99], [0.59, 0.05, 0.005], [0.40, 0.94, 0.005]])  # (C, N)
    q = model.posterior(probs, torch.tensor([80.0, 80.0, 30.0]))
    assert int(q[:, 0].argmax()) == 2  # hesitant between 1 and 2; the intensity says 2
    assert int(q[:, 1].argmax()) == 2  # even a sure voxel gives way to a clear intensity ...
    assert torch.equal(q[:, 2], probs[:, 2])  # ... but background beyond the band is left alone


def test_no_voxel_in_the_band_gives_no_model():
    probs = torch.zeros(3, 500)
    probs[0] = 1.0
    assert fit_intensity_model(probs, torch.rand(500)) is None


def test_worth_refining_scans_with_detail_along_at_least_two_axes():
    """A thick-slice scan is still sharp within its slices; a scan coarse in every direction is not."""
    assert worth_refining((1.0, 1.0, 1.0), 2.0)
    assert worth_refining((0.9, 0.9, 1.5), 2.0)
    assert worth_refining((1.0, 1.0, 5.0), 2.0)  # in-plane detail of a 5 mm slice stack
    assert worth_refining((5.0, 1.0, 1.0), 2.0)  # whichever axis the slices are stacked along
    assert not worth_refining((1.0, 3.0, 3.0), 2.0)
    assert not worth_refining((2.0, 2.0, 2.0), 2.0)
    assert not worth_refining((3.0, 3.0, 3.0), 2.0)


def _border_case():
    """A 1 mm scan whose two tissues meet at RAS x = 0 (bright on the right), and a 2 mm answer
    that puts their border 3 mm too far right: what interpolating a coarse answer does to a thin
    structure."""
    rng = np.random.default_rng(1)

    def intensity(lps):  # LPS x = -RAS x
        ras_x = -lps[..., 0]
        return np.where(ras_x < 0, 40.0, 100.0) + rng.normal(0, 3.0, ras_x.shape)

    img = make_image((30, 12, 12), (1.0, 1.0, 1.0), np.eye(3), (0.0, 0.0, 0.0), intensity)
    grid = ModelGrid((-20.0, -10.0, -10.0), 2.0, (21, 11, 11))
    x = grid.origin_ras[0] + 2.0 * np.arange(grid.shape[0])
    tissue_b = 1 / (1 + np.exp(-(x - 3.0) / 1.5))  # the network's border at +3 mm
    probs = np.zeros((3, *grid.shape), np.float32)
    probs[0] = 0.001
    probs[1] = (0.999 * (1 - tissue_b))[:, None, None]
    probs[2] = (0.999 * tissue_b)[:, None, None]
    return img, grid, torch.from_numpy(probs)


def _ras_x(img: sitk.Image) -> np.ndarray:
    """RAS x of every voxel, in SimpleITK's (k, j, i) array order."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in img.GetSize()[::-1]], indexing="ij")
    lps = np.stack([i, j, k], -1) @ np.diag(img.GetSpacing()) @ np.reshape(img.GetDirection(), (3, 3)).T + img.GetOrigin()
    return -lps[..., 0]


def test_backprojection_with_the_scans_intensities_puts_the_border_where_the_scan_has_it():
    img, grid, probs = _border_case()
    lut = np.array([0, 5, 9])
    truth = np.where(_ras_x(img) < 0, 5, 9)
    plain, _ = backproject(probs, grid, img, lut)
    plain_arr = sitk.GetArrayFromImage(plain)
    assert (plain_arr != truth).mean() > 0.05, "the coarse answer must miss the border to begin with"
    voxels = fit_voxels(probs, grid, img, BAND, 100_000)
    assert voxels is not None
    model = fit_intensity_model(*voxels)
    assert model is not None
    refined, unc = backproject(probs, grid, img, lut, uncertainty=probs[:1], intensity=model, temperature=2.0)
    assert np.array_equal(sitk.GetArrayFromImage(refined), truth)
    u = sitk.GetArrayFromImage(unc)
    assert u.min() >= 0 and u.max() <= 1
    # the uncertainty belongs to the refined label: low on clear tissue away from both borders
    assert u[np.abs(_ras_x(img)) > 6].max() < 0.2
    before = sitk.GetArrayViewFromImage(img).copy()
    backproject(probs, grid, img, lut, intensity=model)
    assert np.array_equal(sitk.GetArrayViewFromImage(img), before), "the input is never modified"


def test_calibration_voxels_state_the_refined_posterior():
    img, grid, probs = _border_case()
    model = fit_intensity_model(*fit_voxels(probs, grid, img, BAND, 100_000))
    points = np.array([[10.0, 5.0, 5.0], [11.25, 5.0, 5.0], [15.0, 5.0, 5.0]])  # grid indices
    values = np.array([40.0, 100.0, 100.0], np.float32)
    ref = np.array([1, 2, 2])
    v = gather_refined(probs, points, ref, values, model)
    q = model.posterior(interpolated(gather(probs, points, ref)).T.contiguous(), torch.from_numpy(values)).T
    assert np.array_equal(v.predicted, q.argmax(1).numpy())
    assert v.correct.all()
    assert np.allclose(v.confidence(1.0), q.max(1).values.numpy(), atol=1e-5)
    assert (v.confidence(3.0) <= v.confidence(1.0) + 1e-6).all()  # a temperature only softens


def test_presets_refine_by_default_and_the_setting_turns_it_off():
    assert SegmentSettings().resolved().intensity is True
    assert SegmentSettings(preset="fast").resolved().intensity is True
    assert SegmentSettings(intensity=False).resolved().intensity is False


@pytest.mark.slow
def test_segmenting_reports_the_refinement_and_can_be_cancelled_while_mapping_back(untrained_model):
    from conftest import phantom_fn
    from msdseg.core.errors import Cancelled
    from msdseg.inference.pipeline import segment_image

    img = make_image((100, 124, 100), (1.5, 1.5, 1.5), np.eye(3), (0.0, 0.0, 0.0), phantom_fn)
    messages: list[tuple[float, str]] = []
    fast = SegmentSettings(preset="fast", device="cpu", model=untrained_model, check_brain=False)
    res = segment_image(img, fast, progress=lambda f, m: messages.append((f, m)))
    assert res.info["intensity_refined"] is True
    assert any("intensities" in m for _, m in messages)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions), "progress only moves forward"
    off = segment_image(img, SegmentSettings(preset="fast", device="cpu", model=untrained_model,
                                             check_brain=False, intensity=False, uncertainty=True))
    assert off.info["intensity_refined"] is False
    assert res.uncertainty is None and res.info["mean_uncertainty"] is None  # no map, no mean
    labelled = sitk.GetArrayFromImage(off.labels) > 0  # else the mean of the delivered map over what it labels
    assert labelled.any()
    assert off.info["mean_uncertainty"] == pytest.approx(float(sitk.GetArrayFromImage(off.uncertainty)[labelled].mean()))
    steps: list[str] = []
    with pytest.raises(Cancelled):  # cancelled once the labels are being mapped back
        segment_image(img, fast, progress=lambda f, m: steps.append(m),
                      cancel=lambda: bool(steps) and steps[-1].startswith("labels at the scan's voxels"))


def test_uncertainty_outside_the_band_is_the_grids_own_interpolated():
    """With the intensity model and an uncertainty map, only the band's box gets the 33-channel
    posterior; the rest of the field of view (background by the band rule) interpolates the grid's
    calibrated error probability.  Labels do not depend on asking for uncertainty; inside the
    box the map is the refined posterior's, everywhere else the grid's interpolated."""
    from msdseg.inference.backproject import _foreground_grid_box, _input_box
    from msdseg.core.geometry import input_index_to_grid_index
    from msdseg.inference.calibration import error_probability, temper

    img, grid, probs = _border_case()
    probs = probs.clone()
    probs[:, :, :, 6:] = torch.tensor([0.995, 0.003, 0.002])[:, None, None, None]  # sure background above z = 2 mm
    lut = np.array([0, 5, 9])
    model = fit_intensity_model(*fit_voxels(probs, grid, img, BAND, 100_000))
    labels_only, _ = backproject(probs, grid, img, lut, intensity=model)
    labels, unc = backproject(probs, grid, img, lut, uncertainty=probs[:1], intensity=model, temperature=2.0)
    assert np.array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(labels_only))
    u = sitk.GetArrayFromImage(unc)
    mat = torch.from_numpy(input_index_to_grid_index(img, grid)).float()
    (i0, j0, k0), (i1, j1, k1) = _input_box(mat, _foreground_grid_box(probs.float(), BAND), img.GetSize())
    outside = np.ones(u.shape, bool)
    outside[k0:k1, j0:j1, i0:i1] = False
    assert outside.any(), "the case must have voxels outside the band's box"
    grid_u = error_probability(temper(probs.float(), 2.0)).numpy()[0]
    assert u[outside].min() >= grid_u.min() - 1e-6 and u[outside].max() <= grid_u.max() + 1e-6
