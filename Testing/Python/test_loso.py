"""Leave-one-source-out evaluation: folds hold out one source with its prior sampler (and never a
held-out or partial map), finished folds are not trained again, the figures are means and sample
standard deviations of paired gaps, and a tiny real fold runs end to end through the real trainer."""
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from msdseg.core.errors import InputError
from msdseg.evaluation import loso
from msdseg.evaluation.loso import Fold, Protocol, fold_result, make_folds, render_plan, run_loso, summarise_folds

pytestmark = pytest.mark.unit


def _toy_map(path: Path, scale: float) -> None:
    """An ellipsoid brain: white matter (2/41) inside a cortex shell (3/42), a thalamus (10/49) per side."""
    shape = (60, 70, 56)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    r = (x / (26 * scale)) ** 2 + (y / (30 * scale)) ** 2 + (z / (22 * scale)) ** 2
    left = x < 0  # RAS: smaller x is the right side; the labels only need to differ per side here
    lab = np.where(r < 1, np.where(left, 42, 3), 0)
    lab[r < 0.6] = np.where(left, 41, 2)[r < 0.6]
    thal = ((np.abs(x) - 7) / 5) ** 2 + (y / 7) ** 2 + (z / 5) ** 2 < 1
    lab[thal] = np.where(left, 49, 10)[thal]
    aff = np.eye(4)
    aff[:3, 3] = -np.array(shape) / 2
    nib.save(nib.Nifti1Image(lab.astype(np.int16), aff), str(path))


def _entry(source: str, name: str, role: str = "train", **extra) -> dict:
    return {"source": source, "name": name, "role": role, "path": f"{name}.nii.gz",
            "defined": [2, 3, 10, 41, 42, 49], **extra}


def _manifest(tmp_path: Path, maps: list[dict], priors: tuple[str, ...] = ()) -> Path:
    """A manifest of toy maps; ``priors`` names sources whose atlas priors file exists."""
    for i, m in enumerate(maps):
        _toy_map(tmp_path / m["path"], 0.9 + 0.05 * i)
    extras = {}
    for source in priors:
        (tmp_path / f"{source}_priors.npz").write_bytes(b"")  # only its existence is read here
        extras[source] = {"priors": f"{source}_priors.npz"}
    extras["gca"] = {"priors": "missing.npz"}  # a priors file that is not there brings no sampler
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"maps": maps, "extras": extras}))
    return path


def test_folds_hold_out_one_source_with_its_prior_sampler(tmp_path):
    manifest = _manifest(tmp_path, [
        _entry("a", "a1"), _entry("a", "a2"), _entry("b", "b1"), _entry("samseg", "samseg_atlas"),
        _entry("fs", "fsaverage", role="heldout"), _entry("colin", "colin27", role="heldout", reference="partial"),
    ], priors=("samseg",))
    folds = {f.name: f for f in make_folds(manifest)}
    assert list(folds) == ["control", "a", "b", "samseg"]
    assert folds["control"] == Fold("control", ("a", "b", "samseg", "samseg_priors"), ())
    assert folds["a"] == Fold("a", ("b", "samseg", "samseg_priors"), ("a1", "a2"))
    assert folds["samseg"] == Fold("samseg", ("a", "b"), ("samseg_atlas",))  # the sampler goes with its atlas
    assert [f.name for f in make_folds(manifest, ["b"])] == ["control", "b"]
    with pytest.raises(InputError, match=r"--folds fs: not a training source .* \(choose from a, b, samseg\)"):
        make_folds(manifest, ["fs"])


def test_a_prior_only_source_trains_in_every_fold_and_one_source_is_refused(tmp_path):
    manifest = _manifest(tmp_path, [_entry("a", "a1"), _entry("b", "b1")], priors=("samseg",))
    folds = make_folds(manifest)
    assert [f.name for f in folds] == ["control", "a", "b"]  # nothing of samseg's to render: no fold
    assert all("samseg_priors" in f.train_sources for f in folds)
    one = tmp_path / "one"
    one.mkdir()
    with pytest.raises(InputError, match="at least two training sources"):
        make_folds(_manifest(one, [_entry("a", "a1")]))


