"""The yardstick: one model scored on every real labelled held-out scan and on renders of held-out
label maps, with a peer (SAMSEG) on the same scans, summarised as mean and spread.

Why one command: a single held-out scan cannot rank two models (a difference of 0.01 on one brain
is noise), and a model tuned to one scan learns that scan. The yardstick puts every independent
measurement the project has side by side — the real T1s (fsaverage with its aseg; Colin27 with the
twelve AAL structures drawn on it, scored on those only), renders of held-out maps in many
contrasts, and a leave-one-source-out summary when one is given — and reports the clinically read
structures (hippocampus, amygdala, temporal horns) of every scan next to the peer's. Shipping a new
model means beating the shipped one here, case by case (``--baseline``), not on one number.

Usage::

    python -m msdseg.evaluation.yardstick --data DATA/manifest.json [--model M] [--preset balanced]
        [--renders 6] [--render-maps fsaverage gca_argmax] [--peer samseg:colin27=LABELS ...]
        [--loso LOSO/loso.json] [--baseline OTHER/yardstick.json] -o OUT

writes ``OUT/yardstick.json`` and ``OUT/yardstick.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from msdseg.core.errors import InputError
from msdseg.core.settings import add_intensity_argument

# the structures a memory clinic reads first; highlighted in every table
FOCUS = ("hippocampus", "amygdala", "inferior_lateral_ventricle")
FOCUS_NAMES = {"hippocampus": "hippocampus", "amygdala": "amygdala", "inferior_lateral_ventricle": "temporal horn"}


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (sd 0 for one value, None for none)."""
    vals = _finite(values)
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def score_real_cases(model: str | None, manifest: Path, outdir: Path, preset: str, intensity: bool | None,
                     progress=print) -> dict[str, dict[str, Any]]:
    """The preset's ensemble on every held-out real T1 (complete or partial reference)."""
    from msdseg.evaluation.heldout import evaluate_model

    res = evaluate_model(model, manifest, outdir, preset, deterministic_baseline=False, intensity=intensity)
    cases = {name: variants["ensemble"] for name, variants in res["cases"].items()}
    for name, c in cases.items():
        progress(f"{name}: mean Dice {c['dice_mean_leaves']:.3f} over {c['n_leaves_evaluated']} leaves")
    return cases


def score_renders(model: str | None, manifest: Path, outdir: Path, preset: str, n_cases: int, seed: int,
                  maps: Sequence[str] | None, intensity: bool | None, progress=print) -> dict[str, Any]:
    """``n_cases`` renders of each map (default: the complete held-out maps), scored like real cases."""
    from msdseg.core.labels import load_tree
    from msdseg.core.settings import SegmentSettings
    from msdseg.evaluation.heldout import segment_and_score
    from msdseg.evaluation.heldout_synth import render_cases, summarise

    tree = load_tree()
    settings = SegmentSettings(preset=preset, uncertainty=True, model=model, check_brain=False, intensity=intensity)
    cases: dict[str, Any] = {}
    for name, image, ref in render_cases(manifest, n_cases, seed, maps):
        cases[name] = segment_and_score(image, ref, settings, tree, None, name, name)
        progress(f"{name}: mean Dice {cases[name]['dice_mean_leaves']:.3f}")
    by_map: dict[str, dict[str, Any]] = {}
    for name in sorted({n.rsplit("_synth", 1)[0] for n in cases}):
        by_map[name] = summarise({k: v for k, v in cases.items() if k.rsplit("_synth", 1)[0] == name})
    return {"cases": cases, "by_map": by_map, "seed": seed}


def score_peers(peers: dict[str, dict[str, str]], manifest: Path) -> dict[str, dict[str, Any]]:
    """``{peer: {case: label file}}`` scored against each case's reference exactly as our output
    (partial references on their defined leaves; a complete reference without the CSF leaf, which
    SAMSEG defines as all intracranial CSF)."""
    from msdseg.evaluation.heldout import heldout_cases, scored_labels
    from msdseg.evaluation.peer_compare import compare_maps

    cases = {c["name"]: c for c in heldout_cases(manifest)}
    out: dict[str, dict[str, Any]] = {}
    for peer, files in peers.items():
        for case_name, path in files.items():
            if case_name not in cases:
                raise InputError(f"--peer {peer}:{case_name}: no held-out case of that name in {manifest}")
            case = cases[case_name]
            only = scored_labels(case)
            cmp = compare_maps({peer: path}, case["labels_path"], only_labels=only, exclude=() if only else (24,))
            out.setdefault(peer, {})[case_name] = {
                "dice_by_leaf": {r.node_id: r.dice[peer] for r in cmp.rows},
                "ml_by_leaf": {r.node_id: r.ml[peer] for r in cmp.rows},
                "dice_mean_leaves": cmp.mean_dice[peer],
                "n_leaves": len(cmp.rows),
            }
    return out


