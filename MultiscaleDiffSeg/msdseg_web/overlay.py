"""Where the uncertainty overlay starts and what its colour bar shows.

Why a threshold from the map itself: the map is the calibrated probability that a voxel's label
is wrong, and even far outside the head it is not zero (about 0.05 on the shipped sample), so a
fixed cut-off such as 0.02 painted the whole field of view.  The map has two populations: a low
floor (air, the middle of large structures) and the voxels where the model really hesitates
(borders, small nuclei).  Otsu's method picks the value that separates two populations best from
the histogram alone; the overlay shows only what lies above it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Never show less than this (a near-perfect map would otherwise have a threshold near 0).
MIN_THRESHOLD = 0.02
#: The top of the colour scale: this percentile of the shown voxels.
UPPER_PERCENTILE = 99.5
BINS = 256


def otsu_threshold(values: np.ndarray, bins: int = BINS) -> float:
    """The histogram split that maximises the between-class variance (Otsu, 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or float(values.max()) <= float(values.min()):
        return float(values.max()) if values.size else 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def display_range(uncertainty: np.ndarray) -> tuple[float, float]:
    """(threshold, top of the colour scale) for an uncertainty map."""
    values = np.asarray(uncertainty)
    positive = values[values > 0]
    if positive.size == 0:
        return MIN_THRESHOLD, 1.0
    lower = max(MIN_THRESHOLD, otsu_threshold(positive))
    shown = positive[positive >= lower]
    upper = float(np.percentile(shown, UPPER_PERCENTILE)) if shown.size else lower
    return lower, max(upper, lower + 0.05)


def colour_bar_css(colour_node: Any, stops: int = 32) -> str:
    """A CSS ``linear-gradient`` of the colour node's ramp, left (low) to right (high)."""
    lookup = colour_node.GetScalarsToColors() if colour_node is not None else None
    if lookup is None:
        return "linear-gradient(to right, #000, #fff)"
    low, high = lookup.GetRange()
    colours = []
    for index in range(stops):
        rgb = [0.0, 0.0, 0.0]
        lookup.GetColor(low + (high - low) * index / (stops - 1), rgb)
        colours.append("#" + "".join(f"{int(round(255 * c)):02x}" for c in rgb))
    return f"linear-gradient(to right, {', '.join(colours)})"
