"""The cursor readout: intensity, structure and uncertainty under the mouse in any slice view.

Why the crosshair node: Slicer's crosshair displayable manager already turns every mouse move in
a slice view into a RAS position on the scene's crosshair node (``CursorPositionModifiedEvent``),
whichever view the mouse is in.  The readout listens there and looks the voxel up in arrays the
app keeps (the T1, the current labels with edits, the uncertainty map), so a mouse move costs a
few index operations and never touches the segmentation itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .views import AXIS_LETTERS

CROSSHAIR_CLASS = "vtkMRMLCrosshairNode"


@dataclass
class ProbeArrays:
    """Voxel arrays in numpy (k, j, i) order on the T1's grid, and the T1's RAS -> IJK matrix."""

    ras_to_ijk: np.ndarray
    t1: np.ndarray
    labels: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


def ras_text(ras: Sequence[float]) -> str:
    """``"R 12.0, A 3.5, S 40.0 mm"`` (negative values named by the opposite direction)."""
    parts = [f"{AXIS_LETTERS[axis][0 if value >= 0 else 1]} {abs(value):.1f}" for axis, value in enumerate(ras[:3])]
    return ", ".join(parts) + " mm"


def probe(arrays: ProbeArrays, ras: Sequence[float], names: Mapping[int, str]) -> dict[str, str] | None:
    """What lies at ``ras``: None outside the volume, else the texts the page shows."""
    ijk = arrays.ras_to_ijk @ np.array([*ras[:3], 1.0])
    i, j, k = (int(round(v)) for v in ijk[:3])
    shape = arrays.t1.shape
    if not (0 <= k < shape[0] and 0 <= j < shape[1] and 0 <= i < shape[2]):
        return None
    out = {"position": ras_text(ras), "voxel": f"{i}, {j}, {k}", "intensity": f"{float(arrays.t1[k, j, i]):.4g}",
           "label": "", "uncertainty": ""}
    if arrays.labels is not None:
        value = int(arrays.labels[k, j, i])
        out["label"] = names.get(value, f"label {value}") if value else "background"
    if arrays.uncertainty is not None:
        out["uncertainty"] = f"{float(arrays.uncertainty[k, j, i]):.2f}"
    return out


class CursorReadout:
    """Keeps ``state[key]`` equal to the probe under the mouse (None when it leaves the volume)."""

    def __init__(self, state: Any, arrays: Callable[[], ProbeArrays | None], names: Mapping[int, str],
                 key: str = "msd_cursor"):
        self._state, self._arrays, self._names, self._key = state, arrays, names, key
        self._node: Any = None
        self._tag: int | None = None
        state[key] = None

    def observe(self, scene: Any) -> None:
        """(Re)attach to the scene's crosshair node (a cleared scene may have made a new one)."""
        node = scene.GetFirstNodeByClass(CROSSHAIR_CLASS)
        if node is self._node:
            return
        if self._node is not None and self._tag is not None:
            self._node.RemoveObserver(self._tag)
        self._node, self._tag = node, None
        if node is not None:
            self._tag = node.AddObserver(node.CursorPositionModifiedEvent, self._on_cursor)

    def _on_cursor(self, node: Any, _event: Any) -> None:
        ras = [0.0, 0.0, 0.0]
        arrays = self._arrays()
        value = probe(arrays, ras, self._names) if arrays is not None and node.GetCursorPositionRAS(ras) else None
        if value != self._state[self._key]:
            with self._state:
                self._state[self._key] = value
