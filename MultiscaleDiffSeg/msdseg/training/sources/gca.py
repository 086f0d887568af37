"""Reader for FreeSurfer's Gaussian classifier atlas files (``*.gca``, format version 5.0).

Layout (big-endian, every field four bytes; facts from FreeSurfer's ``GCAread``/``GCAwrite``):

* header: version (float), prior spacing, node spacing (floats), prior width/height/depth,
  node width/height/depth, number of input channels, flags (ints);
* node section, for every intensity node in x, y, z order (z fastest): label count, total
  training; per label the label (int), ``ninputs`` means and the ``ninputs*(ninputs+1)/2``
  upper-triangle covariances (floats), then, unless flag ``GCA_NO_MRF`` (1) is set, six
  neighbour lists of (count, count x (label int, prior float));
* prior section, for every prior voxel in the same order: label count, total training, then
  count x (label int, prior float);
* tagged section: ``FILE_TAG`` then tags, of which we read the atlas type, the MR parameters
  and the direction cosines / centre / size of the 1 mm volume the grids live in.

Only the priors are needed here.  The node section cannot be skipped by a seek (its records have
variable length), so it is walked once counting words; the prior section is walked the same way
for record starts and then gathered with vectorised numpy reads.  Version 4.0 files store labels
as single bytes (no word alignment) and are refused.
"""
from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

VERSION = 5.0
HEADER_WORDS = 11
FLAG_NO_MRF = 0x0001
GIBBS_NEIGHBOURS = 6
FILE_TAG = 0xAB2C
TAG_PARAMETERS, TAG_TYPE, TAG_DIRCOS = 0x0001, 0x0002, 0x0003


@dataclass(frozen=True)
class GcaHeader:
    version: float
    prior_spacing: float
    node_spacing: float
    prior_shape: tuple[int, int, int]
    node_shape: tuple[int, int, int]
    ninputs: int
    flags: int


@dataclass
class GcaPriors:
    """The prior section as compressed rows: voxel ``v`` (C order over ``prior_shape``) holds
    ``labels[offsets[v]:offsets[v+1]]`` with ``priors[...]`` of the same slice."""

    header: GcaHeader
    offsets: np.ndarray  # int64 (V + 1,)
    labels: np.ndarray  # int32
    priors: np.ndarray  # float32
    total_training: np.ndarray  # int32 (V,)
    vox2ras: np.ndarray  # prior grid voxel -> RAS (mm)
    tags: dict = field(default_factory=dict)

    def voxel_of_entry(self) -> np.ndarray:
        """Flat prior-voxel index of every (label, prior) entry."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))


def read_header(data: bytes) -> GcaHeader:
    if len(data) < 4 * HEADER_WORDS:
        raise ValueError(f"GCA: file too short for a header ({len(data)} bytes)")
    v, ps, ns, pw, ph, pd, nw, nh, nd, ninputs, flags = struct.unpack(">fffiiiiiiii", data[:4 * HEADER_WORDS])
    if v != VERSION:
        raise ValueError(f"GCA: version {v:g} is not supported (only {VERSION:g}, integer labels)")
    if min(pw, ph, pd, nw, nh, nd, ninputs) < 1 or ps <= 0 or ns <= 0:
        raise ValueError(f"GCA: implausible header {(ps, ns, pw, ph, pd, nw, nh, nd, ninputs)}")
    return GcaHeader(v, ps, ns, (pw, ph, pd), (nw, nh, nd), ninputs, flags)


def _words(data: bytes) -> array.array:
    """The file as native ints for fast scalar indexing while walking records."""
    words = array.array("i")
    words.frombytes(data[: len(data) // 4 * 4])
    if sys.byteorder == "little":
        words.byteswap()
    return words


def _count(words: array.array, p: int, section: str) -> int:
    """The record length field at word ``p``; refuses negative or missing ones."""
    try:
        n = words[p]
    except IndexError:
        raise ValueError(f"GCA: file ends inside the {section} section") from None
    if n < 0:
        raise ValueError(f"GCA: negative label count {n} in the {section} section (word {p})")
    return n


def skip_nodes(words: array.array, header: GcaHeader) -> int:
    """Word index just after the node section."""
    per_label = 1 + header.ninputs + header.ninputs * (header.ninputs + 1) // 2
    mrf = not header.flags & FLAG_NO_MRF
    p = HEADER_WORDS
    for _ in range(int(np.prod(header.node_shape))):
        n = _count(words, p, "node")
        p += 2
        if not mrf:
            p += n * per_label
            continue
        for _ in range(n):
            p += per_label
            for _ in range(GIBBS_NEIGHBOURS):
                p += 1 + 2 * _count(words, p, "node")
    if p > len(words):
        raise ValueError("GCA: file ends inside the node section")
    return p


def _prior_starts(words: array.array, start: int, n_vox: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Record start and label count of every prior voxel; word index after the section."""
    starts = array.array("q", bytes(8 * n_vox))
    counts = array.array("i", bytes(4 * n_vox))
    p = start
    for v in range(n_vox):
        n = _count(words, p, "prior")
        starts[v] = p
        counts[v] = n
        p += 2 + 2 * n
    if p > len(words):
        raise ValueError("GCA: file ends inside the prior section")
    return np.frombuffer(starts, np.int64), np.frombuffer(counts, np.int32), p


