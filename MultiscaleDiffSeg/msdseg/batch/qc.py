"""Quality-control flag of each case in a cohort: the model's own uncertainty + volume outliers.

Why two kinds of evidence: a diffusion ensemble knows where it is unsure (the calibrated probability
that its mean prediction is wrong), but a confidently wrong segmentation -- a swapped hemisphere, a missed
cerebellum, a scan that is not a T1 -- can be certain and still absurd.  Volumes catch those.

Rule (documented for users in ``docs/cohorts.md``; the thresholds live in :class:`QCRules`):

* **fail** -- do not use without looking:
  labelled brain volume outside 400-2600 mL (the range inference itself rejects for trained
  models); a major structure (cerebral cortex or white matter, cerebellar cortex, brainstem) below
  a tenth of its plausible minimum; or mean brain uncertainty above ``uncertainty_fail``.
* **review** -- worth a look:
  any volume outlier (below); mean brain uncertainty above ``uncertainty_review``, or a robust z
  above the limit (below) against the cohort; any structure whose mean uncertainty is above
  ``structure_uncertainty_review``.
* **ok** -- none of the above.

Volume outliers depend on the cohort size.  With at least ``min_cases_for_z`` cases: robust
z-scores ``(x - median) / (1.4826 MAD)`` of each leaf's fraction of the intracranial volume (head
size removed), of ICV and labelled volume themselves, and of each leaf pair's (and the
hemispheres') asymmetry index -- about 50 quantities per case.  A case is flagged when any |z|
exceeds :func:`z_limit_for`: the larger of ``z_floor`` (3.5, Iglewicz & Hoaglin) and the limit at
which a cohort of the same size with Gaussian volumes would see ``false_flag_rate`` (1 %) of its
cases flagged.  Why calibrate: the MAD of a small sample is itself noisy and ~50 tests per case
multiply the chances, so a fixed 3.5 would flag a large share of small healthy cohorts; the
calibrated limit is high for small cohorts and falls towards the floor as the cohort grows (the
simulated figures are in ``docs/cohorts.md``).  When the MAD is 0 the mean absolute deviation
(times 1.2533) is used instead.  Below ``min_cases_for_z`` cases, medians and MADs are
meaningless, so fixed plausibility ranges for adult brains (:data:`PLAUSIBLE_ML`, wide bands
around published FreeSurfer aseg volumes) and a fixed asymmetry limit are used instead.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

#: Adult plausibility bands (mL) per structure, both sides alike (leaf id without ``left_``/``right_``).
#: Deliberately wide (about +-50 % around typical FreeSurfer aseg volumes, ventricles much wider):
#: they are there to catch failed segmentations, not to diagnose atrophy.
PLAUSIBLE_ML: dict[str, tuple[float, float]] = {
    "cerebral_cortex": (150.0, 400.0),
    "cerebral_white_matter": (120.0, 380.0),
    "lateral_ventricle": (0.5, 90.0),
    "inferior_lateral_ventricle": (0.02, 6.0),
    "cerebellum_white_matter": (6.0, 25.0),
    "cerebellum_cortex": (30.0, 80.0),
    "thalamus": (4.0, 11.0),
    "caudate": (1.8, 6.5),
    "putamen": (2.5, 8.5),
    "pallidum": (0.7, 3.2),
    "hippocampus": (2.0, 6.0),
    "amygdala": (0.7, 3.0),
    "accumbens": (0.15, 1.3),
    "ventral_dc": (2.5, 6.5),
    "brainstem": (12.0, 32.0),
    "third_ventricle": (0.2, 4.5),
    "fourth_ventricle": (0.4, 4.5),
    "csf": (0.1, 4.0),
}
#: Labelled brain (all structures) and ICV estimate, mL.
PLAUSIBLE_BRAIN_ML = (800.0, 2100.0)
PLAUSIBLE_ICV_ML = (900.0, 2300.0)
#: The gross range inference rejects for trained models (msdseg.inference.pipeline.BRAIN_ML_RANGE).
FAIL_BRAIN_ML = (400.0, 2600.0)
#: Structures whose near-absence means the segmentation failed, not that the brain is unusual.
MAJOR_STRUCTURES = ("cerebral_cortex", "cerebral_white_matter", "cerebellum_cortex", "brainstem")
#: Asymmetry limits for small cohorts; ventricles are often asymmetric, the temporal horns are
#: too small for the index to mean anything.
ASYMMETRY_LIMIT = 0.5
ASYMMETRY_LIMITS: dict[str, float | None] = {"lateral_ventricle": 0.9, "inferior_lateral_ventricle": None,
                                             "ventricles": 0.9}


@dataclass(frozen=True)
class QCRules:
    z_floor: float = 3.5
    false_flag_rate: float = 0.01
    min_cases_for_z: int = 20
    # Uncertainty is the calibrated probability that a voxel's label is wrong.  The thresholds sit
    # between what the model states on good T1 scans and on degraded copies of one (noise, blur,
    # inverted contrast), as ``python -m msdseg.evaluation.diagnostics.qc_probe`` measures them;
    # the figures they were set from are in docs/cohorts.md.  Re-run the probe when the model changes.
    uncertainty_review: float = 0.27
    uncertainty_fail: float = 0.4
    structure_uncertainty_review: float = 0.45
    major_fraction_fail: float = 0.1


@dataclass
class QCResult:
    flag: str  # ok | review | fail
    reasons: list[str] = field(default_factory=list)
    score: float = 0.0  # severity, for sorting (largest |z| or relative range violation)

    @property
    def text(self) -> str:
        return "; ".join(self.reasons)


@dataclass
class CaseQCInput:
    """What the rule looks at for one case (read from its sidecar)."""

    case: str
    volumes: Mapping[str, float]
    icv_ml: float | None = None
    brain_uncertainty: float | None = None
    structure_uncertainty: Mapping[str, float | None] = field(default_factory=dict)
    asymmetry: Mapping[str, float | None] = field(default_factory=dict)

    @classmethod
    def from_sidecar(cls, doc: Mapping[str, Any]) -> "CaseQCInput":
        return cls(
            case=str(doc["case"]),
            volumes={k: float(v) for k, v in doc.get("volumes_ml", {}).items()},
            icv_ml=doc.get("icv_ml"),
            brain_uncertainty=doc.get("brain_mean_uncertainty"),
            structure_uncertainty=doc.get("uncertainty_by_structure") or {},
            asymmetry=doc.get("asymmetry") or {},
        )


def robust_z(values: Sequence[float | None]) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``; NaN for missing values.

    MAD = 0 (over half the values identical) falls back to 1.2533 x the mean absolute deviation;
    if that is 0 too, equal values get 0 and any other value +-inf.
    """
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    ok = np.isfinite(x)
    z = np.full(x.shape, np.nan)
    if not ok.any():
        return z
    med = float(np.median(x[ok]))
    dev = np.abs(x[ok] - med)
    scale = 1.4826 * float(np.median(dev))
    if scale == 0.0:
        scale = 1.2533 * float(np.mean(dev))
    if scale == 0.0:
        z[ok] = np.where(x[ok] > med, np.inf, np.where(x[ok] < med, -np.inf, 0.0))
    else:
        z[ok] = (x[ok] - med) / scale
    return z


