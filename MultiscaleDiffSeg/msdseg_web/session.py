"""What the app has loaded now: one input T1 and at most one result for it.

Kept apart from the app so that "which case is open" has a single owner: loading a new T1 makes a
new :class:`Session`, and nothing of the previous case (uncertainty map, stem, job) leaks into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from MultiscaleDiffSegLib.mrml import ResultNodes

from .worker import SegmentationJob


@dataclass
class Session:
    stem: str = ""
    input_path: Path | None = None
    image: sitk.Image | None = None
    volume_node: Any = None
    nodes: ResultNodes | None = None
    uncertainty: sitk.Image | None = None
    info: dict[str, Any] = field(default_factory=dict)
    job: SegmentationJob | None = None
    #: The labels as segmented or opened (numpy k, j, i): what edits are counted against, and what
    #: the eraser's "restore" mode gives back.
    reference: np.ndarray | None = None

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.status().finished

    @property
    def segmentation_node(self) -> Any:
        return self.nodes.segmentation if self.nodes is not None else None
