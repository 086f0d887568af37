"""Per-structure comparison of label maps (ours, a peer such as SAMSEG) against one reference.

Why: a mean Dice hides where two methods differ, and against a reference drawn by another protocol
(AAL on Colin27) the volumes tell whether a low Dice is a wrong boundary or a different
convention (a reference structure far larger than both methods' is the latter).  So the table has,
per scored leaf, the reference volume, each map's volume and Dice against the reference, and, for
the first two maps, their Dice against each other.

Scoring goes through :func:`msdseg.evaluation.metrics.evaluate` with ``only_labels``, so a partial
reference (the manifest's ``"reference": "partial"``) is scored on its defined leaves only and
extra labels of a map cost nothing; ``exclude`` drops leaves a peer does not label our way (SAMSEG's
``csf``, see :data:`msdseg.evaluation.peers.samseg_run.CSF_NOTE`) from a complete reference.

Usage::

    python -m msdseg.evaluation.peer_compare REF MAP [MAP ...] --names ours samseg
        [--only-labels 17 53 ...] [--exclude-labels 24] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from msdseg.core.errors import InputError
from msdseg.core.labels import LabelTree, load_tree

LabelInput = sitk.Image | str | os.PathLike


@dataclass
class StructureRow:
    """One scored leaf: reference volume, each map's volume and Dice, and the first two maps' agreement."""

    node_id: str
    name: str
    ref_ml: float
    ml: dict[str, float]
    dice: dict[str, float]
    agreement: float = math.nan


@dataclass
class PeerComparison:
    names: list[str]
    rows: list[StructureRow]
    mean_dice: dict[str, float]
    mean_agreement: float = math.nan
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        from msdseg.evaluation.metrics import _json_safe

        return _json_safe(asdict(self))


def scored_leaves(tree: LabelTree, only_labels: Collection[int] | None, exclude: Collection[int] = ()) -> list[int]:
    """Leaf aseg numbers to score, in tree order: ``only_labels`` (default all) minus ``exclude``."""
    leaves = [int(leaf.label) for leaf in tree.leaves]  # type: ignore[arg-type]
    wanted = set(leaves if only_labels is None else (int(v) for v in only_labels)) - {int(v) for v in exclude}
    if not wanted:
        raise InputError("no leaf left to compare")
    return [lab for lab in leaves if lab in wanted]


def compare_maps(maps: Mapping[str, LabelInput], reference: LabelInput, only_labels: Collection[int] | None = None,
                 exclude: Collection[int] = (), tree: LabelTree | None = None) -> PeerComparison:
    """Score every map of ``maps`` (name -> label map, aseg numbers) against ``reference`` on the
    scored leaves; maps on another grid are resampled onto the reference's (nearest neighbour)."""
    from msdseg.evaluation.metrics import evaluate

    tree = tree or load_tree()
    if not maps:
        raise InputError("give at least one label map to compare")
    labels = scored_leaves(tree, only_labels, exclude)
    names = list(maps)
    reports = {n: evaluate(maps[n], reference, tree, only_labels=labels) for n in names}
    ids = [leaf.id for leaf in tree.leaves if int(leaf.label) in labels]  # type: ignore[arg-type]
    agree = None
    if len(names) >= 2:  # the second map scored with the first as its reference, on the same leaves
        agree = evaluate(maps[names[1]], reports[names[0]].pred, tree, only_labels=labels)
    rows = []
    for node_id in ids:
        first = reports[names[0]].by_id(node_id)
        rows.append(StructureRow(
            node_id=node_id, name=first.name, ref_ml=first.ref_ml,
            ml={n: reports[n].by_id(node_id).pred_ml for n in names},
            dice={n: reports[n].by_id(node_id).dice for n in names},
            agreement=agree.by_id(node_id).dice if agree is not None else math.nan,
        ))
    notes = sorted({note for r in reports.values() for note in r.notes})
    return PeerComparison(
        names=names, rows=rows, mean_dice={n: _mean([r.dice[n] for r in rows]) for n in names},
        mean_agreement=_mean([r.agreement for r in rows]), notes=notes)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def format_table(result: PeerComparison) -> str:
    """Markdown table: structure, reference mL, per map mL and Dice, first-two agreement; mean row last."""
    pair = len(result.names) >= 2
    head = ["structure", "ref mL"] + [f"{n} mL" for n in result.names] + [f"{n} Dice" for n in result.names]
    if pair:
        head.append(f"{result.names[0]} vs {result.names[1]} Dice")

    def cell(v: float, fmt: str) -> str:
        return format(v, fmt) if math.isfinite(v) else "-"

    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result.rows:
        cells = [r.name, cell(r.ref_ml, ".2f")] + [cell(r.ml[n], ".2f") for n in result.names] \
            + [cell(r.dice[n], ".3f") for n in result.names] + ([cell(r.agreement, ".3f")] if pair else [])
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", "", *([""] * len(result.names))] + [f"**{cell(result.mean_dice[n], '.3f')}**"
                                                          for n in result.names]
    if pair:
        mean.append(f"**{cell(result.mean_agreement, '.3f')}**")
    lines.append("| " + " | ".join(mean) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m msdseg.evaluation.peer_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("reference", help="reference label map (aseg numbers)")
    p.add_argument("maps", nargs="+", help="label maps to compare (aseg numbers)")
    p.add_argument("--names", nargs="+", default=None, help="one name per map (default: file names)")
    p.add_argument("--only-labels", type=int, nargs="+", default=None, metavar="ASEG",
                   help="leaves a partial reference defines (default: all leaves)")
    p.add_argument("--exclude-labels", type=int, nargs="+", default=(), metavar="ASEG",
                   help="leaves to leave out (e.g. 24: SAMSEG's csf is not the aseg leaf)")
    p.add_argument("--json", default=None, help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    names = args.names or [Path(m).name.split(".")[0] for m in args.maps]
    if len(names) != len(args.maps) or len(set(names)) != len(names):
        raise InputError(f"--names: need {len(args.maps)} distinct names, got {names}")
    result = compare_maps(dict(zip(names, args.maps)), args.reference, args.only_labels, args.exclude_labels)
    print(format_table(result))
    for note in result.notes:
        print(f"note: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