@functools.lru_cache(maxsize=64)
def z_limit_for(n_cases: int, n_tests: int, false_flag_rate: float = 0.01, floor: float = 3.5) -> float:
    """|z| limit that flags ``false_flag_rate`` of the cases of a Gaussian cohort of ``n_cases``
    when ``n_tests`` independent quantities are tested per case (Monte Carlo, fixed seed: the same
    inputs always give the same limit), and never below ``floor``."""
    n, m = max(int(n_cases), 3), max(int(n_tests), 1)
    sims = max(40, min(40_000 // n, 4_000_000 // (n * m)))
    rng = np.random.default_rng(12345)
    x = rng.standard_normal((sims, n, m)).astype(np.float32)
    med = np.median(x, axis=1, keepdims=True)
    mad = 1.4826 * np.median(np.abs(x - med), axis=1, keepdims=True)
    worst = (np.abs(x - med) / mad).max(axis=2)
    return max(float(floor), float(np.quantile(worst, 1.0 - false_flag_rate)))


def _base(leaf_id: str) -> str:
    for prefix in ("left_", "right_"):
        if leaf_id.startswith(prefix):
            return leaf_id[len(prefix):]
    return leaf_id


def _range_violation(value: float, lo: float, hi: float) -> float:
    """0 inside [lo, hi]; otherwise how far outside, relative to the bound."""
    if value < lo:
        return (lo - value) / lo if lo > 0 else math.inf
    if value > hi:
        return (value - hi) / hi
    return 0.0


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def assess_cohort(cases: Sequence[CaseQCInput], leaf_ids: Sequence[str], root_id: str = "brain",
                  rules: QCRules | None = None) -> dict[str, QCResult]:
    """QC result per case name; see the module doc for the rule."""
    rules = rules or QCRules()
    results = {c.case: QCResult("ok") for c in cases}
    fail: dict[str, bool] = {c.case: False for c in cases}

    def add(case: str, reason: str, score: float, is_fail: bool = False) -> None:
        r = results[case]
        r.reasons.append(reason)
        r.score = max(r.score, float(score) if math.isfinite(score) else 1e9)
        fail[case] = fail[case] or is_fail

    # --- case-level checks, whatever the cohort size
    for c in cases:
        brain = float(c.volumes.get(root_id, 0.0))
        if _range_violation(brain, *FAIL_BRAIN_ML) > 0:
            add(c.case, f"labelled brain {brain:.0f} mL outside {FAIL_BRAIN_ML[0]:.0f}-{FAIL_BRAIN_ML[1]:.0f} mL",
                100.0, True)
        for leaf in leaf_ids:
            base = _base(leaf)
            if base in MAJOR_STRUCTURES and base in PLAUSIBLE_ML:
                floor = rules.major_fraction_fail * PLAUSIBLE_ML[base][0]
                v = float(c.volumes.get(leaf, 0.0))
                if v < floor:
                    add(c.case, f"{leaf} {_fmt(v)} mL: (nearly) missing", 50.0, True)
        u = c.brain_uncertainty
        if u is not None and math.isfinite(u):
            if u > rules.uncertainty_fail:
                add(c.case, f"mean brain uncertainty {u:.2f} > {rules.uncertainty_fail:g}", 10.0 * u, True)
            elif u > rules.uncertainty_review:
                add(c.case, f"mean brain uncertainty {u:.2f} > {rules.uncertainty_review:g}", 10.0 * u)
        uncertain = [leaf for leaf in leaf_ids
                     if (c.structure_uncertainty.get(leaf) or 0.0) > rules.structure_uncertainty_review]
        if uncertain:
            add(c.case, f"uncertain structures (> {rules.structure_uncertainty_review:g}): "
                        f"{', '.join(uncertain[:6])}{' ...' if len(uncertain) > 6 else ''}", 5.0)

    # --- volume outliers: cohort statistics, or fixed ranges for small cohorts
    if len(cases) >= rules.min_cases_for_z:
        _cohort_outliers(cases, leaf_ids, root_id, rules, add)
    else:
        _fixed_range_outliers(cases, leaf_ids, root_id, add)

    for c in cases:
        r = results[c.case]
        r.flag = "fail" if fail[c.case] else ("review" if r.reasons else "ok")
    return results


def _cohort_outliers(cases, leaf_ids, root_id, rules: QCRules, add) -> None:
    def icv_of(c: CaseQCInput) -> float | None:
        return c.icv_ml if c.icv_ml and c.icv_ml > 0 else None

    series: dict[str, list[float | None]] = {
        "ICV": [icv_of(c) for c in cases],
        "labelled brain": [c.volumes.get(root_id) for c in cases],
    }
    for leaf in leaf_ids:
        series[f"{leaf} (/ICV)"] = [
            (c.volumes.get(leaf, 0.0) / icv_of(c)) if icv_of(c) else None for c in cases]
    leaf_bases = {_base(leaf) for leaf in leaf_ids}
    pairs = sorted({k for c in cases for k in c.asymmetry if k in leaf_bases or k == "hemisphere"})
    for pair in pairs:
        series[f"asymmetry {pair}"] = [c.asymmetry.get(pair) for c in cases]
    limit = z_limit_for(len(cases), len(series) + 1, rules.false_flag_rate, rules.z_floor)
    for name, values in series.items():
        z = robust_z(values)
        for c, zi in zip(cases, z):
            if abs(zi) > limit:  # NaN (missing) compares False
                add(c.case, f"{name} robust z {zi:+.1f} (limit {limit:.1f})", abs(zi))
    zu = robust_z([c.brain_uncertainty for c in cases])
    for c, zi in zip(cases, zu):
        if zi > limit:  # one-sided: unusually *low* uncertainty is no problem
            add(c.case, f"mean brain uncertainty robust z {zi:+.1f} (limit {limit:.1f})", abs(zi))


def _fixed_range_outliers(cases, leaf_ids, root_id, add) -> None:
    for c in cases:
        brain = float(c.volumes.get(root_id, 0.0))
        bad = _range_violation(brain, *PLAUSIBLE_BRAIN_ML)
        if bad > 0:
            add(c.case, f"labelled brain {brain:.0f} mL outside {PLAUSIBLE_BRAIN_ML[0]:.0f}-"
                        f"{PLAUSIBLE_BRAIN_ML[1]:.0f} mL", 3.5 + 10 * bad)
        if c.icv_ml is not None:
            bad = _range_violation(float(c.icv_ml), *PLAUSIBLE_ICV_ML)
            if bad > 0:
                add(c.case, f"ICV {c.icv_ml:.0f} mL outside {PLAUSIBLE_ICV_ML[0]:.0f}-{PLAUSIBLE_ICV_ML[1]:.0f} mL",
                    3.5 + 10 * bad)
        for leaf in leaf_ids:
            band = PLAUSIBLE_ML.get(_base(leaf))
            if band is None:
                continue
            v = float(c.volumes.get(leaf, 0.0))
            bad = _range_violation(v, *band)
            if bad > 0:
                add(c.case, f"{leaf} {_fmt(v)} mL outside {_fmt(band[0])}-{_fmt(band[1])} mL", 3.5 + 10 * bad)
        for pair, ai in c.asymmetry.items():
            limit = ASYMMETRY_LIMITS.get(pair, ASYMMETRY_LIMIT)
            if limit is None or ai is None or pair not in {_base(leaf) for leaf in leaf_ids}:
                continue
            if abs(ai) > limit:
                add(c.case, f"asymmetry {pair} {ai:+.2f} beyond +-{limit:g}", 3.5 + 10 * (abs(ai) - limit))
