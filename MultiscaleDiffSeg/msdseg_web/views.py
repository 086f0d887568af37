"""What every slice view shows besides the image: its name, orientation letters, slice position.

Why in the page rather than drawn into the image: the letters are text the browser renders
sharply at any size, a screen reader and the browser test can read them, and they never hide
anatomy under opaque pixels (``pointer-events: none`` lets every click reach the view).

The letters come from the slice node's ``SliceToRAS`` matrix, so they are right for any
orientation: the screen's right edge is labelled with the anatomical direction of the slice's
+x axis.  With Slicer's default axial view that is ``L`` (radiological convention: the patient's
right on the viewer's left), the same as Slicer, ITK-SNAP and Freeview.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from trame.widgets import html

#: RAS axis -> (letter of +axis, letter of -axis)
AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))
STYLE = """
.msd-view-overlay { position: absolute; inset: 0; pointer-events: none; z-index: 1;
  color: #ffe08a; font: 600 13px/1.2 sans-serif; text-shadow: 0 0 3px #000, 0 0 2px #000; }
.msd-view-overlay > div { position: absolute; }
.msd-view-name { top: 6px; left: 50%; transform: translateX(-50%); color: #fff; }
.msd-letter-left { left: 44px; top: 50%; transform: translateY(-50%); }
.msd-letter-right { right: 8px; top: 50%; transform: translateY(-50%); }
.msd-letter-top { top: 24px; left: 50%; transform: translateX(-50%); }
.msd-letter-bottom { bottom: 34px; left: 50%; transform: translateX(-50%); }
.msd-slice-position { bottom: 34px; right: 8px; color: #fff; font-weight: 400; }
"""


def ras_letter(direction: Sequence[float]) -> str:
    """The anatomical letter of a direction in RAS: its largest component and that one's sign."""
    vector = np.asarray(direction, dtype=float)[:3]
    axis = int(np.argmax(np.abs(vector)))
    return AXIS_LETTERS[axis][0 if vector[axis] >= 0 else 1]


def orientation_letters(slice_to_ras: np.ndarray) -> dict[str, str]:
    """Letters at the left, right, top and bottom edges of a slice view."""
    x_axis, y_axis = slice_to_ras[:3, 0], slice_to_ras[:3, 1]
    return {"left": ras_letter(-x_axis), "right": ras_letter(x_axis),
            "top": ras_letter(y_axis), "bottom": ras_letter(-y_axis)}


def slice_position(slice_to_ras: np.ndarray) -> str:
    """``"S 12.0 mm"``: how far the slice lies from the origin along its normal, named by direction."""
    normal = slice_to_ras[:3, 2]
    offset = float(np.dot(normal, slice_to_ras[:3, 3]))
    letter = ras_letter(normal if offset >= 0 else -normal)
    return f"{letter} {abs(offset):.1f} mm"


def matrix_array(vtk_matrix: Any) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def view_state_key(view_id: str) -> str:
    return "msd_view_" + "".join(ch if ch.isalnum() else "_" for ch in view_id)


def view_info(slice_node: Any) -> dict[str, str]:
    """Everything the overlay shows for one slice node."""
    matrix = matrix_array(slice_node.GetSliceToRAS())
    name = slice_node.GetOrientation() if hasattr(slice_node, "GetOrientation") else slice_node.GetName()
    return {"name": str(name), **orientation_letters(matrix), "position": slice_position(matrix)}


class SliceViewOverlay:
    """Builds the overlay of each slice view and keeps its text current as the view changes.

    ``default_ui(server, view_id, view)`` is trame-slicer's own gutter (reset button, slice
    slider), kept under the overlay.
    """

    def __init__(self, default_ui: Callable[[Any, str, Any], None]):
        self._default_ui = default_ui

    def __call__(self, server: Any, view_id: str, view: Any) -> None:
        self._default_ui(server, view_id, view)
        key = view_state_key(view_id)
        server.state.setdefault(key, {"name": "", "left": "", "right": "", "top": "", "bottom": "", "position": ""})
        with html.Div(classes=f"msd-view-overlay msd-view-{key[len('msd_view_'):]}"):
            html.Div(f"{{{{ {key}.name }}}}", classes="msd-view-name")
            for edge in ("left", "right", "top", "bottom"):
                html.Div(f"{{{{ {key}.{edge} }}}}", classes=f"msd-letter-{edge}")
            html.Div(f"{{{{ {key}.position }}}}", classes="msd-slice-position")

        def update(*_: Any) -> None:
            node = view.get_view_node()
            if node is None:
                return
            info = view_info(node)
            if server.state[key] != info:
                with server.state:
                    server.state[key] = info

        view.modified.connect(update)
        update()