def read_tags(data: bytes, pos: int, header: GcaHeader) -> dict:
    """Tags after the prior section (byte offset ``pos``); unknown tags are refused."""
    tags: dict = {}

    def take(kind: str, n: int) -> tuple:
        """``n`` big-endian ints (``kind`` "i") or floats ("f") from ``pos`` on."""
        nonlocal pos
        if pos + 4 * n > len(data):
            raise ValueError("GCA: file ends inside the tagged section")
        out = struct.unpack(f">{n}{kind}", data[pos:pos + 4 * n])
        pos += 4 * n
        return out

    while pos + 4 <= len(data):
        (tag,) = take("i", 1)
        if tag == FILE_TAG:
            continue
        if tag == TAG_TYPE:
            take("i", 1)  # parameter count, always 1
            (tags["type"],) = take("i", 1)
        elif tag == TAG_PARAMETERS:
            take("i", 1)
            tags["tr_fa_te"] = [take("f", 3) for _ in range(header.ninputs)]
        elif tag == TAG_DIRCOS:
            f = take("f", 12)
            tags["dircos"] = np.array(f[:9], float).reshape(3, 3).T  # columns: x, y, z axes in RAS
            tags["c_ras"] = np.array(f[9:], float)
            tags["size"] = take("i", 3)
            tags["voxel_mm"] = take("f", 3)
        else:
            raise ValueError(f"GCA: unsupported tag {tag:#x} at byte {pos - 4}")
    return tags


def grid_vox2ras(dircos: np.ndarray, c_ras: np.ndarray, voxel_mm: tuple[float, ...], spacing: float,
                 shape: tuple[int, int, int]) -> np.ndarray:
    """FreeSurfer's voxel-to-RAS of a grid: voxel ``shape / 2`` sits at ``c_ras``.

    The prior grid shares the 1 mm volume's direction cosines and centre, with voxels
    ``spacing`` times larger (FreeSurfer's ``GCAsetup``).
    """
    m = dircos * (np.asarray(voxel_mm, float) * spacing)[None, :]
    out = np.eye(4)
    out[:3, :3] = m
    out[:3, 3] = c_ras - m @ (np.asarray(shape, float) / 2.0)
    return out


def read_gca(data: bytes) -> GcaPriors:
    """Parse a version 5.0 GCA held in memory; raises ``ValueError`` on anything malformed."""
    header = read_header(data)
    words = _words(data)
    prior_start = skip_nodes(words, header)
    n_vox = int(np.prod(header.prior_shape))
    starts, counts, end = _prior_starts(words, prior_start, n_vox)
    offsets = np.zeros(n_vox + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    first = np.repeat(starts + 2 - 2 * offsets[:-1], counts)  # word of entry k = first[k] + 2k
    label_words = first + 2 * np.arange(int(offsets[-1]), dtype=np.int64)
    as_int = np.frombuffer(data, ">i4", count=len(data) // 4)
    as_float = np.frombuffer(data, ">f4", count=len(data) // 4)
    labels = as_int[label_words].astype(np.int32)
    priors = as_float[label_words + 1].astype(np.float32)
    total = as_int[starts + 1].astype(np.int32)
    if labels.size and (labels.min() < 0 or not np.all(np.isfinite(priors))):
        raise ValueError("GCA: negative labels or non-finite priors in the prior section")
    tags = read_tags(data, 4 * end, header)
    if "dircos" not in tags:
        raise ValueError("GCA: no direction-cosine tag, so the atlas has no known position")
    vox2ras = grid_vox2ras(tags["dircos"], tags["c_ras"], tags["voxel_mm"], header.prior_spacing,
                           header.prior_shape)
    return GcaPriors(header, offsets, labels, priors, total, vox2ras, tags)