def test_renders_are_taken_from_the_maps_in_turn():
    assert render_plan(("d1", "d2", "d3"), 2) == [("d1", 1), ("d2", 1)]
    assert render_plan(("d1", "d2"), 5) == [("d1", 3), ("d2", 2)]
    assert render_plan(("atlas",), 2) == [("atlas", 2)]


def test_leaf_dice_is_the_dice_of_evaluate():
    import SimpleITK as sitk

    from msdseg.core.labels import load_tree
    from msdseg.evaluation.metrics import evaluate

    rng = np.random.default_rng(0)
    ref = rng.choice([0, 2, 3, 10, 255], size=(12, 14, 10)).astype(np.int16)  # 255: ignored, no leaf
    pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.choice([0, 2, 3, 10, 49], size=ref.shape)).astype(np.int16)
    pred[pred == 255] = 0
    tree = load_tree()
    dice = loso.leaf_dice(pred, ref, tree)
    report = evaluate(sitk.GetImageFromArray(pred), sitk.GetImageFromArray(ref), tree)
    expected = {r.node_id: r.dice for r in report.structures if r.is_leaf and math.isfinite(r.dice)}
    assert set(dice) == {"left_cerebral_white_matter", "left_cerebral_cortex", "left_thalamus"}
    assert dice == pytest.approx(expected)


def _protocol(manifest: Path, **changes) -> Protocol:
    base = Protocol(str(manifest), steps=3, minutes=None, modes=("4:0:1.0",), seed=0, ema_decay=0.98, bf16=False,
                    train_options=(), threads=1, preset="fast", spacing_mm=4.0, intensity=False, renders=1,
                    render_seed=7)
    return replace(base, **changes)


def test_each_fold_trains_from_scratch_on_all_but_its_sources_with_the_same_seed(tmp_path):
    fold = Fold("a", ("b", "samseg", "samseg_priors"), ("a1",))
    cmd = _protocol(tmp_path / "m.json", train_options=("--nuclei-change", "0.5")).train_command(fold, tmp_path / "run")
    text = " ".join(cmd)
    assert cmd[1:4] == ["-m", "msdseg", "train"] and "--init" not in cmd
    assert "--sources b samseg samseg_priors --nuclei-change 0.5" in text
    assert "--steps 3" in text and "--seed 0" in text and "--modes 4:0:1.0" in text and "--threads 1" in text


def _row(mean: float, leaves: dict[str, float]) -> dict:
    return {"dice_mean_leaves": mean, "dice_by_leaf": leaves, "ece": None}


def _scores(pairs: list[tuple[float, float]]) -> dict:
    """Score rows of renders r0, r1, ... with (held-out, control) mean Dice; one leaf equal to the mean."""
    return {"cpu_seconds": 10.0, "wall_seconds": 12.0, "renders": {
        f"r{i}": {"heldout": _row(h, {"left_thalamus": h}), "control": _row(c, {"left_thalamus": c})}
        for i, (h, c) in enumerate(pairs)}}


TRAINING = {"steps": 3, "cpu_seconds": 60.0, "wall_seconds": 70.0}


