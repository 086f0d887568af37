"""The rows of the volumes table: left and right side by side with their asymmetry, then midline.

Why paired rows: a reader compares a structure with its twin (the left hippocampus with the right
one), as FreeSurfer's and ITK-SNAP's tables invite; one row per pair with the asymmetry index
``100 * (L - R) / ((L + R) / 2)`` makes that a glance.  Values are rounded here for display only;
the CSV download and the saved ``S_volumes.csv`` keep the core's full precision.
"""
from __future__ import annotations

from typing import Any, Mapping

from msdseg.core.labels import LabelTree

LEFT_GROUP, RIGHT_GROUP = "left_hemisphere", "right_hemisphere"
#: Decimals shown in the table (mL) and for the asymmetry index (%).
ML_DECIMALS = 1
AI_DECIMALS = 1


def asymmetry_index(left: float, right: float) -> float | None:
    """``100 * (L - R) / mean(L, R)``; None when both are empty."""
    mean = (left + right) / 2.0
    return None if mean <= 0 else 100.0 * (left - right) / mean


def hex_colour(rgb: Any) -> str:
    if rgb is None:
        return "#888888"
    return "#" + "".join(f"{int(round(c)):02x}" for c in list(rgb)[:3])


def side_name(name: str) -> str:
    """``"Left thalamus"`` -> ``"Thalamus"``: the pair's name."""
    for prefix in ("Left ", "Right "):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return rest[:1].upper() + rest[1:]
    return name


def _depth_first(tree: LabelTree, node_id: str, level: int = 0) -> list[tuple[Any, int]]:
    rows = [(tree[node_id], level)]
    for child in tree.children(node_id):
        rows.extend(_depth_first(tree, child.id, level + 1))
    return rows


def volume_rows(volumes: Mapping[str, float], tree: LabelTree) -> list[dict[str, Any]]:
    """Table rows: each left-hemisphere node with its right twin, then the midline, then the brain.

    Every row has ``id`` (the left node, or the node), ``name``, ``level``, ``leaf``, and display
    strings ``left``/``right``/``ai`` (paired rows) or ``ml`` (single rows), plus colours.
    """
    rows: list[dict[str, Any]] = []
    for node, level in _depth_first(tree, LEFT_GROUP):
        twin_id = tree.twin(node.id) if node.id != LEFT_GROUP else RIGHT_GROUP
        twin = tree[twin_id] if twin_id else None
        left = float(volumes.get(node.id, 0.0))
        right = float(volumes.get(twin.id, 0.0)) if twin is not None else 0.0
        ai = asymmetry_index(left, right) if twin is not None else None
        rows.append({
            "id": node.id, "twin": twin.id if twin is not None else "", "paired": True,
            "name": "Hemisphere" if node.id == LEFT_GROUP else side_name(node.name), "level": level,
            "leaf": node.label is not None, "left": f"{left:.{ML_DECIMALS}f}",
            "right": f"{right:.{ML_DECIMALS}f}" if twin is not None else "",
            "ai": "" if ai is None else f"{ai:+.{AI_DECIMALS}f}",
            "colour": hex_colour(node.color), "twin_colour": hex_colour(twin.color if twin is not None else None),
        })
    for node_id in [c.id for c in tree.children(tree.root.id) if c.id not in (LEFT_GROUP, RIGHT_GROUP)]:
        for node, level in _depth_first(tree, node_id):
            rows.append(_single(node, level, volumes))
    rows.append(_single(tree.root, 0, volumes))
    return rows


def _single(node: Any, level: int, volumes: Mapping[str, float]) -> dict[str, Any]:
    value = float(volumes.get(node.id, 0.0))
    return {"id": node.id, "twin": "", "paired": False, "name": node.name, "level": level,
            "leaf": node.label is not None, "ml": f"{value:.{ML_DECIMALS}f}", "colour": hex_colour(node.color)}
