"""Cohorts: input expansion, unique names, failure isolation, worker pools, Dask, signals + resume,
cohort CSVs, the QC rule and the HTML report.

Volumes are 48^3 at 4 mm and runs use ``--preset fast --steps 1`` so the whole file stays within a
few minutes on two busy cores; the model is the untrained network (labels are meaningless, the
pipeline is the real one).
"""
from __future__ import annotations

import base64
import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_image, phantom_fn
from shared import TREE
from msdseg.batch.cohort import assign_stems, case_complete, expand_inputs, run_cohort
from msdseg.core.errors import InputError
from msdseg.core.settings import SegmentSettings
from msdseg.batch.qc import QCRules, CaseQCInput, PLAUSIBLE_ML, assess_cohort, robust_z
from msdseg.outputs.sidecar import asymmetry_indices, intracranial_volume_ml, read_sidecar, uncertainty_by_structure

pytestmark = pytest.mark.unit

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST_ARGS = ["--preset", "fast", "--steps", "1"]
LEAVES = [leaf.id for leaf in TREE.leaves]


def head(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(make_image((48, 48, 48), (4.0, 4.0, 4.0), np.eye(3), fn=phantom_fn), str(path))
    return path


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".msdseg-tmp-", ".msdseg-bak-"))]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- inputs and names
def test_expand_inputs_bids_folders_globs_and_lists(tmp_path):
    ds = tmp_path / "ds"
    touch(ds / "dataset_description.json", b"{}")
    a = touch(ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(ds / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    touch(ds / "sub-01" / "anat" / "sub-01_T1w.json")
    b = touch(ds / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    touch(ds / "derivatives" / "x" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    touch(ds / ".git" / "sub-09_T1w.nii.gz")
    assert expand_inputs([str(ds)]) == [a, b]

    # a plain folder with results inside: outputs and the output folder are never inputs
    plain = tmp_path / "plain"
    t1 = touch(plain / "p1_t1_mprage.nii.gz")
    touch(plain / "p1_flair.nii.gz")
    touch(plain / "p1_t1_mprage_labels.nii.gz")
    touch(plain / "out" / "p2_T1.nii.gz")
    assert expand_inputs([str(plain)], exclude=[plain / "out"]) == [t1]

    # globs (recursive), duplicates removed, order stable
    assert expand_inputs([str(ds / "**" / "*_T1w.nii.gz"), str(a)]) == [
        ds / "derivatives" / "x" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", a, b]
    with pytest.raises(InputError, match="matches no image"):
        expand_inputs([str(tmp_path / "nothing*" / "*.nii.gz")])

    # text list (comments, relative entries, a glob) and CSVs with and without a header
    lst = tmp_path / "lists" / "cases.txt"
    touch(lst, f"# cohort\n../ds/sub-01/anat/sub-01_T1w.nii.gz\n\n{ds}/sub-02/*/anat/*_T1w.nii.gz\n".encode())
    assert expand_inputs([str(lst)]) == [lst.parent / "../ds/sub-01/anat/sub-01_T1w.nii.gz",
                                         ds / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz"]
    with_header = touch(tmp_path / "with_header.csv", f"subject,T1\ns1,{a}\ns2,{b}\n".encode())
    no_header = touch(tmp_path / "no_header.csv", f"s1,{a}\ns2,{b}\n".encode())
    assert expand_inputs([str(with_header)]) == [a, b]
    assert expand_inputs([str(no_header)]) == [a, b]
    # a missing explicit file is kept: it fails as its own case, not the whole run
    assert expand_inputs([str(tmp_path / "missing.nii.gz")]) == [tmp_path / "missing.nii.gz"]


def test_assign_stems_gives_unique_names():
    names = lambda ps: [c.stem for c in assign_stems([Path(p) for p in ps])]  # noqa: E731
    assert names(["/d/a/T1w.nii.gz", "/d/b/T1w.nii.gz", "/d/c_T1w.nii.gz"]) == ["a_T1w", "b_T1w", "c_T1w"]
    assert names(["/bids/sub-01/anat/T1w.nii.gz", "/bids/sub-02/anat/T1w.nii.gz"]) == ["sub-01_T1w", "sub-02_T1w"]
    assert names(["/d/x.nii.gz", "/d/x.mgz"]) == ["x_nii_gz", "x_mgz"]
    got = names(["/d/a/Scan.nii.gz", "/d/b/scan.nii.gz", "/d/a_Scan.nii"])
    assert len({n.casefold() for n in got}) == 3, got
    assert names(["/d/my scan (1).nii.gz"]) == ["my_scan_1"]


# ----------------------------------------------------------------------------- QC rule
def normal_table(n: int, seed: int = 0) -> list[CaseQCInput]:
    """Cases whose leaf volumes sit in the middle of the plausible bands, with 5 % noise."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        scale = rng.normal(1.0, 0.08)  # head size
        vols = {}
        for leaf in LEAVES:
            base = leaf.replace("left_", "").replace("right_", "")
            lo, hi = PLAUSIBLE_ML[base]
            vols[leaf] = float(np.sqrt(lo * hi) * scale * rng.normal(1.0, 0.05))
        total = sum(vols.values())
        vols["brain"] = total
        asym = asymmetry_indices(vols, TREE)
        cases.append(CaseQCInput(f"c{i:02d}", vols, icv_ml=1.2 * total, brain_uncertainty=float(rng.uniform(0.05, 0.1)),
                                 structure_uncertainty={leaf: 0.1 for leaf in LEAVES}, asymmetry=asym))
    return cases


def test_robust_z_handles_outliers_and_zero_mad():
    z = robust_z([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 10.0, None])
    assert abs(z[0]) < 1 and z[6] > 10 and np.isnan(z[7])
    z = robust_z([2.0, 2.0, 2.0, 2.0, 3.0])  # MAD 0 -> mean absolute deviation
    assert z[0] == 0 and np.isfinite(z[4]) and z[4] > 3.5
    assert list(robust_z([5.0, 5.0, 5.0])) == [0.0, 0.0, 0.0]


def test_qc_large_cohort_uses_robust_z():
    cases = normal_table(30)
    res = assess_cohort(cases, LEAVES)
    assert sum(r.flag != "ok" for r in res.values()) <= 2, {k: r.text for k, r in res.items() if r.flag != "ok"}
    # one case with hugely enlarged ventricles, one with a left/right swap of the hippocampus volumes
    big = cases[3]
    big.volumes = {**big.volumes, "left_lateral_ventricle": big.volumes["left_lateral_ventricle"] * 6}
    swap = cases[7]
    swap.volumes = {**swap.volumes, "left_hippocampus": swap.volumes["left_hippocampus"] * 0.8,
                    "right_hippocampus": swap.volumes["right_hippocampus"] * 1.15}
    swap.asymmetry = asymmetry_indices(swap.volumes, TREE)
    res = assess_cohort(cases, LEAVES)
    assert res["c03"].flag == "review" and "left_lateral_ventricle (/ICV) robust z" in res["c03"].text
    assert res["c07"].flag == "review" and "asymmetry hippocampus" in res["c07"].text
    # a ~35 % asymmetry is within the fixed limits: only the cohort statistics see it
    assert assess_cohort([swap] + cases[:3], LEAVES)["c07"].flag == "ok"


def test_qc_small_cohort_uses_fixed_ranges_and_uncertainty():
    cases = normal_table(4, seed=1)
    res = assess_cohort(cases, LEAVES)
    assert all(r.flag == "ok" for r in res.values()), {k: r.text for k, r in res.items()}
    cases[0].volumes = {**cases[0].volumes, "right_putamen": 40.0}
    cases[1].brain_uncertainty = 0.4
    cases[2].structure_uncertainty = {**cases[2].structure_uncertainty, "left_amygdala": 0.8}
    cases[3].volumes = {**cases[3].volumes, "brainstem": 0.5}
    res = assess_cohort(cases, LEAVES)
    assert res["c00"].flag == "review" and "right_putamen 40 mL outside" in res["c00"].text
    assert res["c01"].flag == "review" and "mean brain uncertainty 0.40" in res["c01"].text
    assert res["c02"].flag == "review" and "left_amygdala" in res["c02"].text
    assert res["c03"].flag == "fail" and "brainstem" in res["c03"].text
    strict = assess_cohort(cases, LEAVES, rules=QCRules(uncertainty_fail=0.3))
    assert strict["c01"].flag == "fail"


def test_case_measures_icv_asymmetry_uncertainty():
    # a "brain" with a deep 4 mm cleft (a sulcus): closing fills it, the label sum does not
    lab = np.zeros((60, 60, 60), np.uint16)
    zz, yy, xx = np.mgrid[:60, :60, :60]
    lab[((xx - 30) ** 2 + (yy - 30) ** 2 + (zz - 30) ** 2) < 22 ** 2] = 3
    lab[:, :, 28:32] = 0
    lab[lab.shape[0] // 2:, :, :][lab[lab.shape[0] // 2:, :, :] == 3] = 42
    labelled = np.count_nonzero(lab) / 1000.0
    icv = intracranial_volume_ml(lab, (1.0, 1.0, 1.0))
    sphere = 4 / 3 * np.pi * 22 ** 3 / 1000.0
    assert labelled < 0.9 * sphere and abs(icv - sphere) < 0.05 * sphere
    ai = asymmetry_indices({"left_cerebral_cortex": 3.0, "right_cerebral_cortex": 1.0, "left_thalamus": 0.0,
                            "right_thalamus": 0.0}, TREE)
    assert ai["cerebral_cortex"] == pytest.approx(1.0) and ai["thalamus"] is None
    unc = np.where(lab == 3, 0.2, 0.6).astype(np.float32)
    by_leaf, brain = uncertainty_by_structure(lab, unc, TREE)
    assert by_leaf["left_cerebral_cortex"] == pytest.approx(0.2) and by_leaf["right_cerebral_cortex"] == pytest.approx(0.6)
    assert by_leaf["left_thalamus"] is None and 0.2 < brain < 0.6


# ----------------------------------------------------------------------------- real cohorts
@pytest.fixture(scope="module")
def fast(untrained_model) -> SegmentSettings:
    """Fastest settings, with an explicit untrained model (tests must not depend on shipped weights)."""
    return SegmentSettings(preset="fast", steps=1, model=untrained_model)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, fast):
    """Good cases (two of them named T1w.nii.gz), a corrupt file, a 4-D file and a NaN volume,
    run with two local worker processes."""
    root = tmp_path_factory.mktemp("mixed")
    inp = root / "in"
    head(inp / "x" / "T1w.nii.gz")
    head(inp / "y" / "T1w.nii.gz")
    head(inp / "sub-03_T1w.nii.gz")
    full = head(root / "spare.nii.gz").read_bytes()
    touch(inp / "corrupt_T1w.nii.gz", full[: len(full) // 3])
    import nibabel as nib

    series = np.random.default_rng(0).random((48, 48, 48, 3)).astype(np.float32)  # a 4-D time series
    nib.save(nib.Nifti1Image(series, np.diag([4.0, 4.0, 4.0, 1.0])), str(inp / "series_T1w.nii.gz"))
    good = sitk.ReadImage(str(inp / "sub-03_T1w.nii.gz"))
    arr = sitk.GetArrayFromImage(good)
    arr[5, 5, 5] = np.nan
    nan = sitk.GetImageFromArray(arr)
    nan.CopyInformation(good)
    sitk.WriteImage(nan, str(inp / "nan_T1w.nii.gz"))
    out = root / "out"
    t0 = time.time()
    rc = run_cohort([str(inp)], out, fast, jobs=2, progress_mode="none")
    return {"rc": rc, "out": out, "inp": inp, "seconds": time.time() - t0}


GOOD = ["sub-03_T1w", "x_T1w", "y_T1w"]
BAD = {"corrupt_T1w": "truncated", "series_T1w": "4-D", "nan_T1w": "NaN"}


@pytest.mark.slow
def test_mixed_cohort_with_two_workers(mixed):
    out = mixed["out"]
    assert mixed["rc"] == 1  # some cases failed
    failures = {r["case"]: r["reason"] for r in rows(out / "cohort_failures.csv")}
    assert set(failures) == set(BAD)
    for stem, word in BAD.items():
        assert word in failures[stem], failures[stem]
        assert not list(out.glob(f"{stem}[._]*")), "a failed case leaves no output"
        assert (out / "logs" / f"{stem}.log").exists()
    for stem in GOOD:
        assert case_complete(out, stem, uncertainty=False, cohort=True)
        assert (out / f"{stem}_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "done in" in (out / "logs" / f"{stem}.log").read_text()
    assert not temporaries(out)
    table = rows(out / "cohort_volumes.csv")
    assert sorted(r["case"] for r in table) == GOOD
    r = table[0]
    for col in ("qc_flag", "qc_reasons", "icv_ml", "labelled_ml", "brain_ml", "left_hemisphere_ml",
                "left_hippocampus_ml", "ai_hippocampus", "ai_hemisphere", "unc_left_hippocampus", "seconds"):
        assert col in r, col
    assert r["qc_flag"] in {"ok", "review", "fail"}
    assert float(r["brain_ml"]) == pytest.approx(float(r["labelled_ml"]))
    # without --uncertainty no map is written, yet the mean uncertainty is known (computed in memory)
    assert not list(out.glob("*_uncertainty.nii.gz"))
    assert 0.0 <= float(r["brain_mean_uncertainty"]) <= 1.0
    doc = read_sidecar(out, "x_T1w")
    assert doc["input"].endswith(os.path.join("x", "T1w.nii.gz")) and doc["info"]["trained"] is False


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        elif tag not in {"meta", "br", "img", "link"}:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.mark.integration
def test_report_is_self_contained_html(mixed):
    text = (mixed["out"] / "cohort_report.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = _Collector()
    parser.feed(text)
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert len(parser.images) >= len(GOOD) + 2  # thumbnails + distribution plots
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "http://" not in text and "https://" not in text
    assert "UNTRAINED MODEL" in text
    for stem in list(BAD) + GOOD:
        assert stem in text
    # fail/review cases come first
    flags = [r["qc_flag"] for r in rows(mixed["out"] / "cohort_volumes.csv")]
    first = text.index("class='card ")
    assert text[first:first + 40].split("'")[1].split()[1] == sorted(flags, key=["fail", "review", "ok"].index)[0]


@pytest.mark.integration
def test_resume_skips_and_rebuilds_a_missing_sidecar(mixed, fast):
    out, inp = mixed["out"], mixed["inp"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and not p.name.startswith("cohort_")}
    (out / "y_T1w_case.json").unlink()  # e.g. killed between the outputs and the sidecar
    rc = run_cohort([str(inp)], out, fast, jobs=1, progress_mode="none")
    assert rc == 1  # the bad files still fail
    for name, m in mtimes.items():
        if name != "y_T1w_case.json" and name != "y_T1w_overlay.png":
            assert (out / name).stat().st_mtime_ns == m, f"{name} was rewritten"
    doc = read_sidecar(out, "y_T1w")
    assert doc["rebuilt_from_outputs"] is True and doc["uncertainty_by_structure"]["left_thalamus"] is None
    assert sorted(r["case"] for r in rows(out / "cohort_volumes.csv")) == GOOD
    assert not temporaries(out)


@pytest.mark.integration
def test_cancel_callback_stops_between_diffusion_steps(tmp_path, fast):
    inp = tmp_path / "in"
    for i in range(3):
        head(inp / f"c{i}_T1w.nii.gz")
    out = tmp_path / "out"
    rc = run_cohort([str(inp)], out, fast, jobs=1, progress_mode="none",
                    cancel=lambda: (out / "c0_T1w_case.json").exists())
    assert rc == 130
    assert case_complete(out, "c0_T1w", uncertainty=False, cohort=True)
    assert not list(out.glob("c1_T1w*")) and not list(out.glob("c2_T1w*")) and not temporaries(out)
    reasons = {r["case"]: r["reason"] for r in rows(out / "cohort_failures.csv")}
    assert set(reasons) == {"c1_T1w", "c2_T1w"} and all("run again" in r for r in reasons.values())


@pytest.mark.slow
def test_dask_local_cluster_matches_local_results(tmp_path, fast):
    distributed = pytest.importorskip("distributed")
    inp = tmp_path / "in"
    head(inp / "a" / "T1w.nii.gz")
    head(inp / "b" / "T1w.nii.gz")
    touch(inp / "broken_T1w.nii.gz", gzip.compress(b"not an image" * 20))
    out = tmp_path / "out"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        rc = run_cohort([str(inp)], out, fast, dask_address=cl.scheduler_address, progress_mode="none")
        assert rc == 1
        assert {r["case"] for r in rows(out / "cohort_failures.csv")} == {"broken_T1w"}
        assert sorted(r["case"] for r in rows(out / "cohort_volumes.csv")) == ["a_T1w", "b_T1w"]
        for stem in ("a_T1w", "b_T1w"):
            assert case_complete(out, stem, uncertainty=False, cohort=True)
            assert read_sidecar(out, stem)["host"]
        assert (out / "cohort_report.html").exists() and not temporaries(out)
        # resume through Dask too: nothing is sent again
        mtime = (out / "a_T1w_labels.nii.gz").stat().st_mtime_ns
        assert run_cohort([str(inp / "a"), str(inp / "b")], out, fast, dask_address=cl.scheduler_address,
                          progress_mode="none") == 0
        assert (out / "a_T1w_labels.nii.gz").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_sigterm_midway_then_resume(tmp_path, untrained_model):
    """SIGTERM after the first case: exit non-zero, finished cases intact, nothing partial; a rerun
    skips the finished cases (untouched) and does the rest."""
    inp = tmp_path / "in"
    stems = [f"s{i}_T1w" for i in range(5)]
    for s in stems:
        head(inp / f"{s}.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "msdseg", "segment", str(inp), "-o", str(out), *FAST_ARGS, "--jobs", "2",
           "--progress", "json", "--model", untrained_model]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while not list(out.glob("*_case.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again to resume" in stderr
    finished = [s for s in stems if (out / f"{s}_case.json").exists()]
    assert 1 <= len(finished) < len(stems), finished
    assert not temporaries(out)
    mtimes = {}
    for s in stems:
        present = list(out.glob(f"{s}[._]*"))
        if s in finished:
            assert case_complete(out, s, uncertainty=False, cohort=True)
            assert sitk.ReadImage(str(out / f"{s}_labels.nii.gz")).GetSize() == (48, 48, 48)
            mtimes[s] = {p.name: p.stat().st_mtime_ns for p in present}
        else:
            assert not present, f"cancelled case {s} left {present}"
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert all(0.0 <= e["progress"] <= 1.0 for e in events)

    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for s in stems:
        assert case_complete(out, s, uncertainty=False, cohort=True)
    for s, files in mtimes.items():
        for name, m in files.items():
            assert (out / name).stat().st_mtime_ns == m, f"{name} was redone"
    assert sorted(r["case"] for r in rows(out / "cohort_volumes.csv")) == stems
    assert rows(out / "cohort_failures.csv") == []
    assert not temporaries(out)
