"""Synthetic held-out renders: only held-out maps are drawn (or the maps named), never a partial
reference, the same seed gives the same renders
(paired comparisons between models), labels stay on their side of the head in the written image,
unsupervised voxels keep the ignore number, and the summary is a mean with its spread."""
import json
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.evaluation.heldout_synth import evaluate_synthetic, render_cases, renderable_maps, summarise
from msdseg.training.synth import IGNORE

pytestmark = pytest.mark.unit


def _manifest(tmp_path, role="heldout"):
    shape = (60, 70, 56)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    brain = (x / 26) ** 2 + (y / 30) ** 2 + (z / 22) ** 2 < 1
    lab = np.where(brain, np.where(x < 0, 3, 42), 0).astype(np.int16)  # RAS x < 0 is the right side...
    lab[brain & (np.abs(z) < 2) & (np.abs(x) < 3)] = IGNORE  # ...and a strip of "none of our classes"
    aff = np.eye(4)
    aff[:3, 3] = -np.array(shape) / 2
    nib.save(nib.Nifti1Image(lab, aff), str(tmp_path / "toy.nii.gz"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"maps": [
        {"source": "toy", "name": "toy", "role": role, "path": "toy.nii.gz", "defined": [3, 42]}]}))
    return manifest


def _lps_x_of(labels: sitk.Image, value: int) -> float:
    arr = sitk.GetArrayFromImage(labels)  # (z, y, x)
    idx = np.argwhere(arr == value).mean(axis=0)[::-1]
    return labels.TransformContinuousIndexToPhysicalPoint(idx.tolist())[0]


@pytest.mark.slow
def test_renders_are_repeatable_one_mm_and_keep_sides_and_ignore_label(tmp_path):
    manifest = _manifest(tmp_path)
    first = list(render_cases(manifest, 2, seed=3))
    again = list(render_cases(manifest, 1, seed=3))
    assert [n for n, _, _ in first] == ["toy_synth0", "toy_synth1"]
    for (_, img_a, ref_a), (_, img_b, ref_b) in zip(first[:1], again):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_b))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ref_a), sitk.GetArrayFromImage(ref_b))
    assert not np.array_equal(sitk.GetArrayFromImage(first[0][1]), sitk.GetArrayFromImage(first[1][1]))
    for _, image, ref in first:
        assert image.GetSpacing() == (1.0, 1.0, 1.0) and image.GetSize() == ref.GetSize()
        assert image.GetOrigin() == ref.GetOrigin() and image.GetDirection() == ref.GetDirection()
        values = set(np.unique(sitk.GetArrayFromImage(ref)).tolist())
        assert {3, 42} <= values <= {0, 3, 42, IGNORE}
        # label 3 was drawn at smaller RAS x (larger LPS x) than 42, whatever mirroring the generator did
        assert _lps_x_of(ref, 3) > _lps_x_of(ref, 42) + 10


def test_only_held_out_maps_are_rendered(tmp_path):
    with pytest.raises(InputError, match="no held-out label map"):
        list(render_cases(_manifest(tmp_path, role="train"), 1, seed=0))


def test_named_maps_are_rendered_and_partial_references_never(tmp_path):
    manifest = _manifest(tmp_path)
    doc = json.loads(manifest.read_text())
    toy = doc["maps"][0]
    doc["maps"] += [dict(toy, name="atlas", role="train"), dict(toy, name="colin27", reference="partial")]
    manifest.write_text(json.dumps(doc))
    assert [m["name"] for m in renderable_maps(manifest)] == ["toy"]  # held out, the partial one left out
    assert [m["name"] for m in renderable_maps(manifest, ["atlas", "toy"])] == ["atlas", "toy"]
    for name in ("colin27", "nothing"):
        with pytest.raises(InputError, match=f"no renderable label map named {name}"):
            renderable_maps(manifest, [name])
    doc["maps"] = [dict(toy, reference="partial")]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="no held-out label map"):
        renderable_maps(manifest)


def test_summary_is_mean_and_spread_and_names_weak_leaves():
    cases = {
        "a": {"dice_mean_leaves": 0.8, "dice_by_leaf": {"l": 0.9, "csf": 0.6}, "ece": 0.02},
        "b": {"dice_mean_leaves": 0.7, "dice_by_leaf": {"l": 0.8, "csf": float("nan")}, "ece": float("nan")},
    }
    s = summarise(cases)
    assert s["n_cases"] == 2 and s["dice_mean"] == pytest.approx(0.75)
    assert s["dice_sd"] == pytest.approx(math.sqrt(0.005))
    assert s["dice_by_leaf"] == pytest.approx({"l": 0.85, "csf": 0.6})  # a NaN leaf is not averaged in
    assert s["leaves_below_0_70"] == ["csf"] and s["ece_mean"] == pytest.approx(0.02)


@pytest.mark.slow
def test_a_model_is_scored_end_to_end_on_one_render(tmp_path, untrained_model):
    out = tmp_path / "out"
    res = evaluate_synthetic(untrained_model, _manifest(tmp_path), out, preset="fast", n_cases=1,
                             seed=0, device="cpu", write_reports=False, progress=lambda msg: None)
    doc = json.loads((out / "synthetic_heldout.json").read_text())
    assert doc["summary"]["n_cases"] == 1 and list(doc["cases"]) == ["toy_synth0"]
    assert 0.0 <= res["summary"]["dice_mean"] <= 1.0
    with pytest.raises(InputError, match="at least 1"):
        evaluate_synthetic(untrained_model, _manifest(tmp_path), out, n_cases=0)


def test_renders_keep_the_training_contrasts_but_not_thick_slices_or_cuts():
    from dataclasses import asdict

    from msdseg.evaluation.heldout_synth import render_config
    from msdseg.training.synth import SynthConfig

    cfg, train = asdict(render_config()), asdict(SynthConfig())
    assert cfg["thick_slice_prob"] == 0.0 and cfg["fov_prob"] == 0.0
    assert cfg["t1_prior_prob"] == train["t1_prior_prob"] < 1.0
