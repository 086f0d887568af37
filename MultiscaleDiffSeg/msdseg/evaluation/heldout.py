"""Held-out evaluation of a model: every manifest map with role "heldout" and a real T1.

For each such case the model segments the T1 three times — with the preset's diffusion ensemble,
with the same ensemble without mirrored samples, and with one deterministic pass of the same
network (``steps=0``) — and each is scored against the reference with
:func:`msdseg.evaluation.metrics.evaluate`.  That is the comparison the benchmarks report (what the ensemble
adds over a single pass, and what mirroring adds).  Maps used in training are never scored
here.

A case whose manifest entry says ``"reference": "partial"`` (Colin27 with the AAL atlas: twelve
deep grey structures drawn on that brain) is scored on its ``defined`` leaves only — per-leaf
Dice/HD95 and their mean; our other labels cost nothing, and the calibration figure is judged
only around those structures (:mod:`msdseg.evaluation.metrics`).  Every other case is scored on
all leaves, as before.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from msdseg.core.errors import InputError
from msdseg.core.settings import add_intensity_argument


def heldout_cases(manifest: Path) -> list[dict[str, Any]]:
    doc = json.loads(manifest.read_text())
    cases = [m for m in doc.get("maps", []) if m.get("role") == "heldout" and m.get("t1")]
    if not cases:
        raise InputError(f"{manifest}: no held-out map with a T1")
    for c in cases:
        c["t1_path"] = str(manifest.parent / c["t1"])
        c["labels_path"] = str(manifest.parent / c["path"])
    return cases


def scored_labels(case: dict[str, Any]) -> list[int] | None:
    """The leaf aseg numbers a case is scored on: its ``defined`` leaves for a partial reference,
    None (all leaves) otherwise; pass it as ``only_labels`` to :func:`metrics.evaluate`."""
    if case.get("reference") == "partial":
        return [int(v) for v in case["defined"]]
    return None


def evaluate_model(
    model: str | None, manifest: Path, outdir: Path, preset: str = "balanced", device: str = "auto",
    deterministic_baseline: bool = True, write_reports: bool = True, intensity: bool | None = None,
) -> dict[str, Any]:
    """Score ``model`` on the held-out cases; returns (and writes) a summary JSON."""
    from msdseg.core.settings import SegmentSettings
    from msdseg.core.io import load_volume, read_image
    from msdseg.core.labels import load_tree

    tree = load_tree()
    outdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"model": model or "shipped", "preset": preset, "cases": {}}
    # (name, steps, mirror): the preset's ensemble, the same without mirrored samples, one pass
    variants = [("ensemble", None, None)]
    if deterministic_baseline:
        variants += [("ensemble_no_mirror", None, False), ("single_pass", 0, None)]
    for case in heldout_cases(manifest):
        image = load_volume(case["t1_path"])
        ref = read_image(case["labels_path"])
        per_case: dict[str, Any] = {}
        for name, steps, mirror in variants:
            settings = SegmentSettings(preset=preset, device=device, steps=steps, uncertainty=True,
                                       model=model, check_brain=False, mirror=mirror, intensity=intensity)
            per_case[name] = segment_and_score(
                image, ref, settings, tree, outdir if write_reports else None, f"{case['name']}_{name}",
                f"{results['model']} - {case['name']} - {name} ({preset})", only_labels=scored_labels(case))
        results["cases"][case["name"]] = per_case
    from msdseg.evaluation.metrics import _json_safe

    (outdir / "heldout_summary.json").write_text(json.dumps(_json_safe(results), indent=1))
    return results


def segment_and_score(image, ref, settings, tree, outdir: Path | None, stem: str, title: str,
                      only_labels: list[int] | None = None) -> dict[str, Any]:
    """Segment ``image`` with ``settings``, score it against ``ref``; the summary row of one case
    (and its report files in ``outdir`` unless None).  ``only_labels``: a partial reference's leaves."""
    from msdseg.evaluation.metrics import evaluate, write_report
    from msdseg.inference.pipeline import segment_image

    t0 = time.time()
    res = segment_image(image, settings)
    seconds = time.time() - t0
    report = evaluate(res.labels, ref, tree, uncertainty=res.uncertainty, only_labels=only_labels)
    summary = {k: v for k, v in report.summary.items() if not isinstance(v, (dict, list))}
    summary.setdefault("reference", "complete")
    summary["seconds"] = round(seconds, 1)
    summary["min_dice_leaves"] = min(
        (r.dice for r in report.structures if r.is_leaf and math.isfinite(r.dice)), default=math.nan)
    summary["dice_by_leaf"] = {r.node_id: r.dice for r in report.structures if r.is_leaf}
    summary["hd95_by_leaf"] = {r.node_id: r.hd95_mm for r in report.structures if r.is_leaf}
    if outdir is not None:
        write_report(report, outdir, stem, tree=tree, image=image, title=title)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.heldout", description=__doc__)
    p.add_argument("--data", required=True, help="manifest.json of prepare-data")
    p.add_argument("--model", default=None)
    p.add_argument("--preset", default="balanced")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--no-baseline", action="store_true")
    add_intensity_argument(p)
    args = p.parse_args(argv)
    res = evaluate_model(args.model, Path(args.data), Path(args.output), args.preset, args.device,
                         not args.no_baseline, intensity=args.intensity)
    for case, variants in res["cases"].items():
        for name, s in variants.items():
            scope = f"{s['n_leaves_evaluated']} leaves" + (", partial" if s["reference"] == "partial" else "")
            print(f"{case:12s} {name:18s} mean Dice {s['dice_mean_leaves']:.3f} ({scope})  "
                  f"min {s['min_dice_leaves']:.3f}  swaps {s['n_swapped_pairs']}  "
                  f"ECE {s.get('ece', float('nan')):.3f}  {s['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
