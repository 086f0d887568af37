"""``manifest.json``: what the prepared data set holds, rewritten after every source.

The trainer reads it to find the label maps, which leaves each one defines (the others are masked
in the loss), and which maps are held out.  It is rewritten atomically after each source so that
training can start on the fast sources while SAMSEG is still being rasterised; a rebuild of some
sources (``only=``) keeps the entries of the others.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msdseg.training.sources.labelmap import GEN_ONLY_OFFSET, IGNORE
from msdseg.training.sources.output import write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class MapEntry:
    """One label map (and maybe its T1) in the prepared data set."""

    name: str
    source: str
    path: str  # relative to the manifest's folder
    role: str  # "train" or "heldout" (the trainer takes "train" only)
    defined: list[int]  # leaf aseg numbers labelled completely
    shape: list[int]
    licence: str
    licence_files: list[str]
    t1: str | None = None
    t1_note: str | None = None
    voxels: dict[str, int] = field(default_factory=dict)  # output value -> count
    laterality: dict[str, float] = field(default_factory=dict)
    origin: str = ""  # member of the wheel it came from
    # leaves the map labels but whose boundary follows another protocol: painted into synthetic
    # images, left out of ``defined`` so the loss does not learn them (see ``common.finish_map``)
    painted_only: list[int] = field(default_factory=list)
    painted_only_reason: str = ""
    # groups of leaves whose union the map labels but whose split follows another protocol: the
    # loss learns the union (its parent node), not the split (``LabelTree.defined_nodes``)
    merged: list[list[int]] = field(default_factory=list)
    merged_reason: str = ""
    # held-out references only.  "partial": only the ``defined`` leaves are truth (evaluation scores
    # them alone; the map's other voxels are not background truth and it is never rendered as a
    # whole-brain map); None: the map's own rules above apply
    reference: str | None = None
    independent: bool | None = None  # True: no training source contains this brain
    independent_note: str = ""
    convention_note: str = ""  # how the source's boundaries differ from the aseg protocol


@dataclass
class WheelRecord:
    name: str
    version: str
    file: str
    sha256: str
    licence: str


class Manifest:
    """In-memory manifest bound to an output folder."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST
        self.maps: list[dict[str, Any]] = []
        self.wheels: dict[str, dict[str, Any]] = {}
        self.extras: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            doc = json.loads(self.path.read_text())
            if doc.get("format") == FORMAT_VERSION:
                self.maps = doc.get("maps", [])
                self.wheels = doc.get("wheels", {})
                self.extras = doc.get("extras", {})

    def replace_source(self, source: str, wheel: WheelRecord, entries: list[MapEntry],
                       extras: dict[str, Any] | None = None) -> None:
        """Drop the old entries of ``source`` and add the new ones, then write the file."""
        self.maps = [m for m in self.maps if m["source"] != source] + [asdict(e) for e in entries]
        self.maps.sort(key=lambda m: (m["source"], m["name"]))
        self.wheels[source] = asdict(wheel)
        if extras is not None:
            self.extras[source] = extras
        else:
            self.extras.pop(source, None)
        self.write()

    def document(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "ignore_label": IGNORE,
            "generation_only_min": GEN_ONLY_OFFSET,
            "grid": "RAS, 1 mm, cropped to the labelled box + 8 mm",
            "wheels": self.wheels,
            "maps": self.maps,
            "extras": self.extras,
        }

    def write(self) -> None:
        write_json(self.path, self.document())