def test_fold_and_across_fold_figures_are_paired_means_and_sample_sds():
    res = fold_result(Fold("a", ("b",), ("a1",)), TRAINING, _scores([(0.5, 0.7), (0.6, 0.7), (None, 0.9)]))
    assert res["renders"] == ["r0", "r1"]  # a render with no scored leaf is left out
    assert res["heldout"]["dice_mean"] == pytest.approx(0.55) and res["control"]["dice_mean"] == pytest.approx(0.7)
    assert res["gap"]["mean"] == pytest.approx(0.15) and res["gap"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert res["gap"]["by_leaf"] == pytest.approx({"left_thalamus": 0.15})
    other = fold_result(Fold("b", ("a",), ("b1",)), TRAINING, _scores([(0.75, 0.8)]))
    assert other["gap"]["sd"] is None  # one render: no spread
    s = summarise_folds([res, other])
    assert s["n_folds"] == 2 and s["heldout_dice_mean"] == pytest.approx(0.65)
    assert s["heldout_dice_sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.55 and 0.75
    assert s["gap_mean"] == pytest.approx(0.1) and s["gap_sd"] == pytest.approx(math.sqrt(0.005))
    assert s["control_dice_mean"] == pytest.approx(0.75)
    assert summarise_folds([other])["gap_sd"] is None


def test_finished_folds_are_not_trained_again_and_a_changed_protocol_is_refused(tmp_path):
    manifest = _manifest(tmp_path, [_entry("a", "a1"), _entry("b", "b1")])
    folds = make_folds(manifest)
    protocol = _protocol(manifest)
    out = tmp_path / "out"
    loso._check_protocol(out, protocol)
    for fold, pairs in zip(folds[1:], ([(0.5, 0.6)], [(0.7, 0.72)])):
        (out / f"fold_{fold.name}").mkdir()
        loso._write(out / f"fold_{fold.name}" / "result.json", fold_result(fold, TRAINING, _scores(pairs)))
    said: list[str] = []
    doc = run_loso(protocol, out, folds, progress=said.append)
    assert sorted(p.name for p in out.iterdir()) == ["fold_a", "fold_b", "loso.json", "loso.md", "protocol.json"]
    assert not (out / "fold_control").exists() and not (out / "fold_a" / "run").exists()  # nothing trained
    assert said == ["[a] finished earlier: held-out 0.500, gap +0.100",
                    "[b] finished earlier: held-out 0.700, gap +0.020",
                    f"2 folds: held-out Dice 0.600 (sd 0.141), gap +0.060 (sd 0.057); table in {out / 'loso.md'}"]
    assert doc["summary"]["gap_mean"] == pytest.approx(0.06) and doc["costs"]["train_cpu_seconds"] == 120.0
    table = (out / "loso.md").read_text()
    assert "| a | 1 | 1 | 0.500 (0.000) | 0.600 | +0.100 (–) |" in table
    assert "| left_thalamus | 0.500 (+0.100) | 0.700 (+0.020) |" in table
    with pytest.raises(InputError, match="steps = 3, not 5"):
        run_loso(_protocol(manifest, steps=5), out, folds)
    moved = [folds[0], replace(folds[1], train_sources=("c",))] + folds[2:]
    with pytest.raises(InputError, match="fold_a: made for other sources"):
        run_loso(protocol, out, moved)
    assert loso.main(["--data", str(manifest), "-o", str(out), "--steps", "0"]) == 2


@pytest.mark.slow
def test_a_tiny_fold_trains_exports_and_scores_end_to_end(tmp_path, capsys):
    # a1 draws thalamus but does not define it: its renders score only cortex and white matter
    manifest = _manifest(tmp_path, [_entry("a", "a1", defined=[2, 3, 41, 42]), _entry("b", "b1")])
    out = tmp_path / "out"
    # one step on 16-voxel patches at 4 mm keeps the two trainings cheap; scoring enters at 4 mm
    args = ["--data", str(manifest), "-o", str(out), "--folds", "a", "--steps", "1", "--modes", "4:16:1.0",
            "--renders", "1", "--preset", "fast", "--no-intensity", "--fp32"]
    assert loso.main(args) == 0
    doc = json.loads((out / "loso.json").read_text())
    fold = doc["folds"][0]
    assert fold["fold"] == asdict(Fold("a", ("b",), ("a1",))) | {"train_sources": ["b"], "heldout_maps": ["a1"]}
    assert fold["training"]["steps"] == 1 and doc["control"]["steps"] == 1
    assert fold["renders"] == ["a1_synth0"] and set(fold["leaves_scored"]) == {
        "left_cerebral_white_matter", "left_cerebral_cortex", "right_cerebral_white_matter", "right_cerebral_cortex"}
    for role in ("heldout", "control"):
        assert 0.0 <= fold[role]["dice_mean"] <= 1.0
    model_json = json.loads((out / "fold_a" / "model.json").read_text())
    assert model_json["train_steps"] == 1
    capsys.readouterr()
    assert loso.main(args) == 0  # resumed: nothing trained or scored again
    assert "[a] finished earlier" in capsys.readouterr().out
