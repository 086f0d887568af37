"""``msdseg evaluate PRED REF``: Dice, HD95, volume difference, left/right swaps, calibration, pictures."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "compare a prediction with a reference"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pred")
    p.add_argument("ref")
    p.add_argument("--ref-labels", default=None, help="CSV/JSON: reference label -> aseg number")
    p.add_argument("--only-labels", type=int, nargs="+", default=None, metavar="ASEG",
                   help="score only these leaves (aseg numbers): for a reference that labels a few "
                        "structures, whose other voxels are not background truth")
    p.add_argument("--uncertainty", default=None, help="uncertainty map of the prediction")
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--name", default=None)


def run(args: argparse.Namespace) -> int:
    from msdseg.core.io import case_stem, read_image
    from msdseg.core.labels import load_tree
    from msdseg.evaluation.metrics import evaluate, write_report

    ref_map = read_label_map(args.ref_labels) if args.ref_labels else None
    unc = read_image(args.uncertainty) if args.uncertainty else None
    report = evaluate(read_image(args.pred), read_image(args.ref), load_tree(), ref_label_map=ref_map, uncertainty=unc,
                      only_labels=args.only_labels)
    out = Path(args.output or Path(args.pred).parent)
    paths = write_report(report, out, args.name or case_stem(args.pred))
    print(json.dumps({"summary": report.summary, "files": {k: str(v) for k, v in paths.items()}}, indent=1, default=str))
    return 0


def read_label_map(path: str) -> dict[int, int]:
    """A CSV/JSON mapping foreign label -> aseg number (two columns, or a JSON object)."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        return {int(k): int(v) for k, v in json.loads(text).items()}
    out: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.replace(";", ",").split(",")]
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit() and parts[1].lstrip("-").isdigit():
            out[int(parts[0])] = int(parts[1])
    return out
