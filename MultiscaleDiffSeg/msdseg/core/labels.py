"""The label hierarchy, read from ``resources/label_tree.json``.

The tree is data so that a new structure, colour or terminology code is a change to one JSON file,
not to the network, the losses or the Slicer layer.  Leaves carry FreeSurfer aseg numbers so that
outputs compare directly with FreeSurfer, FastSurfer, SynthSeg and SAMSEG.

Channel convention used everywhere in the core: channel 0 is background, channel ``1 + i`` is the
``i``-th leaf in file order.  Every internal node's probability is the exact sum of its leaves'
probabilities (see :meth:`LabelTree.aggregate`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_TREE = "label_tree.json"


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM style triplet)."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Node:
    """One node of the hierarchy; ``label`` is set only for leaves (aseg number)."""

    id: str
    name: str
    parent: str | None
    color: tuple[int, int, int]
    code: Code | None = None
    laterality: Code | None = None
    label: int | None = None

    @property
    def is_leaf(self) -> bool:
        return self.label is not None


@dataclass
class LabelTree:
    """Hierarchy of brain structures with leaf <-> channel <-> aseg-number lookups."""

    name: str
    version: str
    nodes: list[Node]
    description: str = ""
    _by_id: dict[str, Node] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {n.id: n for n in self.nodes}
        if len(self._by_id) != len(self.nodes):
            raise ValueError("label tree: duplicate node ids")
        roots = [n for n in self.nodes if n.parent is None]
        if len(roots) != 1:
            raise ValueError("label tree: exactly one root is required")
        for n in self.nodes:
            if n.parent is not None and n.parent not in self._by_id:
                raise ValueError(f"label tree: node {n.id} has unknown parent {n.parent}")
            if n.is_leaf and self.children(n.id):
                raise ValueError(f"label tree: leaf {n.id} has children")
        labels = [n.label for n in self.leaves]
        if len(set(labels)) != len(labels):
            raise ValueError("label tree: duplicate aseg numbers")

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path | None = None) -> "LabelTree":
        """Read a tree file; with no path, the one shipped with the package."""
        if path is None:
            text = resources.files("msdseg.resources").joinpath(DEFAULT_TREE).read_text()
        else:
            text = Path(path).read_text()
        doc = json.loads(text)

        def code(d: Mapping | None) -> Code | None:
            return Code(d["scheme"], d["value"], d["meaning"]) if d else None

        nodes = [
            Node(
                id=d["id"],
                name=d["name"],
                parent=d.get("parent"),
                color=tuple(int(c) for c in d["color"]),  # type: ignore[arg-type]
                code=code(d.get("code")),
                laterality=code(d.get("laterality")),
                label=d.get("label"),
            )
            for d in doc["nodes"]
        ]
        return cls(doc["name"], doc["version"], nodes, doc.get("description", ""))

    # ----------------------------------------------------------------- structure
    def __getitem__(self, node_id: str) -> Node:
        return self._by_id[node_id]

    @property
    def root(self) -> Node:
        return next(n for n in self.nodes if n.parent is None)

    @cached_property
    def leaves(self) -> list[Node]:
        return [n for n in self.nodes if n.is_leaf]

    @cached_property
    def internal(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_leaf]

    @property
    def n_classes(self) -> int:
        """Number of network channels: background plus one per leaf."""
        return len(self.leaves) + 1

    def children(self, node_id: str) -> list[Node]:
        return [n for n in self.nodes if n.parent == node_id]

    def ancestors(self, node_id: str) -> list[Node]:
        """Parents from the direct parent up to the root."""
        out: list[Node] = []
        parent = self._by_id[node_id].parent
        while parent is not None:
            out.append(self._by_id[parent])
            parent = self._by_id[parent].parent
        return out

    def depth(self, node_id: str) -> int:
        return len(self.ancestors(node_id))

    def descendant_leaves(self, node_id: str) -> list[Node]:
        node = self._by_id[node_id]
        if node.is_leaf:
            return [node]
        return [leaf for leaf in self.leaves if node_id in {a.id for a in self.ancestors(leaf.id)}]

    @cached_property
    def levels(self) -> list[list[str]]:
        """Internal node ids grouped by depth (root first); leaves are the last level."""
        by_depth: dict[int, list[str]] = {}
        for n in self.internal:
            by_depth.setdefault(self.depth(n.id), []).append(n.id)
        return [by_depth[d] for d in sorted(by_depth)] + [[n.id for n in self.leaves]]

    # ----------------------------------------------------------------- channels
    @cached_property
    def leaf_channel(self) -> dict[str, int]:
        return {n.id: i + 1 for i, n in enumerate(self.leaves)}

    @cached_property
    def aseg_to_channel(self) -> dict[int, int]:
        return {int(n.label): i + 1 for i, n in enumerate(self.leaves)}  # type: ignore[arg-type]

    @cached_property
    def channel_to_aseg(self) -> np.ndarray:
        """``channel_to_aseg[c]`` is the aseg number of channel ``c`` (0 for background)."""
        return np.array([0] + [int(n.label) for n in self.leaves], dtype=np.int32)  # type: ignore[arg-type]

    def aseg_lookup(self, max_label: int) -> np.ndarray:
        """Array mapping aseg numbers 0..max_label to channels (unknown numbers -> 0)."""
        lut = np.zeros(max(max_label, int(self.channel_to_aseg.max())) + 1, dtype=np.int64)
        for lab, ch in self.aseg_to_channel.items():
            lut[lab] = ch
        return lut

    @cached_property
    def aggregation_matrix(self) -> np.ndarray:
        """``A[k, c] = 1`` when channel ``c`` is a leaf below internal node ``k``.

        Internal node probabilities are ``A @ p`` (parents are exact sums of their leaves).
        """
        mat = np.zeros((len(self.internal), self.n_classes), dtype=np.float32)
        for k, node in enumerate(self.internal):
            for leaf in self.descendant_leaves(node.id):
                mat[k, self.leaf_channel[leaf.id]] = 1.0
        return mat

    def aggregate(self, probs: np.ndarray, node_ids: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities of internal nodes from channel probabilities ``probs[C, ...]``."""
        mat = self.aggregation_matrix
        if node_ids is not None:
            index = {n.id: k for k, n in enumerate(self.internal)}
            mat = mat[[index[i] for i in node_ids]]
        return np.tensordot(mat, probs, axes=([1], [0]))

    @cached_property
    def flip_permutation(self) -> np.ndarray:
        """Channel permutation that swaps every left leaf with its right twin.

        Used when an image is mirrored left/right: the labels must swap sides too.
        """
        perm = np.arange(self.n_classes)
        for leaf in self.leaves:
            twin = self.twin(leaf.id)
            if twin is not None:
                perm[self.leaf_channel[leaf.id]] = self.leaf_channel[twin]
        return perm

    def twin(self, node_id: str) -> str | None:
        """The same structure on the other side, or None for midline nodes."""
        for a, b in (("left_", "right_"), ("right_", "left_")):
            if node_id.startswith(a):
                other = b + node_id[len(a):]
                return other if other in self._by_id else None
        return None

    # ----------------------------------------------------------------- foreign maps
    def defined_nodes(self, present_channels: Iterable[int], merged: Iterable[Iterable[int]] = ()) -> set[str]:
        """Nodes a label map defines, given which leaf channels it labels completely.

        A leaf is defined when the source labels it; an internal node only when all of its leaves
        are.  Background is defined only when every leaf is (otherwise unlabelled voxels may hide
        an undefined structure).

        ``merged``: groups of leaf channels whose union the map labels reliably but whose split it
        does not (its own convention differs from ours).  The leaves stay undefined, but a group
        counts as labelled for every node that contains the whole group, and for background: its
        voxels are labelled, just not split our way.
        """
        def ids(channels: Iterable[int]) -> set[str]:
            wanted = {int(c) for c in channels}
            return {n.id for n in self.leaves if self.leaf_channel[n.id] in wanted}

        leaf_ids = ids(present_channels)
        groups = [ids(g) for g in merged]
        out = set(leaf_ids)
        for node in self.internal:
            leaves = {leaf.id for leaf in self.descendant_leaves(node.id)}
            if leaves <= leaf_ids.union(*(g for g in groups if g <= leaves)):
                out.add(node.id)
        if len(leaf_ids.union(*groups)) == len(self.leaves):
            out.add("background")
        return out

    def channel_mask(self, defined: set[str]) -> np.ndarray:
        """Boolean mask over channels (background first) of the defined ones."""
        mask = np.zeros(self.n_classes, dtype=bool)
        mask[0] = "background" in defined
        for leaf in self.leaves:
            mask[self.leaf_channel[leaf.id]] = leaf.id in defined
        return mask

    def internal_mask(self, defined: set[str]) -> np.ndarray:
        return np.array([n.id in defined for n in self.internal], dtype=bool)


def load_tree(path: str | Path | None = None) -> LabelTree:
    """Shortcut for :meth:`LabelTree.load`; cached for the default tree."""
    if path is None:
        global _DEFAULT
        if _DEFAULT is None:
            _DEFAULT = LabelTree.load()
        return _DEFAULT
    return LabelTree.load(path)


_DEFAULT: LabelTree | None = None
