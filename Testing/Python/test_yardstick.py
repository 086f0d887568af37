"""The yardstick's bookkeeping: spread over scans, the clinically read structures next to the peer's,
the issue's goals judged from the figures, and paired differences against a baseline model."""
import math

import pytest

from msdseg.core.errors import InputError
from msdseg.evaluation import yardstick as ys

pytestmark = pytest.mark.unit


def _case(mean: float, by_leaf: dict[str, float], partial: bool = False) -> dict:
    return {"dice_mean_leaves": mean, "n_leaves_evaluated": len(by_leaf), "min_dice_leaves": min(by_leaf.values()),
            "ece": 0.03, "reference": "partial" if partial else "complete", "dice_by_leaf": by_leaf}


REAL = {
    "fsaverage": _case(0.87, {"left_hippocampus": 0.86, "right_hippocampus": 0.88, "left_amygdala": 0.80,
                              "right_amygdala": 0.81, "left_inferior_lateral_ventricle": 0.72,
                              "right_inferior_lateral_ventricle": 0.65, "left_putamen": 0.9}),
    "colin27": _case(0.71, {"left_hippocampus": 0.67, "right_hippocampus": 0.64, "left_amygdala": 0.57,
                            "right_amygdala": 0.59, "left_putamen": 0.78, "right_caudate": float("nan")}, partial=True),
}
PEERS = {"samseg": {"colin27": {"dice_by_leaf": {"left_hippocampus": 0.71, "right_hippocampus": 0.60,
                                                 "left_amygdala": 0.62, "right_amygdala": 0.55},
                                "dice_mean_leaves": 0.716}}}


def test_mean_and_spread_skip_missing_values():
    assert ys.mean_sd([0.8, None, float("nan"), 0.6]) == pytest.approx((0.7, math.sqrt(0.02)))
    assert ys.mean_sd([0.5]) == (0.5, 0.0)
    assert ys.mean_sd([]) == (None, None)


def test_focus_rows_pair_each_scored_side_with_the_peer():
    rows = ys.focus_rows(REAL, PEERS)
    colin = {r["leaf"]: r for r in rows if r["case"] == "colin27"}
    assert set(colin) == {"left_hippocampus", "right_hippocampus", "left_amygdala", "right_amygdala"}
    assert colin["left_hippocampus"]["samseg"] == 0.71
    fsa = [r for r in rows if r["case"] == "fsaverage"]
    assert len(fsa) == 6 and all("samseg" not in r for r in fsa)  # no peer map for that scan


def test_goals_name_what_is_behind_and_by_how_much():
    by_goal = {g["goal"]: g for g in ys.goals(REAL, None, PEERS)}
    mtl = by_goal["hippocampus and amygdala better than samseg on every real scan"]
    assert not mtl["met"]
    assert mtl["measured"].startswith("2 of 4 ahead")
    assert "colin27 left_hippocampus 0.670 vs 0.710" in mtl["measured"]
    horns = by_goal["temporal horns >= 0.70"]
    assert not horns["met"] and "0.650" in horns["measured"]
    assert by_goal["mean Dice >= 0.86 (fsaverage)"]["met"]
    assert not by_goal["mean Dice >= 0.86 (colin27)"]["met"]
    low = by_goal["no structure below 0.70 (colin27)"]
    assert low["measured"].startswith("4 below")  # the NaN leaf is not counted as low


def test_render_goal_uses_the_lowest_medial_temporal_leaf():
    renders = {"by_map": {"fsaverage": {"dice_by_leaf": {"left_hippocampus": 0.86, "right_amygdala": 0.84,
                                                         "left_putamen": 0.6}}}}
    g = [g for g in ys.goals({}, renders, {}) if "renders" in g["goal"]][0]
    assert g["measured"] == "lowest 0.840" and not g["met"]


def test_baseline_differences_are_paired_by_case():
    cur = {"real": {"a": {"dice_mean_leaves": 0.80}, "b": {"dice_mean_leaves": 0.70}},
           "renders": {"cases": {"r0": {"dice_mean_leaves": 0.9}}}}
    base = {"real": {"a": {"dice_mean_leaves": 0.78}}, "renders": {"cases": {"r0": {"dice_mean_leaves": 0.91}}}}
    rows = {(r["kind"], r["case"]): r["delta"] for r in ys.compare_to_baseline(cur, base)}
    assert rows == {("real", "a"): pytest.approx(0.02), ("renders", "r0"): pytest.approx(-0.01)}


def test_markdown_highlights_the_medial_temporal_structures_and_lists_goals():
    doc = {"model": "m", "preset": "balanced", "real": REAL, "renders": None, "peers": PEERS,
           "summary": {"real_mean": 0.79, "real_sd": 0.11, "n_real": 2}, "goals": ys.goals(REAL, None, PEERS)}
    text = ys.markdown(doc)
    assert "| colin27 | **left hippocampus** | 0.670 | 0.710 |" in text
    assert "| fsaverage | **right temporal horn** | 0.650 | – |" in text
    assert "real T1, partial reference" in text
    assert "Real scans: mean 0.790, sd 0.110 over 2 scans" in text


def test_peer_argument_is_checked(tmp_path):
    f = tmp_path / "s.nii.gz"
    f.write_bytes(b"x")
    assert ys._parse_peers([f"samseg:colin27={f}"]) == {"samseg": {"colin27": str(f)}}
    with pytest.raises(InputError, match="PEER:CASE=LABELS"):
        ys._parse_peers(["samseg=colin27"])
    with pytest.raises(InputError, match="does not exist"):
        ys._parse_peers([f"samseg:colin27={tmp_path / 'missing.nii.gz'}"])


def test_earlier_scores_are_reused_only_for_the_same_model_and_settings(tmp_path):
    import json

    key = {"model": "m.safetensors", "preset": "balanced", "renders_per_map": 6, "render_maps": None,
           "seed": 7, "intensity": None}
    path = tmp_path / "yardstick.json"
    assert ys.reusable(path, key) is None
    path.write_text(json.dumps({**key, "real": REAL, "renders": None}))
    assert ys.reusable(path, key)["real"]["colin27"]["dice_mean_leaves"] == 0.71
    assert ys.reusable(path, {**key, "model": "other.safetensors"}) is None
    assert ys.reusable(path, {**key, "renders_per_map": 2}) is None


def test_markdown_quotes_the_leave_one_source_out_summary_as_loso_writes_it():
    from msdseg.evaluation.loso import summarise_folds

    folds = [{"heldout": {"dice_mean": d}, "control": {"dice_mean": d + g}, "gap": {"mean": g}}
             for d, g in ((0.2, 0.03), (0.3, 0.01))]
    summary = summarise_folds(folds)
    doc = {"model": "m", "preset": "balanced", "real": {}, "renders": None, "peers": {},
           "summary": {"real_mean": None, "real_sd": None, "n_real": 0}, "goals": [], "loso": summary}
    assert "Leave-one-source-out: held-out Dice 0.250 ± 0.071" in ys.markdown(doc)