def focus_rows(real: dict[str, dict[str, Any]], peers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case and focus structure side: our Dice, each peer's, and whether we are ahead."""
    rows = []
    for case, summary in real.items():
        for struct in FOCUS:
            for side in ("left", "right"):
                leaf = f"{side}_{struct}"
                ours = summary["dice_by_leaf"].get(leaf)
                if ours is None or not math.isfinite(ours):
                    continue
                row = {"case": case, "leaf": leaf, "ours": ours}
                for peer, by_case in peers.items():
                    d = by_case.get(case, {}).get("dice_by_leaf", {}).get(leaf)
                    if d is not None:
                        row[peer] = d
                rows.append(row)
    return rows


def goals(real: dict[str, dict[str, Any]], renders: dict[str, Any] | None, peers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 25's targets, each with the measured figure and whether it is met."""
    out = []
    rows = focus_rows(real, peers)
    for peer in peers:
        mtl = [r for r in rows if peer in r and not r["leaf"].endswith("inferior_lateral_ventricle")]
        if mtl:
            behind = [f"{r['case']} {r['leaf']} {r['ours']:.3f} vs {r[peer]:.3f}" for r in mtl if r["ours"] <= r[peer]]
            out.append({"goal": f"hippocampus and amygdala better than {peer} on every real scan",
                        "measured": f"{len(mtl) - len(behind)} of {len(mtl)} ahead" + (f"; behind: {'; '.join(behind)}" if behind else ""),
                        "met": not behind})
    horns = [r["ours"] for r in rows if r["leaf"].endswith("inferior_lateral_ventricle")]
    if horns:
        out.append({"goal": "temporal horns >= 0.70", "measured": ", ".join(f"{v:.3f}" for v in horns),
                    "met": min(horns) >= 0.70})
    for case, s in real.items():
        low = sorted((leaf, d) for leaf, d in s["dice_by_leaf"].items() if d is not None and math.isfinite(d) and d < 0.70)
        out.append({"goal": f"no structure below 0.70 ({case})",
                    "measured": f"{len(low)} below" + (": " + ", ".join(f"{k} {v:.3f}" for k, v in low) if low else ""),
                    "met": not low})
        out.append({"goal": f"mean Dice >= 0.86 ({case})", "measured": f"{s['dice_mean_leaves']:.3f}",
                    "met": s["dice_mean_leaves"] >= 0.86})
    if renders:
        for name, summary in renders["by_map"].items():
            mtl = [v for k, v in summary["dice_by_leaf"].items() if k.endswith(("hippocampus", "amygdala"))]
            if mtl:
                out.append({"goal": f"hippocampus and amygdala >= 0.85 on renders of {name}",
                            "measured": f"lowest {min(mtl):.3f}", "met": min(mtl) >= 0.85})
    return out


def compare_to_baseline(current: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired differences (this model minus the baseline) per real case and per render."""
    rows = []
    for kind in ("real", "renders"):
        cur = current.get(kind) or {}
        base = baseline.get(kind) or {}
        cur_cases = cur.get("cases", cur) if kind == "renders" else cur
        base_cases = base.get("cases", base) if kind == "renders" else base
        for name, s in cur_cases.items():
            if name in base_cases:
                rows.append({"kind": kind, "case": name,
                             "delta": s["dice_mean_leaves"] - base_cases[name]["dice_mean_leaves"]})
    return rows


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def markdown(doc: dict[str, Any]) -> str:
    """The yardstick as the tables docs/benchmarks.md and the model card quote."""
    real, renders, peers = doc["real"], doc.get("renders"), doc.get("peers", {})
    lines = [f"Model `{doc['model']}`, preset `{doc['preset']}`.", "",
             "| case | kind | leaves scored | mean Dice | lowest leaf | ECE | " + " | ".join(f"{p} mean Dice" for p in peers) + " |",
             "| --- | --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(peers)]
    for case, s in real.items():
        kind = "real T1, " + ("partial reference" if s.get("reference") == "partial" else "complete reference")
        peer_cells = " | ".join(_f(peers[p].get(case, {}).get("dice_mean_leaves")) for p in peers)
        lines.append(f"| {case} | {kind} | {s['n_leaves_evaluated']} | {_f(s['dice_mean_leaves'])} | "
                     f"{_f(s['min_dice_leaves'])} | {_f(s.get('ece'))} | {peer_cells} |")
    if renders:
        for name, s in renders["by_map"].items():
            lines.append(f"| {name} | {s['n_cases']} renders | – | {_f(s['dice_mean'])} ± {_f(s['dice_sd'])} | – | "
                         f"{_f(s.get('ece_mean'))} |" + " – |" * len(peers))
    m, sd = doc["summary"]["real_mean"], doc["summary"]["real_sd"]
    lines += ["", f"Real scans: mean {_f(m)}, sd {_f(sd)} over {doc['summary']['n_real']} scans "
                  "(each scan's mean over the leaves its reference defines)."]
    if doc.get("loso"):
        s = doc["loso"]
        lines.append(f"Leave-one-source-out: held-out Dice {_f(s.get('heldout_dice_mean'))} ± {_f(s.get('heldout_dice_sd'))}, "
                     f"gap to the control {_f(s.get('gap_mean'))} ± {_f(s.get('gap_sd'))} over {s.get('n_folds')} folds.")
    rows = focus_rows(real, peers)
    if rows:
        lines += ["", "| case | structure | msdseg | " + " | ".join(peers) + " |", "| --- | --- | ---: |" + " ---: |" * len(peers)]
        for r in rows:
            side, struct = r["leaf"].split("_", 1)
            cells = " | ".join(_f(r.get(p)) for p in peers)
            lines.append(f"| {r['case']} | **{side} {FOCUS_NAMES[struct]}** | {_f(r['ours'])} | {cells} |")
    lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |" for g in doc["goals"]]
    if doc.get("baseline"):
        lines += ["", f"Against `{doc['baseline']['model']}` (this model minus that one):", "",
                  "| case | kind | Δ mean Dice |", "| --- | --- | ---: |"]
        lines += [f"| {r['case']} | {r['kind']} | {r['delta']:+.3f} |" for r in doc["baseline"]["rows"]]
    return "\n".join(lines) + "\n"


def reusable(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """An earlier yardstick.json made with the same model and settings (peers, the LOSO summary and
    the baseline can then change without segmenting anything again), else None."""
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if all(doc.get(k) == v for k, v in key.items()) else None


def _parse_peers(items: Sequence[str] | None) -> dict[str, dict[str, str]]:
    peers: dict[str, dict[str, str]] = {}
    for item in items or ():
        name, sep, rest = item.partition(":")
        case, sep2, path = rest.partition("=")
        if not (sep and sep2 and name and case and path):
            raise InputError(f"--peer {item}: write PEER:CASE=LABELS, e.g. samseg:colin27=samseg_labels.nii.gz")
        if not Path(path).is_file():
            raise InputError(f"--peer {item}: {path} does not exist")
        peers.setdefault(name, {})[case] = path
    return peers


def run(args: argparse.Namespace, progress=print) -> dict[str, Any]:
    from msdseg.evaluation.metrics import _json_safe

    manifest, out = Path(args.data), Path(args.output)
    if args.renders < 0:
        raise InputError("--renders must be 0 or more")
    peers_in = _parse_peers(args.peer)
    out.mkdir(parents=True, exist_ok=True)
    key = {"model": args.model or "shipped", "preset": args.preset, "renders_per_map": args.renders,
           "render_maps": args.render_maps, "seed": args.seed, "intensity": args.intensity}
    earlier = reusable(out / "yardstick.json", key) if args.reuse else None
    if earlier is not None:
        progress(f"reusing the scores in {out / 'yardstick.json'}")
        real, renders = earlier["real"], earlier.get("renders")
    else:
        real = score_real_cases(args.model, manifest, out / "real", args.preset, args.intensity, progress)
        renders = None
        if args.renders:
            renders = score_renders(args.model, manifest, out / "renders", args.preset, args.renders, args.seed,
                                    args.render_maps, args.intensity, progress)
    peers = score_peers(peers_in, manifest)
    m, sd = mean_sd([s["dice_mean_leaves"] for s in real.values()])
    doc: dict[str, Any] = {**key, "real": real, "renders": renders,
                           "peers": peers, "summary": {"real_mean": m, "real_sd": sd, "n_real": len(real)}}
    if args.loso:
        loso = json.loads(Path(args.loso).read_text())
        doc["loso"] = loso.get("summary", loso)
    doc["goals"] = goals(real, renders, peers)
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        doc["baseline"] = {"model": base.get("model"), "rows": compare_to_baseline(doc, base)}
    (out / "yardstick.json").write_text(json.dumps(_json_safe(doc), indent=1))
    (out / "yardstick.md").write_text(markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.yardstick", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="manifest.json of prepare-data")
    p.add_argument("--model", default=None, help="model file (default: the shipped model)")
    p.add_argument("--preset", default="balanced")
    p.add_argument("--renders", type=int, default=6, help="renders per rendered map (0: real scans only)")
    p.add_argument("--render-maps", nargs="+", default=None,
                   help="manifest map names to render (default: the complete held-out maps)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--peer", nargs="+", default=None, metavar="PEER:CASE=LABELS",
                   help="a peer's label map of a held-out case, e.g. samseg:colin27=samseg_labels.nii.gz")
    p.add_argument("--loso", default=None, help="loso.json of python -m msdseg.evaluation.loso")
    p.add_argument("--baseline", default=None, help="another model's yardstick.json: paired differences")
    p.add_argument("--reuse", action="store_true",
                   help="reuse OUT/yardstick.json's scores when it was made with the same model and settings "
                        "(to add a peer, a LOSO summary or a baseline without segmenting again)")
    p.add_argument("-o", "--output", required=True)
    add_intensity_argument(p)
    args = p.parse_args(argv)
    try:
        run(args)
    except InputError as exc:
        print(f"error: {exc}")
        return 2
    print((Path(args.output) / "yardstick.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
